"""A new user's first hour, as they live it: the digits, then their own photos with `tlpipe init`,
then `dvc repro`; a console of tlpipe's and DVC's lines only; `dvc metrics show` that fits a
terminal; `dvc plots show` that renders with the network off; and the Prefect flow and DVC
agreeing about what is done."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SHRINK
from tests.test_init import write_photo_folders

BIN = Path(sys.executable).parent
# What DVC itself prints around the stages' own lines.
DVC_LINES = re.compile(
    r"^(Running stage '\w+':|> tlpipe stage \w+|Stage '\w+' didn't change, skipping|Updating lock file 'dvc.lock'"
    r"|Generating lock file 'dvc.lock'|Use `dvc push` to send your updates to remote storage\.|Data and pipelines are up to date\."
    r"|Verifying data sources in stage: '.*'|To track the changes with git, run:|\s*git add .*"
    r"|To enable auto staging, run:|\s*dvc config core.autostage true|)$")
# tlpipe's: its loggers' lines (time, logger, message), and the indented items of a multi-line one.
OWN_LINES = re.compile(r"^(\d\d:\d\d:\d\d (tlpipe|components|flows)[.\w]*: .*|  - .*)$")


def noise(output: str) -> list[str]:
    """Every printed line that is neither tlpipe's nor DVC's own."""
    return [line for line in output.splitlines() if not DVC_LINES.match(line) and not OWN_LINES.match(line)]


def project(root: Path) -> Path:
    """A fresh clone of the project's tracked files, as a new user has it: git and DVC set up, nothing run."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file() and not name.startswith(("tests/", "bench/", "docs/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], root)
    return root


def run(command: list[str], cwd: Path, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # dvc.yaml's commands call `tlpipe`
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def shrink(root: Path, extra: dict[str, object] | None = None) -> None:
    """The project's params.yaml with the test-size overrides: what a user changes, the rest from the defaults."""
    raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
    for dotted, value in {**SHRINK, **(extra or {})}.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def ran(output: str) -> list[str]:
    return re.findall(r"^Running stage '(\w+)':", output, flags=re.MULTILINE)


@pytest.mark.slow
def test_the_digits_then_your_own_photos_pass_on_the_first_try_with_a_quiet_console(tmp_path: Path) -> None:
    root = project(tmp_path / "tlpipe")
    shrink(root)
    digits = run([str(BIN / "dvc"), "repro"], root)
    printed = digits.stdout + digits.stderr
    assert noise(printed) == [], "library noise on the console"
    assert ran(printed) == ["ingest", "validate", "clean", "scratch", "source", "transfer", "finetune", "evaluate", "report",
                           "export"]
    shown = run([str(BIN / "dvc"), "metrics", "show"], root).stdout
    assert max(len(line) for line in shown.splitlines()) <= 160, shown
    assert {"accuracy", "macro_f1", "gates_passed", "onnx_max_abs_diff"} <= set(shown.split())

    # The user's own photos: two folders of colour JPEGs; init writes the params that fit them.
    source = write_photo_folders(tmp_path / "my_source", ["apple", "leaf", "sky", "sea"], per_class=40)
    target = write_photo_folders(tmp_path / "my_target", ["lemon", "plum", "fig"], per_class=24, seed=5)
    chosen = run([str(BIN / "tlpipe"), "init", "--source", str(source), "--target", str(target), "--force"], root).stdout
    assert "data.color_mode: rgb" in chosen and "data.image_size: 64" in chosen
    photos = run([str(BIN / "dvc"), "repro"], root)
    printed = photos.stdout + photos.stderr
    assert noise(printed) == [], "library noise on the console"
    assert "drift: new dataset" in printed  # the digits' reference is not this dataset's: recorded, not failed
    gates = yaml.safe_load((root / "reports" / "gates.json").read_text())
    assert gates["passed"], gates
    assert (root / "models" / "model.onnx").is_file()
    summary = run([str(BIN / "tlpipe"), "summary"], root).stdout
    assert "gates: PASSED" in summary and "warnings:" in summary


@pytest.mark.slow
def test_after_the_prefect_flow_dvc_agrees_that_everything_is_done(tmp_path: Path) -> None:
    root = project(tmp_path / "tlpipe")
    shrink(root)
    run([str(BIN / "tlpipe"), "run"], root)
    status = run([str(BIN / "dvc"), "status"], root).stdout
    # ingest is `always_changed` by design (it checks the user's folders); nothing else is out of date.
    assert [line for line in status.splitlines() if line.strip() and not line.startswith(("ingest:", "\talways changed"))] == [], status
    again = run([str(BIN / "dvc"), "repro"], root)
    assert ran(again.stdout) == ["ingest"], again.stdout  # ingest rechecks the folders, rewrites nothing
    assert "Stage 'export' didn't change, skipping" in again.stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make setup-test installs it)")
def test_dvc_plots_show_renders_curves_and_confusion_matrix_with_the_network_off(tmp_path: Path) -> None:
    from PIL import Image

    root = project(tmp_path / "tlpipe")
    # What source, finetune and evaluate leave for the plots: curves by epoch and the test predictions.
    for phase, epochs in (("source", 6), ("finetune", 9)):
        folder = root / "reports" / "curves" / phase / "plots" / "metrics"
        folder.mkdir(parents=True)
        for key in ("accuracy", "val_accuracy", "loss", "val_loss"):
            falling = key.endswith("loss")
            rows = [f"{step}\t{(1.5 / (step + 1)) if falling else 1 - 0.5 / (step + 1) - 0.03 * key.startswith('val')}"
                    for step in range(epochs)]
            (folder / f"{key}.tsv").write_text("\n".join([f"step\t{key}", *rows]) + "\n")
    pairs = [("5", "5")] * 9 + [("5", "6")] + [("6", "6")] * 8 + [("7", "7")] * 7 + [("7", "5")] * 2
    (root / "reports" / "confusion.csv").write_text("actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in pairs))
    run([str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "plots")], root)
    page = tmp_path / "plots" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and "https://" not in html.split("<script>")[0]

    offline = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
               "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1200,1900",
               "--virtual-time-budget=15000"]
    dom = run([*offline, "--dump-dom", page.as_uri()], tmp_path, timeout=120).stdout
    canvases = re.findall(r'<canvas width="(\d+)" height="(\d+)" class="marks"', dom)
    assert len(canvases) == 5, dom[-3000:]  # 4 curves (train + validation each) and the confusion matrix
    assert all(int(w) > 100 and int(h) > 100 for w, h in canvases)
    shot = tmp_path / "plots.png"
    run([*offline, f"--screenshot={shot}", page.as_uri()], tmp_path, timeout=120)
    image = Image.open(shot).convert("RGB")
    # vega drew into every chart: coloured marks (the curves' purple, the matrix's blues), not a blank page.
    coloured = sum(1 for r, g, b in image.getdata() if max(r, g, b) - min(r, g, b) > 60)
    assert coloured > 5000, coloured
