"""The `tlpipe` command: run one stage, the whole Prefect flow, a prediction or its explanation, or print a summary."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from components.core import console
from components.core.errors import PipelineError

log = logging.getLogger("tlpipe")


def _stage(args: argparse.Namespace) -> None:
    from components.core.config import load_params
    from components.core.console import stage_warnings
    from components.core.graph import record_in_dvc, run_stage

    params = load_params(args.params, record=True)  # dvc.yaml reads the effective values this writes
    with stage_warnings(args.name, params.paths.warnings):
        result = run_stage(args.name, params)
    log.info("%s: done%s", args.name, f" ({result})" if result is not None else "")
    record_in_dvc([args.name], args.params)


def _run(args: argparse.Namespace) -> None:
    from components.core.config import load_params

    load_params(args.params)  # fail on a bad params.yaml before Prefect starts
    from flows.pipeline import pipeline

    pipeline(params_path=str(args.params), stages=args.stages or None)


def _predict(args: argparse.Namespace) -> None:
    from components.deploy.predict import as_line, predict_files

    answers = predict_files(args.model, args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps({"model": str(args.model), "predictions": answers}, indent=2))
    else:
        print("\n".join(map(as_line, answers)))


def _explain(args: argparse.Namespace) -> None:
    from components.deploy.explain import explain_files

    for row in explain_files(args.model, args.images, args.out, layer=args.layer):
        print(f"{row['image']}\t{row['predicted']}\t{row['probability']:.4f}\t{args.out / row['overlay']}")


def _serve(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from components.deploy.serve import ServeSettings, serve

    # Each option is the ServeSettings field of the same name; options left out keep its defaults.
    given = {field.name: getattr(args, field.name) for field in fields(ServeSettings)}
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


def _init(args: argparse.Namespace) -> None:
    from components.apps.init import init

    print(init(args.source, args.target, args.output, force=args.force))


def _params(args: argparse.Namespace) -> None:
    import yaml

    from components.core.config import effective_raw, load_params

    load_params(args.params)  # checked first: an error names the bad key
    print(yaml.safe_dump(effective_raw(args.params), sort_keys=False), end="")


def _drift(args: argparse.Namespace) -> None:
    from components.core.config import load_params
    from components.data.drift import accept

    print(accept(load_params(args.params)))


def _stages(args: argparse.Namespace) -> None:
    from components.core.graph import stage_names

    print("\n".join(stage_names()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlpipe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, libraries' included")
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
    predict.add_argument("--top-k", type=int, default=1, help="labels to print per image, best first (default: 1)")
    predict.add_argument("--json", action="store_true",
                         help='one JSON document: {"model", "predictions": [{"image", "top_k": [{"label", "probability"}]}]}')
    predict.set_defaults(handler=_predict)

    explain = commands.add_parser("explain", help="Grad-CAM overlays of a Keras model's answers, beside a JSON of them")
    explain.add_argument("model", type=Path, help="a .keras file or a model folder (models/finetuned: the ONNX model's twin)")
    explain.add_argument("images", type=Path, nargs="+", help="image files")
    explain.add_argument("--out", type=Path, default=Path("explanations"), help="output folder (default: explanations)")
    explain.add_argument("--layer", help="the layer to explain, by path (backbone.block3_relu2); default: the last spatial map")
    explain.set_defaults(handler=_explain)

    served = commands.add_parser("serve", help="serve an exported ONNX model over HTTP (POST /predict)")
    served.add_argument("model", type=Path, help="the .onnx file (models/model.onnx)")
    served.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for all)")
    served.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port, logged)")
    served.add_argument("--top-k", type=int, help="labels per image unless a request asks (?top_k=); default 5")
    served.add_argument("--max-body-mb", type=float, help="largest request body in MiB, else 413; default 20")
    served.add_argument("--body-timeout-s", type=float, help="seconds for a whole body to arrive, else 408; default 30")
    served.add_argument("--keep-alive-s", type=int, help="idle keep-alive connections close after this; default 5")
    served.add_argument("--max-connections", type=int, help="concurrent connections, else 503; default 256")
    served.add_argument("--max-pixels", type=int, help="largest image (width x height), else 413; default 40e6")
    served.add_argument("--max-decoded-mb", type=float, help="largest image once decoded, in MiB, else 413; default 128")
    served.add_argument("--decode-threads", type=int, help="requests decoding images at once; default 2")
    served.add_argument("--max-images", type=int, help="most images in one request, else 413; default 64")
    served.add_argument("--batch-window-ms", type=float, help="how long to gather concurrent requests; default 5")
    served.add_argument("--max-batch", type=int, help="most images per onnxruntime call; default 64")
    served.set_defaults(handler=_serve)

    summary = with_params(commands.add_parser("summary", help="print metrics, gates and the model's location"))
    summary.set_defaults(handler=_summary)

    promote = with_params(commands.add_parser("promote", help="compare models/model.onnx with the champion; promote or keep"))
    promote.set_defaults(handler=_promote)

    started = commands.add_parser("init", help="write a params.yaml that fits your image folders")
    started.add_argument("--source", type=Path, required=True, help="source task folder (one subfolder per class)")
    started.add_argument("--target", type=Path, required=True, help="target task folder (one subfolder per class)")
    started.add_argument("--output", type=Path, default=Path("params.yaml"), help="file to write (default: params.yaml)")
    started.add_argument("--force", action="store_true", help="replace an existing file")
    started.set_defaults(handler=_init)

    shown = with_params(commands.add_parser(
        "params", help="print the values a run uses: the shipped defaults with params.yaml over them"))
    shown.set_defaults(handler=_params)

    drift = commands.add_parser("drift", help="the drift reference (the data validate compares new data with)")
    drift_commands = drift.add_subparsers(dest="action", required=True)
    accepted = with_params(drift_commands.add_parser(
        "accept", help="adopt the data of the last validate run as the reference (an intended change)"))
    accepted.set_defaults(handler=_drift)

    stages = commands.add_parser("stages", help="list the stages in order")
    stages.set_defaults(handler=_stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)  # before any library is imported
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
