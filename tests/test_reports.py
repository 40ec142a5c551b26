"""The reports' one reader and the gates' one table: every consumer sees the same file the same way."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from components.apps.summary import summary
from components.core.artifacts import write_json
from components.core.config import Params
from components.core.errors import PipelineError
from components.core.reports import GatesReport, Lineage, PromotionReport, build_gates, dump, gate_table
from components.deploy.bundle import model_card
from components.deploy.promote import summary_markdown
from components.deploy.report import evaluation_section
from flows.pipeline import model_rows

GATES = build_gates([("min_accuracy", 0.93, 0.9, ">="), ("min_macro_f1", 0.5, 0.9, ">="),
                     ("max_accuracy_regression", 0.02, 0.0, "<=")])


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not JSON"),
    ('["a list"]', "is not a valid GatesReport (the top level: Input should be a valid dictionary"),
    ('{"passed": true, "gates": [{"name": "min_accuracy", "value": "high", "threshold": 0.9, "passed": true}]}',
     "is not a valid GatesReport (gates.0.value: Input should be a valid number"),
    ('{"passed": true, "gates": [], "pased": true}', "is not a valid GatesReport (pased: Extra inputs are not permitted"),
])
def test_a_malformed_report_is_one_error_naming_the_file_the_field_and_the_fix_in_every_reader(
        params: Params, content: str, problem: str) -> None:
    params.paths.gates.parent.mkdir(parents=True, exist_ok=True)
    params.paths.gates.write_text(content)
    for read in (summary, model_rows, evaluation_section):
        if read is evaluation_section:  # the HTML section reads the gates once metrics exist
            write_json(params.paths.metrics, {"accuracy": 0.9, "macro_f1": 0.9})
        with pytest.raises(PipelineError) as failure:
            read(params)
        message = str(failure.value)
        assert str(params.paths.gates) in message and problem in message, (read.__name__, message)
        assert message.endswith("rerun the evaluate stage (dvc repro --force evaluate)")


def test_a_missing_report_reads_as_a_stage_that_has_not_run(params: Params) -> None:
    assert "gates: " not in summary(params)
    assert f"{params.paths.gates.name} missing: the evaluate stage has not run yet (dvc repro evaluate)" in summary(params)
    assert dict(model_rows(params))["gates"] == "n/a"


def test_gates_keep_their_keys_on_disk_and_read_back_the_same(tmp_path: Path) -> None:
    from components.core.reports import read_report, write_report

    report = GatesReport.of(GATES)
    write_report(tmp_path / "gates.json", report)
    on_disk = json.loads((tmp_path / "gates.json").read_text())
    assert on_disk["passed"] is False
    assert [set(g) for g in on_disk["gates"]] == [{"name", "value", "threshold", "comparison", "passed"}] * 3
    assert [g["passed"] for g in on_disk["gates"]] == [True, False, False]
    assert read_report(tmp_path / "gates.json", GatesReport) == report
    assert [g.why for g in report.failed] == ["min_macro_f1: 0.5000 < 0.9000", "max_accuracy_regression: 0.0200 > 0.0000"]


def _onnx_with_metadata() -> bytes:
    """A one-node ONNX graph carrying the metadata tlpipe's export writes (what a model card reads)."""
    node = helper.make_node("Identity", ["input"], ["probabilities"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph)
    spec = {"name": "input", "dtype": "uint8", "layout": "NHWC", "channels": 1, "color_mode": "grayscale",
            "image_size": 8}
    helper.set_model_props(model, {"labels": json.dumps(["a", "b"]), "input_spec": json.dumps(spec)})
    return model.SerializeToString()


def test_the_bundle_card_the_release_card_and_the_promotion_summary_show_one_gate_table() -> None:
    table = gate_table(GATES)
    assert table.splitlines()[2:] == ["| min_accuracy | 0.9300 | >= 0.9000 | pass |",
                                      "| min_macro_f1 | 0.5000 | >= 0.9000 | FAIL |",
                                      "| max_accuracy_regression | 0.0200 | <= 0.0000 | FAIL |"]
    data = _onnx_with_metadata()
    assert onnx.load_from_string(data).metadata_props
    bundle_card = model_card(data, None, GatesReport.of(GATES))
    metrics = {"accuracy": 0.93, "macro_f1": 0.5, "test_images": 10}
    lineage = Lineage(version="v2", time="t", replaced="v1", onnx_sha256="0" * 64, labels=["a", "b"], gates=GATES,
                      metrics={"challenger": metrics, "champion": None}, code={"commit": None, "note": "no git"},
                      dvc={"note": "no dvc.lock"}, params={}, tag=None)
    release_card = model_card(data, None, GatesReport.of(GATES), lineage)
    scored = {"path": "m.onnx", "sha256": "0" * 64, "labels": ["a", "b"], "metrics": metrics}
    promotion = PromotionReport(time="t", champion_version="v1", first_champion=False, gates=GATES, challenger=scored,
                                champion=None, production="models/production", tag=None, decision="rejected",
                                version="v1", reasons=[g.why for g in GATES if not g.passed])
    assert table in bundle_card
    assert release_card.startswith(bundle_card) and release_card.count(table) == 2  # evaluation and promotion gates
    assert table in summary_markdown(promotion)
    assert dump(PromotionReport.model_validate(dump(promotion))) == dump(promotion)
