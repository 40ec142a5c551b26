"""Real-sized data: the whole `dvc repro` and each stage on photo crops at 2k, 10k and 40k images.

    .venv/bin/python bench/bench_real.py [--sizes 2000 10000 40000] [--image-size 96] [--epochs 1]
        [--plain-at 10000] [--cache-types-at 40000] [--dir /tmp/tlpipe-real] [--ref COMMIT] [--pycache DIR]

Per size: bench/photos.py writes the images (160 px RGB crops of ten shipped photographs, 60 %
source task, 40 % target task; made once and kept in --dir), a fresh git + DVC repository gets
the project's code with params pointing at them (rgb, data.image_size, every training phase
--epochs, no target label budget, gates at 0 so a 1-epoch model is measured rather than refused,
no transfer-vs-scratch baseline, no int8/optimized variants), and then:

- `dvc repro ingest`, then `dvc repro` (the rest): wall time and peak RSS. Every `tlpipe stage`
  process records its own wall time, peak RSS and CPU time (bench/stage_meter/sitecustomize.py),
  so DVC's own bookkeeping is the whole minus the stages, and ingest's is hashing data/raw.
- data/raw's bytes and files (what ingest copied), data/clean's bytes and files.
- a no-op `dvc repro` (nothing changed).
- floors: decode + resize of 2,000 of the same files in a tight loop (as many processes as clean
  uses), against clean's images/s; `model.fit` of the pipeline's own model on an in-memory uint8
  array of the target training split's size and batch, against the fine-tune stage's images/s.
- at --cache-types-at sizes (at every size with --ingest-only, and nothing else), `dvc repro ingest` in fresh repositories under each DVC cache link
  type (--cache-types; reflink,copy is DVC's default): time, and data/raw + cache on disk.
- at --plain-at images, `bench/plain_keras.py --folders` (the same training on the same images, a
  hand-written script) beside the whole `dvc repro`.

Prints markdown (docs/benchmarks-real.md holds a run) and writes --dir/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import harness

BENCH = Path(__file__).resolve().parent
METER = BENCH / "stage_meter"
FLOOR_FILES = 2000

FIT_FLOOR = """
import json, sys, time
import keras, numpy as np
from components.core.config import load_params
from components.training.models import build_model
params = load_params("params.yaml")
train, val, classes = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
side, channels, batch = params.data.image_size, params.data.channels, params.finetune.batch_size
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (train, side, side, channels), dtype=np.uint8)
y = rng.integers(0, classes, train)
vx = rng.integers(0, 256, (val, side, side, channels), dtype=np.uint8)
vy = rng.integers(0, classes, val)
keras.utils.set_random_seed(params.seed)
model = build_model(params.model, params.data, classes, bn_inference=False)
model.compile(keras.optimizers.Adam(params.finetune.learning_rate), "sparse_categorical_crossentropy",
              metrics=["accuracy"])
start = time.perf_counter()
model.fit(x, y, batch_size=batch, epochs=1, validation_data=(vx, vy), verbose=0)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "images_per_second": train / seconds}))
"""


def overrides(photos: Path, image_size: int, epochs: int) -> dict[str, object]:
    return {
        "data.source_dir": str(photos / "source"), "data.target_dir": str(photos / "target"),
        "data.color_mode": "rgb", "data.image_size": image_size,
        "clean.target_train_per_class": None,
        "source.epochs": epochs, "finetune.head_epochs": epochs, "finetune.epochs": epochs,
        "evaluate.min_accuracy": 0.0, "evaluate.min_macro_f1": 0.0, "scratch.enabled": False,
        "evaluate.min_transfer_gain": None, "export.variants": [],
    }


def tree(path: Path) -> tuple[int, int]:
    """(bytes, files) under `path`."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return sum(p.stat().st_size for p in files), len(files)


def _decode(job: tuple[str, int]) -> None:
    from PIL import Image

    path, side = job
    with Image.open(path) as image:
        image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR).tobytes()


def decode_floor(photos: Path, side: int, workers: int) -> float:
    """Images/s of decode + resize of the first FLOOR_FILES files (sorted) in a tight loop."""
    files = sorted(str(p) for p in photos.rglob("*") if p.is_file() and not p.name.startswith("."))[:FLOOR_FILES]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode, [(files[0], side)] * workers))  # start the workers untimed
        start = time.perf_counter()
        list(pool.map(_decode, [(f, side) for f in files], chunksize=64))
        return len(files) / (time.perf_counter() - start)


def fit_floor(repo: Path, train: int, val: int, classes: int) -> dict:
    done = subprocess.run([sys.executable, "-c", FIT_FLOOR, str(train), str(val), str(classes)], cwd=repo,
                          env=harness.env(PYTHONPATH=str(repo)), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def metered(repo: Path, name: str) -> dict[str, str]:
    return {"TLPIPE_STAGE_METER": str(repo / f".meter-{name}.jsonl"), "PYTHONPATH": f"{repo}{os.pathsep}{METER}"}


def read_meter(repo: Path, name: str) -> list[dict]:
    """One record per stage process. Worker processes recorded too by an older meter are dropped: in a
    run of records of one stage, only those whose process waited for children are the stage's own."""
    path = repo / f".meter-{name}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    kept, start = [], 0
    for end in range(1, len(lines) + 1):
        if end == len(lines) or lines[end]["stage"] != lines[start]["stage"]:
            group = lines[start:end]
            parents = [line for line in group if line["children_peak_rss_mib"] > 0]
            kept += parents or group
            start = end
    return kept


def measure(size: int, args: argparse.Namespace) -> dict:
    from photos import write_photo_folders

    photos = args.dir / f"photos-{size}"
    if not (photos / ".complete").is_file():
        write_photo_folders(photos, size)
        (photos / ".complete").touch()
    repo = harness.make_repo(args.dir / f"repo-{size}", overrides(photos, args.image_size, args.epochs), args.ref)
    data_only = size in args.data_only_at
    target = ["clean"] if data_only else []  # ingest, validate and clean only: the stages that read every file
    first = harness.timed(["dvc", "repro", "ingest"], repo, metered(repo, "run"))
    rest = harness.timed(["dvc", "repro", *target], repo, metered(repo, "run"))
    noop = harness.timed(["dvc", "repro", *target], repo, metered(repo, "noop"))
    runs = read_meter(repo, "run")
    stages = {}
    for run in runs:  # the first ingest (the copy), not the second `dvc repro`'s check of unchanged inputs
        stages.setdefault(run["stage"], run)
    whole = first.seconds + rest.seconds
    reports = {name: json.loads(path.read_text()) for name in ("finetune", "metrics", "quarantine")
               if (path := repo / "reports" / f"{name}.json").is_file()}
    finetune, metrics = reports.get("finetune", {}), reports.get("metrics", {})
    result = {
        "images": size,
        "data_only": data_only,
        "whole_seconds": round(whole, 2),
        "whole_cpu_seconds": round(first.cpu_seconds + rest.cpu_seconds, 2),  # DVC and every stage, all processes
        "whole_peak_rss_mib": round(max(first.peak_rss_mib, rest.peak_rss_mib), 1),
        "stages": stages,
        "dvc_seconds": round(whole - sum(run["seconds"] for run in runs), 2),
        "dvc_ingest_seconds": round(first.seconds - stages["ingest"]["seconds"], 2),
        "noop_seconds": round(noop.seconds, 2),
        "noop_cpu_seconds": round(noop.cpu_seconds, 2),  # the load of other processes moves it less
        "noop_ingest_seconds": sum(run["seconds"] for run in read_meter(repo, "noop")),
        "raw_bytes_files": tree(repo / "data" / "raw"),
        "clean_bytes_files": tree(repo / "data" / "clean"),
        "input_bytes_files": tree(photos),
        "accuracy": metrics.get("accuracy"),
        "quarantined": len(reports["quarantine"].get("quarantined", [])),
        "finetune": {"train_images": finetune.get("train_images"), "val_images": finetune.get("val_images"),
                     "phases": {k: v.get("images_per_second") for k, v in finetune.get("phases", {}).items()}},
        "decode_floor_images_per_second": round(decode_floor(photos, args.image_size, os.cpu_count() or 1), 1),
        "load": [first.load, rest.load, noop.load],
    }
    if finetune:
        classes = len(metrics.get("per_class", {})) or 5
        result["fit_floor"] = fit_floor(repo, finetune["train_images"], finetune["val_images"], classes)
    if size in args.cache_types_at:
        result["ingest_cache_types"] = ingest_cache_types(size, args)
    if size == args.plain_at and not data_only:
        plain = harness.timed([sys.executable, str(BENCH / "plain_keras.py"), "--params", "params.yaml",
                               "--folders", str(photos), "--json"], repo)
        result["plain_keras"] = {"seconds": round(plain.seconds, 2), "peak_rss_mib": round(plain.peak_rss_mib, 1),
                                 "cpu_seconds": round(plain.cpu_seconds, 2),
                                 **json.loads(plain.stdout.strip().splitlines()[-1])}
    return result


def disk_mib(path: Path) -> float:
    """Space used under `path`, a file hard-linked twice counted once (du)."""
    done = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return round(int(done.stdout.split()[0]) / 1024, 1)


def ingest_cache_types(size: int, args: argparse.Namespace) -> list[dict]:
    """`dvc repro ingest` under DVC's cache link types: time, DVC's share, and the disk it takes."""
    photos = args.dir / f"photos-{size}"
    rows = []
    for cache_type in args.cache_types:
        repo = harness.make_repo(args.dir / f"ingest-{size}", overrides(photos, args.image_size, args.epochs), args.ref)
        subprocess.run(["dvc", "config", "cache.type", cache_type], cwd=repo, env=harness.env(), check=True)
        run = harness.timed(["dvc", "repro", "ingest"], repo, metered(repo, "ingest"))
        own = read_meter(repo, "ingest")[0]["seconds"]
        rows.append({"images": size, "cache_type": cache_type, "seconds": round(run.seconds, 2),
                     "ingest_seconds": own, "dvc_seconds": round(run.seconds - own, 2),
                     "input_mib": disk_mib(photos), "raw_and_cache_mib": disk_mib(repo),
                     "load": run.load})
    return rows


def targets(results: list[dict]) -> str:
    """Issue 12's targets, each with its measured value beside it (largest size against the smallest)."""
    by_size = {r["images"]: r for r in results}
    small, large = by_size[min(by_size)], by_size[max(by_size)]
    span = f"{large['images']} vs {small['images']}"
    rows = []

    def verdict(value: float | None, bound: float, below: bool = True) -> str:
        if value is None:
            return "not measured"
        return "met" if (value <= bound if below else value >= bound) else "NOT met"

    for name in harness.stage_names():
        a, b = small["stages"].get(name), large["stages"].get(name)
        if not (a and b) or large is small:
            rows.append([f"peak RSS of {name}, {span}", "<= 1.3x", "not measured", "not measured"])
            continue
        ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
        rows.append([f"peak RSS of {name}, {span}", "<= 1.3x",
                     f"{ratio:.2f}x ({a['peak_rss_mib']:.0f} -> {b['peak_rss_mib']:.0f} MiB)", verdict(ratio, 1.3)])
        per = (b["seconds"] / large["images"]) / (a["seconds"] / small["images"])
        cpu = (b["cpu_seconds"] / large["images"]) / (a["cpu_seconds"] / small["images"])
        rows.append([f"time per image of {name}, {span}", "<= 1.2x", f"{per:.2f}x wall, {cpu:.2f}x CPU",
                     verdict(cpu, 1.2) + " (CPU)"])
    fits = [(r["images"], r["finetune"]["phases"].get("unfrozen"), r.get("fit_floor", {}).get("images_per_second"))
            for r in results]
    for n, stage, floor in fits:
        if stage and floor:
            rows.append([f"fine-tuning img/s vs in-memory model.fit, {n} images", ">= 0.95x",
                         f"{stage / floor:.2f}x ({stage:.0f} vs {floor:.0f} img/s)", verdict(stage / floor, 0.95, False)])
    for r in results:
        rows.append([f"no-op dvc repro, {r['images']} images", "<= 5 s (at 40k)", f"{r['noop_seconds']:.2f} s",
                     verdict(r["noop_seconds"], 5.0) if r["images"] >= 40000 else "(size below 40k)"])
    for r in results:
        if "plain_keras" in r and not r.get("data_only"):
            ratio = r["whole_seconds"] / r["plain_keras"]["seconds"]
            cpu = r.get("whole_cpu_seconds", 0) / r["plain_keras"].get("cpu_seconds", 0) \
                if r["plain_keras"].get("cpu_seconds") else None
            rows.append([f"whole dvc repro vs plain_keras.py, {r['images']} images", "<= 1.15x",
                         f"{ratio:.2f}x wall ({r['whole_seconds']:.0f} vs {r['plain_keras']['seconds']:.0f} s)"
                         + (f", {cpu:.2f}x CPU" if cpu else ""), verdict(ratio, 1.15)])
            rows.append([f"test accuracy, pipeline vs plain_keras.py, {r['images']} images", "unchanged",
                         f"{r['accuracy']} vs {r['plain_keras']['test_accuracy']}", "(1 epoch per phase)"])
    return harness.table(["target (issue 12)", "bound", "measured", "verdict"], rows)


def ingest_table(results: list[dict]) -> str:
    ingest = [row for r in results for row in r.get("ingest_cache_types", [])]
    if not ingest:
        return ""
    return "\n".join(["#### Ingest under DVC's cache link types (`dvc config cache.type`)", "", harness.table(
        ["images", "cache.type", "dvc repro ingest s", "ingest's copy s", "DVC's hashing and caching s",
         "your folders MiB", "data/raw + .dvc/cache MiB on disk"],
        [[r["images"], r["cache_type"], r["seconds"], r["ingest_seconds"], r["dvc_seconds"], r["input_mib"],
          r["raw_and_cache_mib"]] for r in ingest]), ""])


def markdown(everything: list[dict], args: argparse.Namespace) -> str:
    results = [r for r in everything if "stages" in r]
    out = [harness.header(f"Real-sized data: {', '.join(str(r['images']) for r in results)} photo crops, "
                          f"{args.image_size} px in the model, {args.epochs} epoch(s) per phase")]
    out += ["#### Targets", "", targets(results), ""]
    names = harness.stage_names()
    rows = []
    for r in results:
        n = r["images"]
        for name in names:
            s = r["stages"].get(name)
            if s:
                rows.append([n, name, s["seconds"], round(1000 * s["seconds"] / n, 2), s["peak_rss_mib"],
                             s.get("rss_anon_mib", "-"), s.get("rss_file_mib", "-"),
                             s["children_peak_rss_mib"], s["cpu_seconds"], round(1000 * s["cpu_seconds"] / n, 2)])
        rows.append([n, "**whole dvc repro**" + (" (ingest, validate, clean)" if r["data_only"] else ""), r["whole_seconds"], round(1000 * r["whole_seconds"] / n, 2),
                     r["whole_peak_rss_mib"], "", "", "", "", ""])
        rows.append([n, "DVC's own (whole - stages)", r["dvc_seconds"], round(1000 * r["dvc_seconds"] / n, 2), "", "",
                     "", "", "", ""])
        rows.append([n, "no-op dvc repro (ingest's check of the folders inside)", r["noop_seconds"],
                     f"ingest {r['noop_ingest_seconds']:.2f} s", "", "", "", "", r.get("noop_cpu_seconds", ""), ""])
    out += ["#### Stages", "", harness.table(["images", "stage", "seconds", "ms/image", "peak RSS MiB",
                                               "RssAnon peak MiB", "RssFile peak MiB", "workers' peak MiB", "CPU s",
                                               "CPU ms/image"], rows), ""]
    rows = [[r["images"], round(r["input_bytes_files"][0] / 2**20, 1), r["raw_bytes_files"][1],
             round(r["raw_bytes_files"][0] / 2**20, 1), r["stages"]["ingest"]["seconds"], r["dvc_ingest_seconds"],
             r["clean_bytes_files"][1], round(r["clean_bytes_files"][0] / 2**20, 1)] for r in results]
    out += ["#### Ingest and the data on disk", "", harness.table(
        ["images", "input MiB", "data/raw files", "data/raw MiB written", "ingest s", "DVC hashing+caching of raw s",
         "data/clean files", "data/clean MiB"], rows), ""]
    rows = []
    for r in results:
        clean = r["images"] / r["stages"]["clean"]["seconds"]
        phases = r["finetune"]["phases"]
        fit = r.get("fit_floor", {}).get("images_per_second")
        rows.append([r["images"], round(clean, 1), r["decode_floor_images_per_second"],
                     round(clean / r["decode_floor_images_per_second"], 2), phases.get("head", "-"),
                     phases.get("unfrozen", "-"), round(fit, 1) if fit else "-",
                     round(phases["unfrozen"] / fit, 2) if fit and phases.get("unfrozen") else "-",
                     r["accuracy"] if r["accuracy"] is not None else "-", r["quarantined"]])
    out += ["#### Throughput against its floors", "", harness.table(
        ["images", "clean img/s", "decode+resize floor img/s", "ratio", "finetune head img/s",
         "finetune unfrozen img/s", "in-memory model.fit img/s", "ratio (unfrozen)", "test accuracy",
         "quarantined"], rows), ""]
    for r in results:
        if "plain_keras" in r and not r.get("data_only"):
            p = r["plain_keras"]
            out += [f"#### Whole `dvc repro` against bench/plain_keras.py at {r['images']} images", "",
                    harness.table(["run", "seconds", "CPU s", "peak RSS MiB", "test accuracy"],
                                  [["dvc repro (every stage)", r["whole_seconds"], r.get("whole_cpu_seconds", "-"),
                                    r["whole_peak_rss_mib"], r["accuracy"]],
                                   ["plain_keras.py --folders", p["seconds"], p.get("cpu_seconds", "-"), p["peak_rss_mib"],
                                    p["test_accuracy"]],
                                   ["ratio", round(r["whole_seconds"] / p["seconds"], 2),
                                    round(r["whole_cpu_seconds"] / p["cpu_seconds"], 2) if p.get("cpu_seconds") else "",
                                    "", ""]]), ""]
    out.append(ingest_table(everything))
    out.append(f"Load (1-min average) during the runs: {harness.load_text([l for r in results for l in r['load']])}.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 40000])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--plain-at", type=int, default=10000)
    parser.add_argument("--ingest-only", action="store_true",
                        help="only `dvc repro ingest` under each DVC cache link type, at every size")
    parser.add_argument("--data-only-at", type=int, nargs="*", default=[],
                        help="sizes at which only ingest, validate and clean run (`dvc repro clean`)")
    parser.add_argument("--cache-types-at", type=int, nargs="*", default=[40000],
                        help="sizes at which ingest also runs under each DVC cache link type")
    parser.add_argument("--cache-types", nargs="+", default=["reflink,copy", "hardlink"],
                        help="DVC cache.type values to compare ingest under (reflink,copy is DVC's default)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tlpipe-real"))
    harness.add_common_arguments(parser, runs=False)
    parser.add_argument("--report", type=Path, nargs="*",
                        help="print the markdown of earlier runs' results.json files instead of running")
    args = parser.parse_args()
    if args.report:
        print(markdown([r for path in args.report for r in json.loads(path.read_text())], args))
        return
    harness.cache_bytecode(args.pycache)
    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    if args.ingest_only:
        for size in args.sizes:
            if not (args.dir / f"photos-{size}" / ".complete").is_file():
                from photos import write_photo_folders

                write_photo_folders(args.dir / f"photos-{size}", size)
                (args.dir / f"photos-{size}" / ".complete").touch()
            results.append({"images": size, "ingest_cache_types": ingest_cache_types(size, args)})
            (args.dir / f"results-ingest-{'-'.join(map(str, args.sizes))}.json").write_text(json.dumps(results, indent=1))
        print(harness.header("Ingest at real size") + "\n" + ingest_table(results))
        return
    for size in args.sizes:
        results.append(measure(size, args))
        (args.dir / f"results-{'-'.join(map(str, args.sizes))}.json").write_text(json.dumps(results, indent=1, default=list))
        print(f"{size} images done: whole {results[-1]['whole_seconds']} s", file=sys.stderr, flush=True)
    print(markdown(results, args))


if __name__ == "__main__":
    main()
