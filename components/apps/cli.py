"""The `tlpipe` command: run one stage, the whole Prefect flow, a prediction, or print a summary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from components.core.errors import PipelineError

log = logging.getLogger("tlpipe")


def _quiet_libraries() -> None:
    # Set before TensorFlow, Great Expectations or Prefect is imported; they read these once.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's temporary server builds a fresh database in more than its 20 s default on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else one INFO line per Prefect API call


def _stage(args: argparse.Namespace) -> None:
    from components.core.config import load_params
    from components.core.graph import run_stage

    result = run_stage(args.name, load_params(args.params))
    log.info("%s: done%s", args.name, f" ({result})" if result is not None else "")


def _run(args: argparse.Namespace) -> None:
    from components.core.config import load_params

    load_params(args.params)  # fail on a bad params.yaml before Prefect starts
    from flows.pipeline import pipeline

    pipeline(params_path=str(args.params), stages=args.stages or None)


def _predict(args: argparse.Namespace) -> None:
    from components.deploy.predict import predict_files

    for line in predict_files(args.model, args.images, top_k=args.top_k):
        print(line)


def _serve(args: argparse.Namespace) -> None:
    from components.deploy.serve import ServeSettings, serve

    # Options left out keep ServeSettings' defaults (written once, there).
    given = {
        "max_body_bytes": None if args.max_body_mb is None else int(args.max_body_mb * 1024 * 1024),
        "max_pixels": args.max_pixels,
        "max_images": args.max_images,
        "top_k": args.top_k,
        "batch_window_ms": args.batch_window_ms,
        "max_batch": args.max_batch,
    }
    serve(args.model, args.host, args.port, ServeSettings(**{k: v for k, v in given.items() if v is not None}))


def _summary(args: argparse.Namespace) -> None:
    from components.core.config import load_params
    from components.apps.summary import summary

    print(summary(load_params(args.params)))


def _promote(args: argparse.Namespace) -> None:
    from components.core.config import load_params
    from components.deploy.promote import run

    # A rejected challenger is a normal outcome (exit 0), said on stdout; only errors exit non-zero.
    print(run(load_params(args.params)))


def _stages(args: argparse.Namespace) -> None:
    from components.core.graph import stage_names

    print("\n".join(stage_names()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlpipe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_params(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
        return sub

    stage = with_params(commands.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)"))
    stage.add_argument("name", help="stage name, as in dvc.yaml")
    stage.set_defaults(handler=_stage)

    run = with_params(commands.add_parser("run", help="run the whole graph as a Prefect flow"))
    run.add_argument("--stages", nargs="*", help="only these stages (default: all, in dvc.yaml order)")
    run.set_defaults(handler=_run)

    predict = commands.add_parser("predict", help="label images with an exported ONNX model")
    predict.add_argument("model", type=Path, help="the .onnx file (models/model.onnx)")
    predict.add_argument("images", type=Path, nargs="+", help="image files")
    predict.add_argument("--top-k", type=int, default=1, help="labels to print per image")
    predict.set_defaults(handler=_predict)

    served = commands.add_parser("serve", help="serve an exported ONNX model over HTTP (POST /predict)")
    served.add_argument("model", type=Path, help="the .onnx file (models/model.onnx)")
    served.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for all)")
    served.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    served.add_argument("--top-k", type=int, help="labels per image unless a request asks (?top_k=); default 5")
    served.add_argument("--max-body-mb", type=float, help="largest request body in MiB, else 413; default 20")
    served.add_argument("--max-pixels", type=int, help="largest image (width x height), else 413; default 40e6")
    served.add_argument("--max-images", type=int, help="most images in one request, else 413; default 64")
    served.add_argument("--batch-window-ms", type=float, help="how long to gather concurrent requests; default 5")
    served.add_argument("--max-batch", type=int, help="most images per onnxruntime call; default 64")
    served.set_defaults(handler=_serve)

    summary = with_params(commands.add_parser("summary", help="print metrics, gates and the model's location"))
    summary.set_defaults(handler=_summary)

    promote = with_params(commands.add_parser("promote", help="compare models/model.onnx with the champion; promote or keep"))
    promote.set_defaults(handler=_promote)

    stages = commands.add_parser("stages", help="list the stages in order")
    stages.set_defaults(handler=_stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _quiet_libraries()
    try:
        args.handler(args)
    except PipelineError as error:
        print(f"tlpipe {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tlpipe {args.command}: interrupted; outputs are written atomically, rerun to continue", file=sys.stderr)
        return 130
    if args.command == "stage" and _fast_exit:
        _exit_now(0)
    return 0


_fast_exit = False  # set by `entry` (the `tlpipe` command) only: a caller of main() keeps its process


def _exit_now(code: int) -> None:
    """End a finished stage's process without Python's teardown.

    Every output is already written and renamed into place (components.core.artifacts), so the teardown
    only frees memory the kernel frees anyway; for a process that imported TensorFlow it took 2-3 s
    (docs/benchmarks.md), paid by each of the 5 stages that import it in every `dvc repro`.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> int:
    """The `tlpipe` console command."""
    global _fast_exit
    _fast_exit = True
    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
