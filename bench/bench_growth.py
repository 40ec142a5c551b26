"""Growth: time and peak RSS of the whole pipeline as the data grows (1x, 4x, 16x generated images).

    .venv/bin/python bench/bench_growth.py [--scales 1 4 16] [--base 180] [--epochs 1] [--dir /tmp/tlpipe-growth]

Generates two tasks of 5 classes each (source c0..c4, target t0..t4) of 24x24 grayscale PNGs
(a class pattern plus noise), `--base` images per class at 1x (180: the size of the embedded
digits), scaled by each factor; then in a fresh temporary repository per scale runs `dvc repro`
of the whole graph on them (data.source_dir / data.target_dir, no target label budget, so every
stage sees the growth). Reported: wall time, time per 1,000 images, peak RSS of the largest
process (ru_maxrss over the process tree), and the ratios to 1x. --epochs sets every training
phase (default 1; training time is linear in epochs, so fewer epochs only shrink its share).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import harness

CLASSES = 5
SIDE = 24


def generate(root: Path, per_class: int) -> None:
    """root/{source,target}/<class>/*.png, made once and kept (a .complete marker) between runs."""
    import numpy as np
    from PIL import Image

    marker = root / ".complete"
    if marker.is_file():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    for task, prefix, phase in (("source", "c", 0.0), ("target", "t", 1.3)):
        for k in range(CLASSES):
            folder = root / task / f"{prefix}{k}"
            folder.mkdir(parents=True)
            pattern = 127 + 90 * np.sin((k + 1) * 3 * x + phase) * np.cos((k % 3 + 1) * 2 * y)
            for i in range(per_class):
                pixels = np.clip(pattern + rng.normal(0, 20, pattern.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i:06d}.png")
    marker.touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, runs=False)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--base", type=int, default=180, help="images per class at 1x")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every training phase")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tlpipe-growth"), help="generated images, kept")
    args = parser.parse_args()
    harness.cache_bytecode(args.pycache)
    print(harness.header("Growth: the whole pipeline at growing data"))
    rows, first = [], None
    for scale in args.scales:
        data = args.dir / f"x{scale}_{args.base}"
        generate(data, args.base * scale)
        images = 2 * CLASSES * args.base * scale
        overrides = {"data.source_dir": str(data / "source"), "data.target_dir": str(data / "target"),
                     "clean.target_train_per_class": None, "source.epochs": args.epochs,
                     "finetune.head_epochs": args.epochs, "finetune.epochs": args.epochs,
                     "evaluate.min_accuracy": 0.0, "evaluate.min_macro_f1": 0.0}
        with tempfile.TemporaryDirectory(prefix="tlpipe-growth-") as temp:
            result = harness.timed(["dvc", "repro"], harness.make_repo(Path(temp) / "repo", overrides, args.ref))
        first = first or (result, images)
        rows.append((f"{scale}x", f"{images:,}", result.seconds, 1000 * result.seconds / images,
                     result.seconds / first[0].seconds, f"{images / first[1]:.0f}", f"{result.peak_rss_mib:.0f}",
                     result.peak_rss_mib / first[0].peak_rss_mib, f"{result.load[0]:.2f}"))
        print("done:", rows[-1], file=sys.stderr, flush=True)  # a long run keeps what it measured
    print(harness.table(("scale", "images", "`dvc repro` s", "s per 1k images", "time ratio", "data ratio",
                         "peak RSS MiB", "RSS ratio", "load 1 min"), rows))
    print("\nExpected: time ratio grows at most like the data ratio (fixed start-up costs make it grow "
          "less); RSS ratio near 1.")


if __name__ == "__main__":
    main()
