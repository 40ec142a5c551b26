"""Per-stage meter for bench/bench_real.py: on PYTHONPATH, every `tlpipe stage NAME` process appends
its own wall time and peak RSS (itself and its worker processes) to $TLPIPE_STAGE_METER as a JSON line.

Peak RSS (ru_maxrss) does not say what is resident: anonymous memory (the heap, tensors, arrays) or
file pages the process mapped (shared libraries, memory-mapped data). A daemon thread samples
/proc/self/status every SAMPLE_SECONDS and keeps the peaks of RssAnon and RssFile, and the RssFile
beside the RssAnon peak, so a peak can be told apart (the thread wakes 20 times a second and reads
one small file: no measurable cost).

A stage's process ends through os._exit (components.apps.cli), which skips atexit: both are hooked.
"""

import atexit
import json
import os
import resource
import sys
import threading
import time

_STARTED = time.perf_counter()
_DONE = False
SAMPLE_SECONDS = 0.05
_PEAKS = {"rss_anon_mib": 0.0, "rss_file_mib": 0.0, "rss_file_at_anon_peak_mib": 0.0}


def _status() -> dict[str, float]:
    """RssAnon and RssFile of this process now, in MiB."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, kib = line.split()[:2]
                values[name[:-1]] = int(kib) / 1024
    return values


def _sample() -> None:
    while True:
        try:
            now = _status()
        except (OSError, ValueError):
            return
        if now["RssAnon"] > _PEAKS["rss_anon_mib"]:
            _PEAKS.update(rss_anon_mib=now["RssAnon"], rss_file_at_anon_peak_mib=now["RssFile"])
        _PEAKS["rss_file_mib"] = max(_PEAKS["rss_file_mib"], now["RssFile"])
        time.sleep(SAMPLE_SECONDS)


def _record(code: int = 0) -> None:
    global _DONE
    path = os.environ.get("TLPIPE_STAGE_METER")
    if _DONE or not path or sys.argv[1:2] != ["stage"] or len(sys.argv) < 3:
        return
    import multiprocessing

    if multiprocessing.parent_process() is not None:  # a worker of the stage (forked or spawned)
        return
    _DONE = True
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    line = {"stage": sys.argv[2], "seconds": round(time.perf_counter() - _STARTED, 3), "exit": code,
            "peak_rss_mib": round(own.ru_maxrss / 1024, 1), "children_peak_rss_mib": round(children.ru_maxrss / 1024, 1),
            "cpu_seconds": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 2),
            **{name: round(value, 1) for name, value in _PEAKS.items()}}
    with open(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")


_real_exit = os._exit


def _exit(code: int) -> None:
    _record(code)
    _real_exit(code)


if os.environ.get("TLPIPE_STAGE_METER"):
    os._exit = _exit
    atexit.register(_record)
    if sys.argv[1:2] == ["stage"] and os.path.exists("/proc/self/status"):
        threading.Thread(target=_sample, name="stage-meter", daemon=True).start()
