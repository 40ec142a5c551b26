"""Training throughput: the finetune stage against a plain `model.fit` loop on the same model and data.

    .venv/bin/python bench/bench_throughput.py [--runs 3] [--quick] [--ref HEAD] [--keep DIR]

Set-up, once: a temporary repository, `dvc repro transfer` (ingest .. transfer), so both sides
start from the same cleaned images and the same transferred model. Then, --runs times, in
alternating order, each side in a fresh process (TensorFlow's import is not counted; both import it):

- stage: `components.finetune.run(params)`, the function `tlpipe stage finetune` calls: loads the
  split and the model, trains the head phase then the unfrozen phase (checkpoint and curves every
  epoch), evaluates, saves the model and its report.
- plain: what a user writes with the same recipe: read the same PNGs, load the same model, wrap
  it with the same augmentation, `fit` the head phase, unfreeze, recompile, `fit` again
  (warmup + cosine, label smoothing, balanced class weights, validation every epoch), save.

Early stopping is disabled on both sides (patience = epochs), so both run exactly the same
epochs and steps. Reported: images/s over the whole step (load to save), and over training only
(the stage's own per-phase seconds; the plain side's `fit` calls), and their ratios
(stage / plain, per run; median). --quick: 3 + 3 epochs and a 1-epoch source model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

QUICK = {"source.epochs": 1, "finetune.head_epochs": 3, "finetune.epochs": 3}


def stage_side(root: Path) -> dict:
    from components.core.config import load_params
    from components import finetune

    params = load_params(root / "params.yaml", root=root)
    shutil.rmtree(params.paths.finetune_checkpoint, ignore_errors=True)  # a fresh run, never a resume
    start = time.perf_counter()
    finetune.run(params)
    seconds = time.perf_counter() - start
    report = json.loads(params.paths.finetune_report.read_text())
    phases = report["phases"].values()
    # The stage repeats a small split to min_steps_per_epoch batches (components.training.trainer.fit).
    cfg, train = params.finetune, report["train_images"]
    batch = min(cfg.batch_size, train)
    per_epoch = train * max(1, -(-cfg.min_steps_per_epoch * batch // train))
    return {"images": per_epoch * sum(p["epochs_run"] for p in phases), "seconds": seconds,
            "fit_seconds": sum(p["seconds"] for p in phases),
            "epochs": sum(p["epochs_run"] for p in phases)}


def plain_side(root: Path) -> dict:
    import keras
    import numpy as np
    import yaml

    from plain_keras import augmented, clean_folders, cosine, repeated

    cfg = yaml.safe_load((root / "params.yaml").read_text())
    ft, seed = cfg["finetune"], cfg["seed"]
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    target = clean_folders(root / cfg["paths"]["clean"])["target"]
    model = keras.saving.load_model(root / cfg["paths"]["transferred_model"] / "model.keras")
    (x, y), (vx, vy) = target["train"], target["val"]
    classes = int(y.max()) + 1
    batch = min(ft["batch_size"], len(x))
    x, y = repeated((x, y), batch, ft["min_steps_per_epoch"])
    steps = -(-len(x) // batch)
    counts = np.bincount(target["train"][1], minlength=classes)
    weights = {k: len(target["train"][1]) / (classes * c) for k, c in enumerate(counts)}
    trainer = augmented(model, ft, seed)
    fit_seconds, images = 0.0, 0
    for phase, epochs, rate in (("head", ft["head_epochs"], ft["head_learning_rate"]),
                                ("unfrozen", ft["epochs"], ft["learning_rate"])):
        if phase == "unfrozen":
            backbone = model.get_layer("backbone")
            backbone.trainable = True
            for layer in backbone.layers:
                layer.trainable = True
        trainer.compile(keras.optimizers.Adam(cosine(rate, ft["warmup_epochs"], epochs, steps, ft["cosine_decay"])),
                        keras.losses.CategoricalCrossentropy(label_smoothing=ft["label_smoothing"]),
                        metrics=["accuracy"])
        began = time.perf_counter()
        trainer.fit(x, keras.utils.to_categorical(y, classes), batch_size=batch, epochs=epochs, verbose=0,
                    validation_data=(vx, keras.utils.to_categorical(vy, classes)), class_weight=weights)
        fit_seconds += time.perf_counter() - began
        images += epochs * len(x)
    model.save(Path(tempfile.mkdtemp()) / "model.keras")
    return {"images": images, "seconds": time.perf_counter() - start, "fit_seconds": fit_seconds,
            "epochs": ft["head_epochs"] + ft["epochs"]}


def measure(side: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--side", side, "--repo", str(root)], cwd=root,
                         env=harness.env(PYTHONPATH=f"{root}{os.pathsep}{Path(__file__).parent}"),
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{side} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="3 + 3 fine-tuning epochs, 1 source epoch")
    parser.add_argument("--keep", type=Path, help="set up (or reuse) the repository here and keep it")
    parser.add_argument("--side", choices=("stage", "plain"), help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    harness.cache_bytecode(args.pycache)
    if args.side:
        print(json.dumps((stage_side if args.side == "stage" else plain_side)(args.repo)))
        return

    print(harness.header("Training throughput: finetune stage vs plain model.fit"))
    import yaml

    base = yaml.safe_load((harness.REPO / "params.yaml").read_text())["finetune"]
    overrides = {**(QUICK if args.quick else {})}
    epochs = (overrides.get("finetune.head_epochs", base["head_epochs"]),
              overrides.get("finetune.epochs", base["epochs"]))
    overrides["finetune.patience"] = max(epochs)  # no early stop: both sides run every epoch
    temp = tempfile.TemporaryDirectory(prefix="tlpipe-throughput-")
    root = args.keep or Path(temp.name) / "repo"
    if not (root / "models/transferred/model.keras").is_file():
        harness.make_repo(root, overrides, args.ref)
        harness.timed(["dvc", "repro", "transfer"], root)
    rows, ratios, fit_ratios, loads = [], [], [], []
    for run in range(args.runs):
        order = ("stage", "plain") if run % 2 == 0 else ("plain", "stage")
        result = {side: measure(side, root) for side in order}
        loads.append(os.getloadavg())
        stage, plain = (result[s] for s in ("stage", "plain"))
        if stage["images"] != plain["images"]:
            raise RuntimeError(f"the sides trained different amounts: {stage} vs {plain}")
        speed = {s: (r["images"] / r["seconds"], r["images"] / r["fit_seconds"]) for s, r in result.items()}
        ratios.append(speed["stage"][0] / speed["plain"][0])
        fit_ratios.append(speed["stage"][1] / speed["plain"][1])
        rows.append((run + 1, stage["epochs"], stage["images"], f"{speed['stage'][0]:.0f}", f"{speed['plain'][0]:.0f}",
                     f"{ratios[-1]:.3f}", f"{speed['stage'][1]:.0f}", f"{speed['plain'][1]:.0f}",
                     f"{fit_ratios[-1]:.3f}",
                     f"{loads[-1][0]:.2f}"))
    rows.append(("median", "", "", "", "", f"{harness.median(ratios):.3f}", "", "", f"{harness.median(fit_ratios):.3f}",
                 ""))
    print(harness.table(("run", "epochs", "images", "stage img/s (load..save)", "plain img/s (load..save)",
                         "ratio", "stage img/s (fit)", "plain img/s (fit)", "ratio (fit)", "load 1 min"), rows))
    print(f"\nGoal: ratio >= 0.95. Median ratio (whole step) {harness.median(ratios):.3f}, "
          f"training only {harness.median(fit_ratios):.3f}.")
    temp.cleanup()


if __name__ == "__main__":
    main()
