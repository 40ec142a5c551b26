"""Per-stage meter for bench/bench_real.py: on PYTHONPATH, every `tlpipe stage NAME` process appends
its own wall time and peak RSS (itself and its worker processes) to $TLPIPE_STAGE_METER as a JSON line.

A stage's process ends through os._exit (components.apps.cli), which skips atexit: both are hooked.
"""

import atexit
import json
import os
import resource
import sys
import time

_STARTED = time.perf_counter()
_DONE = False


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
            "cpu_seconds": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 2)}
    with open(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")


_real_exit = os._exit


def _exit(code: int) -> None:
    _record(code)
    _real_exit(code)


if os.environ.get("TLPIPE_STAGE_METER"):
    os._exit = _exit
    atexit.register(_record)
