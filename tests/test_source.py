"""Stage `source`: training on the source task, and pinned downloads from a server on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from components import source
from components.config import Params, with_overrides
from components.download import sha256_of
from components.errors import PipelineError
from components.models import build_model, load_model_dir


def test_train_mode_saves_a_model_that_learned_the_source_task(clean_dataset: Params) -> None:
    params = with_overrides(clean_dataset, {"source.epochs": 6, "source.batch_size": 16})
    result = source.run(params)

    model, classes = load_model_dir(params.paths.source_model)
    assert classes == ("a", "b", "c", "d")
    report = json.loads(params.paths.source_report.read_text())
    assert report["mode"] == "train" and report["epochs_run"] >= 1
    assert report["test_accuracy"] == result.test_accuracy > 0.5  # 4 classes: chance is 0.25
    curves = params.paths.training_curves / "source" / "plots" / "metrics"
    assert (curves / "val_accuracy.tsv").read_text().startswith("step\tval_accuracy")


def _served_backbone(params: Params, folder, name: str):
    """A headless model of the configured backbone, saved under the served folder."""
    model = build_model(params.model, params.data, None, bn_inference=False)
    path = folder / name
    if name.endswith(".weights.h5"):
        model.save_weights(path)
    else:
        model.save(path)
    return model, path


@pytest.mark.parametrize("name", ["backbone.keras", "backbone.weights.h5"])
def test_download_by_url_checks_sha256_and_caches(params: Params, file_server, name: str) -> None:
    folder, base_url = file_server
    served, path = _served_backbone(params, folder, name)
    params = with_overrides(params, {
        "source.mode": "download", "source.weights": f"{base_url}/{name}", "source.sha256": sha256_of(path),
        "source.cache_dir": str(params.paths.raw.parent / "cache"),
    })
    source.run(params)

    model, classes = load_model_dir(params.paths.source_model)
    assert classes is None  # pretrained weights carry no task of their own
    for mine, theirs in zip(model.get_weights(), served.get_weights()):
        assert (mine == theirs).all()
    cached = list((params.paths.raw.parent / "cache").iterdir())
    assert [p.name.endswith(name) for p in cached] == [True]

    path.unlink()  # the cache answers now: no server file needed
    source.run(params)


def test_download_with_a_wrong_sha256_fails_and_keeps_nothing(params: Params, file_server) -> None:
    folder, base_url = file_server
    _served_backbone(params, folder, "backbone.keras")
    cache = params.paths.raw.parent / "cache"
    params = with_overrides(params, {
        "source.mode": "download", "source.weights": f"{base_url}/backbone.keras", "source.sha256": "0" * 64,
        "source.cache_dir": str(cache),
    })
    with pytest.raises(PipelineError, match="sha256 mismatch"):
        source.run(params)
    assert not cache.exists() or not any(cache.iterdir())
    assert not params.paths.source_model.exists()


def test_download_of_a_missing_file_says_so(params: Params, file_server) -> None:
    _, base_url = file_server
    params = with_overrides(params, {
        "source.mode": "download", "source.weights": f"{base_url}/nothing.keras", "source.sha256": "0" * 64,
        "source.cache_dir": str(params.paths.raw.parent / "cache"),
    })
    with pytest.raises(PipelineError, match="HTTP 404"):
        source.run(params)


def test_download_needs_a_pinned_digest(params: Params) -> None:
    with pytest.raises(PipelineError, match="sha256"):
        with_overrides(params, {"source.mode": "download", "source.weights": "http://127.0.0.1/x.keras"})
