"""Clean-stage throughput and memory: decode + normalize + write generated image trees in a process pool.

    .venv/bin/python bench/bench_clean.py [--sizes 1000 10000 50000] [--workers 0] [--dir /tmp/tlpipe-bench]

For each size: generate a class-per-subfolder tree of 96x96 RGB JPEGs (10 classes), then, in a
fresh Python process, stream it through components.data.images.normalize_files (the function the clean
stage calls) at params.yaml's data.image_size / data.color_mode. Reported per size: images/s of
the normalize step, peak RSS of the driving process and of the largest worker (ru_maxrss), and
the 50k/1k (largest/smallest) peak-RSS ratio. Prints a JSON document.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10


def _make(args: tuple[Path, int]) -> None:
    import numpy as np
    from PIL import Image

    path, index = args
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:96, 0:96] / 96.0
    base = 127 + 100 * np.sin((index % CLASSES + 1) * 3 * x) * np.cos(2 * y)
    pixels = np.stack([base, base[::-1], base.T], axis=-1) + rng.normal(0, 12, (96, 96, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=85)


def generate(root: Path, count: int) -> None:
    """`count` images under root/<class>/, made in parallel; kept between runs when complete."""
    marker = root / ".complete"
    if marker.is_file():
        return
    shutil.rmtree(root, ignore_errors=True)
    for label in range(CLASSES):
        (root / f"class_{label}").mkdir(parents=True)
    jobs = ((root / f"class_{i % CLASSES}" / f"img_{i:06d}.jpg", i) for i in range(count))
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_make, jobs, chunksize=256):
            pass
    marker.touch()


def _jobs(root: Path, out: Path) -> Iterator[tuple[Path, str, Path]]:
    """Jobs straight off the directory listing: nothing about all images is held at once."""
    import hashlib

    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        with os.scandir(folder) as entries:
            for entry in entries:
                data = Path(entry.path).read_bytes()  # the manifest's hash, as validate would have written it
                yield Path(entry.path), hashlib.sha256(data).hexdigest(), out / folder.name / f"{entry.name}.png"


def measure(root: Path, out: Path, workers: int) -> dict[str, float]:
    """Run in a fresh process (see main): normalize every image of `root` into `out`."""
    sys.path.insert(0, str(REPO))
    from components.core.config import load_params
    from components.data.images import normalize_files

    params = load_params(REPO / "params.yaml", root=REPO)
    shutil.rmtree(out, ignore_errors=True)
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    changed = normalize_files(_jobs(root, out), params.data.image_size, params.data.pil_mode, workers)
    seconds = time.perf_counter() - start
    written = sum(len(os.listdir(folder)) for folder in out.iterdir())
    assert not changed and written == sum(len(os.listdir(f)) for f in root.iterdir() if f.is_dir())
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {
        "images": written, "workers": workers, "seconds": round(seconds, 2),
        "images_per_s": round(written / seconds, 1),
        "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, 1),
        "peak_rss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--workers", type=int, default=0, help="0 = one per core")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tlpipe-bench"))
    parser.add_argument("--measure", nargs=2, type=Path, help=argparse.SUPPRESS)  # internal: ROOT OUT
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.workers)))
        return

    results = []
    for size in args.sizes:
        root = args.dir / f"images_{size}"
        start = time.perf_counter()
        generate(root, size)
        generated = time.perf_counter() - start
        run = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--measure", str(root),
                              str(args.dir / f"out_{size}")], capture_output=True, text=True, check=True)
        results.append({**json.loads(run.stdout), "generate_seconds": round(generated, 1)})
        print(json.dumps(results[-1]), file=sys.stderr)
    smallest, largest = results[0], results[-1]
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "results": results,
        "peak_rss_main_ratio_largest_to_smallest": round(largest["peak_rss_main_mib"] / smallest["peak_rss_main_mib"], 3),
        "peak_rss_worker_ratio_largest_to_smallest":
            round(largest["peak_rss_worker_mib"] / smallest["peak_rss_worker_mib"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
