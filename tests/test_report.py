"""Stage `report`: the run on one self-contained page, opened in headless Chromium with the network off.

One small real run (every stage of dvc.yaml, in order, on generated image folders with a duplicate and
an undecodable file) is shared by the module's tests.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from components.core.config import Params
from components.core.graph import stage_module, stage_names
from components.deploy.report import EXPORT_END, EXPORT_START, SECTIONS, refresh_export
from tests.browser import chromium, visit
from tests.conftest import shrunk_params, write_class_folders

# What the page reports about itself once loaded: its sections, each image's decoded width, its links.
PAGE_FACTS = """{
  sections: [...document.querySelectorAll('section')].map(s => s.id),
  headings: [...document.querySelectorAll('section h2')].map(h => h.textContent),
  images: [...document.images].map(i => ({width: i.naturalWidth, complete: i.complete, alt: i.alt})),
}"""

needs_chromium = pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium: make .venv/.browser-installed")


def run_overrides(root: Path) -> dict[str, object]:
    return {"data.source_dir": str(root / "in" / "source"), "data.target_dir": str(root / "in" / "target"),
            "export.variants": [], "source.epochs": 3, "finetune.epochs": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """Every stage, in dvc.yaml order, on 3 + 3 classes of 12 px images (about a minute here)."""
    root = tmp_path_factory.mktemp("report")
    source = write_class_folders(root / "in" / "source", ["a", "b", "c"], per_class=30, seed=1)
    target = write_class_folders(root / "in" / "target", ["x", "y", "z"], per_class=30, seed=2)
    shutil.copy(target / "x" / "x_0000.png", target / "x" / "copy_of_x_0000.png")  # quarantined: a duplicate
    (target / "y" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # quarantined: cannot decode
    params = shrunk_params(root, run_overrides(root))
    for name in stage_names():
        stage_module(name).run(params)
    return params


def _cards(page: str) -> int:
    return page.count('class="card wide"')


def test_the_page_holds_every_section_and_the_runs_facts(run: Params) -> None:
    page = run.paths.report.read_text()
    assert [m for m in re.findall(r'<section id="(\w+)"', page)] == list(SECTIONS)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page), "the page must load nothing from the network"
    assert "<script" not in page
    # data: the two quarantined files with their reasons, sample strips of every class
    assert "copy_of_x_0000.png" in page and "duplicate of" in page and "broken.png" in page
    assert all(f'alt="{task}/{name}"' in page for task, names in (("source", "abc"), ("target", "xyz")) for name in names)
    # errors: one card per misclassified test image, each with its Grad-CAM overlay
    import json

    metrics = json.loads(run.paths.metrics.read_text())
    matrix = np.asarray(metrics["confusion_matrix"])
    wrong = int(matrix.sum() - np.trace(matrix))
    assert _cards(page) == min(wrong, 48)
    assert page.count('alt="Grad-CAM of ') == _cards(page)
    # evaluation: every gate with its value and threshold
    gates = json.loads(run.paths.gates.read_text())["gates"]
    assert all(f"<td>{g['name']}</td>" in page for g in gates)
    # transfer: what each fine-tuning phase trained, as finetune recorded it (head alone, then 6 convs + head)
    assert "trained in fine-tuning: 1 in the head phase; 7 in the unfrozen phase" in page


def test_the_bundle_copy_has_the_export_section_filled_in(run: Params) -> None:
    page = (run.paths.bundle / "report.html").read_text()
    export = page[page.index(EXPORT_START) : page.index(EXPORT_END)]
    assert "Parity with Keras" in export and "max |onnx - keras|" in export
    sha = __import__("json").loads(run.paths.export_report.read_text())["onnx_sha256"]
    assert sha in export
    # The rest of the page is the report stage's, unchanged.
    original = run.paths.report.read_text()
    assert page.replace(export, "") == original.replace(
        original[original.index(EXPORT_START) : original.index(EXPORT_END)], "")
    assert refresh_export("<p>no markers</p>", {"onnx_sha256": "x"}) == "<p>no markers</p>"


def test_the_flows_artifact_links_the_bundles_copy(run: Params) -> None:
    from flows.pipeline import run_summary

    copy = (run.paths.bundle / "report.html").resolve().as_uri()
    assert f"| run report | [report.html]({copy}) |" in run_summary(run, stage_names())


@needs_chromium
@pytest.mark.parametrize("copy", ["reports", "bundle"])
def test_chromium_offline_renders_every_section_and_image_and_requests_nothing(run: Params, copy: str) -> None:
    page = run.paths.report if copy == "reports" else run.paths.bundle / "report.html"
    seen = visit(page, PAGE_FACTS)

    assert seen.value["sections"] == list(SECTIONS)
    images = seen.value["images"]
    assert len(images) >= 3 * 2 + 4  # sample strips, curves, per-class bars, confusion matrix, overlays
    assert [image for image in images if not image["complete"] or image["width"] <= 0] == []
    attempted = [url for url in seen.requests if not url.startswith("data:")]
    assert attempted == [page.resolve().as_uri()], attempted  # the page itself, and nothing else


@needs_chromium
def test_the_browser_check_catches_a_page_that_reaches_out(tmp_path: Path) -> None:
    page = tmp_path / "leaky.html"
    page.write_text('<html><body><section id="data"></section><img src="https://cdn.example.com/logo.png">'
                    '<link rel="stylesheet" href="http://127.0.0.1:9/style.css"></body></html>')
    seen = visit(page, PAGE_FACTS)
    assert "https://cdn.example.com/logo.png" in seen.requests
    assert "http://127.0.0.1:9/style.css" in seen.requests
    assert seen.value["images"][0]["width"] == 0  # the network is off: it never loads


def test_the_report_without_errors_or_export_still_renders(run: Params, tmp_path: Path) -> None:
    """A run whose export has not happened: the export section says where it will be, nothing breaks."""
    from components.deploy.report import render

    page = render(run, {}, [], 0, "backbone.block3_relu2", ["ingest"])
    assert "No test image is misclassified" in page and "The export stage runs after this page" in page


# The stage, run in a fresh interpreter on the module's run: the modules it loaded.
STAGE_ALONE = """
import json, sys
from pathlib import Path
from components import report
from tests.conftest import shrunk_params
from tests.test_report import run_overrides
root = Path(sys.argv[1])
report.run(shrunk_params(root, run_overrides(root)))
print(json.dumps([m for m in ("tensorflow", "keras", "jax", "torch") if m in sys.modules]))
"""


def test_the_report_stage_loads_no_deep_learning_framework(run: Params) -> None:
    """Its errors come explained from evaluate: importing TensorFlow would cost 5-25 s per run here."""
    import subprocess
    import sys

    from tests.conftest import REPO

    root = run.paths.raw.parents[1]
    done = subprocess.run([sys.executable, "-c", STAGE_ALONE, str(root)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
