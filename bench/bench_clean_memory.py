"""Clean's peak memory against the number of images: does writing the shards stay flat?

    .venv/bin/python bench/bench_clean_memory.py 300 1500

For each count: JPEG crops of the sample photos (bench_data_format.crops, 200 px) as the target
folder, a tiny source task, ingest and validate in this process, then the clean stage alone in a
fresh subprocess that prints its peak RSS (`ru_maxrss`, KiB; clean's decode workers are processes
of their own, each holding one chunk). Settings: `data.image_size: 160` RGB, no label budget,
near-duplicate detection off (it is not what is measured, and it is slow). Work in a temporary
folder, removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CHILD = """
import resource, sys
from components import clean
from components.core.config import load_params
clean.run(load_params(sys.argv[1]))
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(root: Path, count: int) -> dict:
    from bench_data_format import crops

    from components import ingest, validate
    from components.core.config import load_params
    from tests.conftest import write_class_folders, write_shrunk_params_yaml

    target = root / "target"
    for i, (pixels, label) in enumerate(crops(count, 200, seed=count)):
        (target / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target / f"c{label}" / f"{i:06d}.jpg", quality=92)
    source = write_class_folders(root / "source", ["x", "y"], per_class=12, seed=1)
    params_yaml = write_shrunk_params_yaml(root / "params.yaml", {
        "data.source_dir": str(source), "data.target_dir": str(target), "data.color_mode": "rgb",
        "data.image_size": 160, "clean.target_train_per_class": None, "clean.near_duplicate_distance": -1,
        "validate.min_images_per_class": 1})
    params = load_params(params_yaml)
    ingest.run(params)
    validate.run(params)
    done = subprocess.run([sys.executable, "-c", CHILD, str(params_yaml)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    peak = int(next(line for line in done.stdout.splitlines() if line.startswith("PEAK")).split()[1])
    kept = sum(json.loads((params.paths.clean / "target" / split / "split.json").read_text())["images"]
               for split in ("train", "val", "test"))
    return {"images": count, "kept": kept, "pixel_bytes": kept * 160 * 160 * 3, "clean_peak_kib": peak}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="tlpipe-clean-memory-"))
    try:
        results = [measure(root / str(count), int(count)) for count in (sys.argv[1:] or ["300", "1500"])]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"runs": results, "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
