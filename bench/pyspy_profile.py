"""Profile one command with py-spy and print where its wall time went, as markdown.

    .venv/bin/python bench/pyspy_profile.py [--rate 50] [--top 15] [--native] [--cwd DIR] -- COMMAND ...

Runs `py-spy record --format raw --subprocesses` on COMMAND (every stage of `dvc repro` is a
subprocess: they are followed), then from the collapsed stacks reports the share of samples spent
importing modules (any stack inside importlib's loader), broken down by the top-level package
being imported, and the functions with the largest inclusive share outside imports.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

import harness

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")
PROCESS = re.compile(r'^process \d+:"(?P<command>.*)"$')
OWN = {"components", "flows", "bench"}


def parse(raw: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def imported_package(frames: list[str]) -> str | None:
    """The outermost third-party package being imported in this stack, or None outside imports."""
    importing, own = False, None
    for frame in frames:
        match = FRAME.match(frame)
        if not match:
            continue
        importing = importing or match["func"].startswith("_find_and_load")
        if importing and match["func"] == "<module>":
            top = match["file"].split("/", 1)[0].removesuffix(".py")
            if top not in OWN:
                return top
            own = own or top
    return own


def process_name(frames: list[str]) -> str:
    """The innermost process of a stack (py-spy --subprocesses prefixes one frame per process), shortened."""
    commands = [match["command"] for f in frames if (match := PROCESS.match(f))]
    if not commands:
        return "(main process)"
    words = [Path(w).name if "/" in w else w for w in commands[-1].split()]
    return " ".join(words[1:] if words[0].startswith("python") else words)


def function(frame: str) -> str:
    """A frame without its line number: one row per function."""
    match = FRAME.match(frame)
    return f"{match['func']} ({match['file']})" if match else frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--native", action="store_true", help="include native (C/C++) frames")
    parser.add_argument("--cwd", type=Path, default=Path.cwd())
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument("--analyze", type=Path, help="only summarize collapsed stacks recorded before")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    raw_path = args.analyze or args.raw or Path(tempfile.mkstemp(suffix=".txt")[1])
    spy = [str(harness.BIN / "py-spy"), "record", "--format", "raw", "--subprocesses", "--rate",
           str(args.rate), "-o", str(raw_path), *(["--native"] if args.native else []), "--", *command]
    seconds = None if args.analyze else harness.timed(spy, args.cwd).seconds
    stacks = parse(raw_path.read_text())
    total = sum(count for _, count in stacks) or 1
    # Compiling .py source to bytecode: what a cached .pyc (a normal install) skips.
    compiling = sum(count for frames, count in stacks
                    if any(f.startswith("SourceLoader.source_to_code") for f in frames))
    imports: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    per_process: collections.Counter[str] = collections.Counter()
    importing_per_process: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        package = imported_package(frames)
        per_process[process_name(frames)] += count
        if package:
            imports[package] += count
            importing_per_process[process_name(frames)] += count
            continue
        for name in dict.fromkeys(function(f) for f in frames):  # once per stack: inclusive time
            inclusive[name] += count
    print(harness.header(f"Profile: {' '.join(command)}"))
    wall = f"Wall {seconds:.1f} s under py-spy (sampling slows it a little); " if seconds else ""
    print(f"{wall}{total} samples of active "
          f"threads over all processes, {sum(imports.values()) / total:.0%} of them inside imports, "
          f"{compiling / total:.0%} compiling Python source to bytecode.\n")
    print(harness.table(("importing (top-level package)", "share of samples"),
                        [(name, f"{count / total:.1%}") for name, count in imports.most_common(args.top)]))
    print()
    print(harness.table(("process", "share of samples", "of which importing", "seconds at the sampling rate"),
                        [(f"`{name[:80]}`", f"{count / total:.1%}", f"{importing_per_process[name] / count:.0%}",
                          f"{count / args.rate:.1f}") for name, count in per_process.most_common(args.top)]))
    print()
    frames = [(f, c) for f, c in inclusive.most_common(args.top * 4) if not f.startswith(("<module>", "process "))][: args.top]
    print(harness.table(("function, outside imports (inclusive)", "share of samples"),
                        [(f"`{name[:110]}`", f"{count / total:.1%}") for name, count in frames]))


if __name__ == "__main__":
    sys.exit(main())
