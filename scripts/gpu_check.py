"""GPU check: the fine-tune stage on a host with JAX and no TensorFlow, and its speed against a plain model.fit.

Run through scripts/gpu_check.sh (the one documented command). Two steps:

- `prepare`, here, in the project's .venv: downloads the few wheels the fine-tune stage needs beyond
  JAX and numpy (versions from requirements.lock) into .whl/, and runs the real stages into
  .cache/gpu_check/: the default pipeline up to `transfer` (digits at 16 px, the small transferred
  model) and `clean` again at 224 px RGB. About 20 MiB of wheels and 25 MiB of data: both travel.
- `run`, on the GPU host: unpacks the wheels into .cache/gpu_check_runs/ (no pip, no network), then
  1. fine-tunes the carried default model exactly as `dvc repro` would (precision auto: bf16 on a GPU);
  2. for each backbone at 224 px: the fine-tune stage, then a plain `model.fit` of the same model on
     the same in-memory arrays, batch size and precision; prints the steady-state images/second of
     both (trainer.Throughput: training steps only, after the compiling first epoch) and their ratio.
  The 224 px models start from random weights, built on the host (speed does not depend on them;
  ResNet50's 94 MB file would not travel). Augmentation is off, so both sides do the same math.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRIED = REPO / ".cache" / "gpu_check"  # git-ignored; travels with the command
RUNS = REPO / ".cache" / "gpu_check_runs"  # what the check unpacks and writes: never carried
WHEELS = REPO / ".whl"
# What the fine-tune stage imports beyond what a JAX install brings (jax, jaxlib, numpy, ml-dtypes, scipy).
PACKAGES = ("keras", "optree", "namex", "absl-py", "h5py", "rich", "markdown-it-py", "mdurl", "pygments",
            "packaging", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
            "pyyaml", "pillow")
DEFAULT = "default"  # the default pipeline's cleaned target task and transferred model
RGB224 = "rgb224"  # the same digits, cleaned at 224 px RGB


# Set-up on this machine ---------------------------------------------------------------------------

def _pins() -> list[str]:
    wanted = {name.lower() for name in PACKAGES}
    pins = [line.split(";")[0].strip() for line in (REPO / "requirements.lock").read_text().splitlines()
            if "==" in line and line.split("==")[0].strip().lower() in wanted]
    missing = wanted - {pin.split("==")[0].lower() for pin in pins}
    if missing:
        sys.exit(f"gpu_check: requirements.lock has no pin for {', '.join(sorted(missing))}")
    return pins


def _download(python_version: str, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_28_x86_64", "--dest", str(dest), *_pins()], check=True)


def _run_stages(root: Path, overrides: dict[str, object], stages: tuple[str, ...]) -> None:
    from components.core.config import load_params, with_overrides
    from components.core.graph import stage_module

    params = with_overrides(load_params(REPO / "params.yaml", root=root), overrides)
    for name in stages:
        print(f"prepare: {name} in {root}", flush=True)
        stage_module(name).run(params)


def _keep_only(root: Path, keep: tuple[str, ...]) -> None:
    """Delete everything under `root` but the `keep` paths (what the fine-tune stage reads)."""
    kept = root.with_name(f"{root.name}.kept")
    for path in keep:
        (kept / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).rename(kept / path)
    shutil.rmtree(root)
    kept.rename(root)


def prepare(args: argparse.Namespace) -> None:
    _download(args.python_version, args.wheels)
    if args.wheels_only:
        return
    shutil.rmtree(CARRIED, ignore_errors=True)
    target = ("data/clean/target/train", "data/clean/target/val", "data/clean/target/classes.json")
    _run_stages(CARRIED / DEFAULT, {}, ("ingest", "validate", "clean", "source", "transfer"))
    _keep_only(CARRIED / DEFAULT, (*target, "models/transferred"))
    # Splits are raw uint8 shards (150 KB an image at 224 px RGB): a smaller label budget and
    # validation share keep them about 25 MB, inside the 64 MiB that travels with the wheels. The
    # stage repeats the train split to its epoch length, so the speed measured does not depend on it.
    _run_stages(CARRIED / RGB224, {"data.image_size": 224, "data.color_mode": "rgb",
                                   "clean.target_train_per_class": 25, "clean.val_fraction": 0.05},
                ("ingest", "validate", "clean"))
    _keep_only(CARRIED / RGB224, target)
    size = sum(p.stat().st_size for p in [*CARRIED.rglob("*"), *args.wheels.rglob("*")] if p.is_file())
    print(f"prepare: {size / 2**20:.1f} MiB to carry: {args.wheels} and {CARRIED}")


# On the GPU host ----------------------------------------------------------------------------------

def _fits(wheel: Path) -> bool:
    """Whether a wheel's python/abi tags fit this interpreter (linux x86_64 is taken for granted)."""
    python, abi = wheel.name[:-4].split("-")[-3:-1]
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if abi == "none":
        return python.startswith("py3") or python == here
    if abi == "abi3":
        return sys.version_info >= (3, int(python[3:]))
    return abi == here


def install(wheels: Path, site: Path) -> None:
    """Unpack the carried wheels that fit this Python into `site` and put it first on sys.path (no pip)."""
    chosen = sorted(w for w in wheels.glob("*.whl") if _fits(w))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in chosen}
    missing = {p.replace("_", "-") for p in PACKAGES} - names
    if missing:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        sys.exit(f"gpu_check: {wheels} has no wheel for Python {version} of {', '.join(sorted(missing))}: "
                 f"run scripts/gpu_check.sh prepare --python-version {version} (on a machine with the network)")
    stamp = site / "installed.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != [w.name for w in chosen]:
        shutil.rmtree(site, ignore_errors=True)
        for wheel in chosen:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        stamp.write_text(json.dumps([w.name for w in chosen]))
    sys.path.insert(0, str(site))


def _default_run(work: Path, epochs: int | None) -> dict:
    from components import finetune
    from components.core.config import load_params, with_overrides

    carried = CARRIED / DEFAULT
    overrides: dict[str, object] = {"paths.clean": str(carried / "data/clean"),
                                    "paths.transferred_model": str(carried / "models/transferred")}
    if epochs is not None:
        overrides["finetune.epochs"] = epochs
    params = with_overrides(load_params(REPO / "params.yaml", root=work / DEFAULT), overrides)
    started = time.perf_counter()
    finetune.run(params)
    report = json.loads(params.paths.finetune_report.read_text())
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


def _speed(work: Path, backbone: str, args: argparse.Namespace) -> dict:
    """The fine-tune stage, then a plain model.fit of the same starting model, on the same arrays."""
    import keras
    import numpy as np

    from components import finetune
    from components.core.config import load_params, with_overrides
    from components.data.dataset import class_names, load_split
    from components.training.models import build_model, load_model_dir, save_model_dir
    from components.training.trainability import set_phase
    from components.training.trainer import Throughput, with_precision

    clean = CARRIED / RGB224 / "data/clean"
    params = with_overrides(load_params(REPO / "params.yaml", root=work / backbone), {
        "model.backbone": backbone, "data.image_size": args.image_size, "data.color_mode": "rgb",
        "paths.clean": str(clean), "finetune.precision": args.precision,
        "finetune.head_epochs": 0, "finetune.epochs": args.epochs, "finetune.patience": args.epochs + 1,
        "finetune.unfreeze_top": -1, "finetune.batch_size": args.batch_size,
        "finetune.min_steps_per_epoch": args.steps, "finetune.augment_rotation": 0.0,
        "finetune.augment_zoom": 0.0, "finetune.augment_contrast": 0.0,
    })
    classes = class_names(clean, "target")
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, params.data, len(classes), bn_inference=True)
    save_model_dir(model, classes, params.paths.transferred_model)
    keras.backend.clear_session()

    finetune.run(params)
    report = json.loads(params.paths.finetune_report.read_text())
    stage = report["phases"]["unfrozen"]
    keras.backend.clear_session()

    # Plain Keras: the same model, precision and trainable layers, the train split repeated to the
    # stage's epoch length, one fit, no callbacks but the clock.
    model, _ = load_model_dir(params.paths.transferred_model)
    trainee = with_precision(model, report["precision"])
    set_phase(trainee, "unfrozen", -1)
    train = load_split(clean, "target", "train")
    repeats = max(1, math.ceil(args.steps * args.batch_size / len(train)))
    x = np.concatenate([train.batch(0, len(train))] * repeats)  # in memory on purpose: the baseline
    y = np.eye(len(classes), dtype="float32")[np.concatenate([train.y] * repeats)]
    trainee.compile(optimizer=keras.optimizers.Adam(params.finetune.learning_rate),
                    loss="categorical_crossentropy", metrics=["accuracy"])
    clock = Throughput(len(x))
    trainee.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0, callbacks=[clock])
    keras.backend.clear_session()
    plain = round(clock.images_per_second, 1)
    return {"backbone": backbone, "image_size": args.image_size, "batch_size": args.batch_size,
            "precision": report["precision"], "compute_dtype": report["compute_dtype"],
            "images_per_epoch": len(x), "epochs": args.epochs,
            "stage_images_per_second": stage["images_per_second"], "plain_images_per_second": plain,
            "ratio": round(stage["images_per_second"] / plain, 3) if plain else None,
            "stage_seconds": stage["seconds"], "plain_epoch_seconds": [round(s, 3) for s in clock.seconds]}


def run(args: argparse.Namespace) -> int:
    install(args.wheels, RUNS / "site")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from components.training.trainer import deterministic_xla

    deterministic_xla()  # as the stage run by dvc repro has it: before JAX lists its devices, below
    import jax
    import keras

    devices = [str(d) for d in jax.devices()]
    on_accelerator = any(d.platform != "cpu" for d in jax.devices())
    try:
        import tensorflow  # noqa: F401
        tensorflow_here = True
    except ImportError:
        tensorflow_here = False
    print(f"gpu_check: python {sys.version.split()[0]}, keras {keras.__version__} on {keras.backend.backend()}, "
          f"jax {jax.__version__}, devices {', '.join(devices)}; tensorflow importable: {tensorflow_here}", flush=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    results: dict = {"devices": devices, "python": sys.version.split()[0], "backend": keras.backend.backend(),
                     "tensorflow_importable": tensorflow_here, "speed": []}
    if args.default_epochs != 0:
        report = _default_run(work, args.default_epochs)
        results["default"] = {k: report[k] for k in ("precision", "compute_dtype", "kept_phase", "val_loss",
                                                     "val_accuracy", "phases", "wall_seconds")}
        phase = report["phases"]["unfrozen"]
        print(f"gpu_check: default run: {report['precision']} (compute {report['compute_dtype']}), val accuracy "
              f"{report['val_accuracy']:.4f}, {phase['epochs_run']} epochs, {phase['images_per_second']:.1f} "
              f"images/second, {report['wall_seconds']:.1f} s in all", flush=True)
    for backbone in args.backbones:
        result = _speed(work, backbone, args)
        results["speed"].append(result)
        print(f"gpu_check: {backbone} at {args.image_size} px, batch {args.batch_size}, {result['precision']}: "
              f"stage {result['stage_images_per_second']:.1f} images/second, plain model.fit "
              f"{result['plain_images_per_second']:.1f}, ratio {result['ratio']}", flush=True)
    print("\n| backbone | px | batch | precision | stage images/s | plain model.fit images/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results["speed"]:
        print(f"| {r['backbone']} | {r['image_size']} | {r['batch_size']} | {r['precision']} | "
              f"{r['stage_images_per_second']:.1f} | {r['plain_images_per_second']:.1f} | {r['ratio']} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    dtypes = {d for r in [results.get("default", {}), *results["speed"]] for d in r.get("compute_dtype", [])}
    if on_accelerator and args.precision == "auto" and not dtypes & {"bfloat16", "float16"}:
        print("gpu_check: on an accelerator, but nothing computed in bf16/fp16 (finetune.precision?)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("prepare", help="download the wheels and write the data to carry (here)")
    setup.add_argument("--python-version", default="3.12", help="the GPU host's Python (default 3.12)")
    setup.add_argument("--wheels", type=Path, default=WHEELS)
    setup.add_argument("--wheels-only", action="store_true", help="download the wheels, leave the data")
    check = commands.add_parser("run", help="the check itself (on the GPU host)")
    check.add_argument("--wheels", type=Path, default=WHEELS)
    check.add_argument("--backbones", nargs="+", default=["mobilenet_v3_large", "resnet50"])
    check.add_argument("--image-size", type=int, default=224)
    check.add_argument("--batch-size", type=int, default=256)
    check.add_argument("--steps", type=int, default=30,
                       help="at least this many training steps an epoch (the train split repeats)")
    check.add_argument("--epochs", type=int, default=3, help="the first compiles and is not timed")
    check.add_argument("--precision", default="auto", help="finetune.precision of the speed runs")
    check.add_argument("--default-epochs", type=int, default=None,
                       help="epochs of the default run (default: params.yaml's; 0 skips it)")
    check.add_argument("--work", default=str(RUNS / "work"), help="where the runs write (deleted first)")
    check.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default: $OUT)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # components/, wherever this is started from
    if args.command == "prepare":
        prepare(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
