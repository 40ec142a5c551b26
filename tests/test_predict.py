"""`tlpipe predict`: label files with the exported ONNX model, with onnxruntime alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from components.core.errors import PipelineError
from components.data.dataset import load_split
from components.data.images import load_normalized
from components.deploy import onnx_runtime
from components.deploy.predict import OnnxModel, predict_files
from tests.conftest import REPO, export_tiny_model, write_clean_dataset

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("predict"), CLASSES)


def _tlpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "components", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _image(path: Path, size: tuple[int, int] = (20, 28), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path)
    return path


def test_cli_prints_the_label_onnxruntime_ranks_first(onnx_model: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "my image.png", size=(16, 16))  # the model's size: fed as it is
    done = _tlpipe("predict", str(onnx_model), str(image))
    assert done.returncode == 0, done.stderr

    path, pair = done.stdout.strip().split("\t")
    label, probability = pair.rsplit(":", 1)
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": np.asarray(Image.open(image))[None, ..., None]})[0][0]
    assert path == str(image)
    assert label == CLASSES[int(expected.argmax())]
    assert float(probability) == pytest.approx(float(expected.max()), abs=1e-4)


def test_top_k_lists_every_class_best_first_summing_to_one(onnx_model: Path, tmp_path: Path) -> None:
    images = [_image(tmp_path / "a.png", seed=1), _image(tmp_path / "b.png", size=(64, 48), seed=2)]
    done = _tlpipe("predict", str(onnx_model), *map(str, images), "--top-k", str(len(CLASSES)))
    assert done.returncode == 0, done.stderr

    lines = done.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(image) for image in images]
    for line in lines:
        pairs = [pair.rsplit(":", 1) for pair in line.split("\t")[1:]]
        assert sorted(label for label, _ in pairs) == sorted(CLASSES)
        probabilities = [float(p) for _, p in pairs]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)


def test_top_1_and_top_k_print_one_format_and_json_says_the_same(onnx_model: Path, tmp_path: Path) -> None:
    images = [_image(tmp_path / "a.png", seed=4), _image(tmp_path / "b b.png", seed=5)]
    top_1 = _tlpipe("predict", str(onnx_model), *map(str, images))
    top_3 = _tlpipe("predict", str(onnx_model), *map(str, images), "--top-k", "3")
    as_json = _tlpipe("predict", str(onnx_model), *map(str, images), "--top-k", "3", "--json")
    assert top_1.returncode == top_3.returncode == as_json.returncode == 0, top_1.stderr + top_3.stderr
    # Top-1 is top-k cut at one pair: `path<TAB>label:probability`, the same columns whatever k is.
    for one, three in zip(top_1.stdout.splitlines(), top_3.stdout.splitlines(), strict=True):
        assert three.startswith(one + "\t") and len(three.split("\t")) == 4

    document = json.loads(as_json.stdout)  # one document, nothing else on stdout
    assert document["model"] == str(onnx_model)
    assert [answer["image"] for answer in document["predictions"]] == [str(image) for image in images]
    for answer, line in zip(document["predictions"], top_3.stdout.splitlines()):
        assert [pair.keys() for pair in answer["top_k"]] == [{"label", "probability"}] * 3
        printed = [pair.rsplit(":", 1) for pair in line.split("\t")[1:]]
        assert [pair["label"] for pair in answer["top_k"]] == [label for label, _ in printed]
        assert [pair["probability"] for pair in answer["top_k"]] == pytest.approx(
            [float(p) for _, p in printed], abs=1e-4
        )


def test_images_are_read_as_a_user_sees_them(onnx_model: Path, tmp_path: Path) -> None:
    def scores(path: Path) -> list[tuple[str, float]]:
        return [(p["label"], round(p["probability"], 4)) for p in predict_files(onnx_model, [path], top_k=3)[0]["top_k"]]

    # Transparent pixels are composited on white, whatever colour they hide.
    Image.new("L", (16, 16), 255).save(tmp_path / "white.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "black.png")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert scores(tmp_path / "clear.png") == scores(tmp_path / "white.png") != scores(tmp_path / "black.png")

    # EXIF orientation is applied: a sideways-stored photo is labelled as the upright one.
    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[2:5, :] = 255
    Image.fromarray(pixels).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; a viewer turns it 90 degrees clockwise
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png")
    assert scores(tmp_path / "sideways.png") == scores(tmp_path / "upright.png")
    assert scores(tmp_path / "rotated.png") != scores(tmp_path / "upright.png")

    # A large photo is seen as the clean stage stored the training images (Pillow's area-like
    # downscale), not aliased by the model's own bilinear resize.
    big = Image.fromarray(pixels).resize((96, 128), Image.Resampling.NEAREST)
    noise = np.random.default_rng(3).normal(0, 40, size=(128, 96))
    Image.fromarray(np.clip(np.asarray(big) + noise, 0, 255).astype(np.uint8)).save(tmp_path / "big.png")
    load_normalized(tmp_path / "big.png", 16, "L").save(tmp_path / "as_cleaned.png")
    assert scores(tmp_path / "big.png") == scores(tmp_path / "as_cleaned.png")

    # 16-bit pixels are scaled to 8 bits, not clipped to white.
    grey = pixels // 2 + 20
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    assert scores(tmp_path / "sixteen.png") == scores(tmp_path / "eight.png")


@pytest.mark.parametrize("bad", ["missing image", "not an image", "missing model", "not a model"])
def test_bad_inputs_exit_1_naming_the_file(onnx_model: Path, tmp_path: Path, bad: str) -> None:
    model, image = onnx_model, _image(tmp_path / "ok.png")
    if bad == "missing image":
        image = tmp_path / "nowhere.png"
    elif bad == "not an image":
        image = tmp_path / "notes.png"
        image.write_text("not pixels")
    elif bad == "missing model":
        model = tmp_path / "nowhere.onnx"
    else:
        model = tmp_path / "model.onnx"
        model.write_text("not a graph")
    named = image if "image" in bad else model

    done = _tlpipe("predict", str(model), str(_image(tmp_path / "first.png")), str(image))
    assert done.returncode == 1
    assert done.stdout == ""
    assert str(named) in done.stderr and "Traceback" not in done.stderr


def test_top_k_below_one_is_refused(onnx_model: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="at least 1"):
        predict_files(onnx_model, [_image(tmp_path / "a.png")], top_k=0)


def _with_metadata(model: Path, dest: Path, labels: object = None, **spec: object) -> Path:
    """A copy of the exported model with its tlpipe metadata edited (labels raw, or input_spec keys)."""
    import onnx

    proto = onnx.load(str(model))
    props = {prop.key: prop.value for prop in proto.metadata_props}
    if labels is not None:
        props["labels"] = labels if isinstance(labels, str) else json.dumps(labels)
    props["input_spec"] = json.dumps({**json.loads(props["input_spec"]), **spec})
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(dest))
    return dest


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"labels": '"notalist"'}, "metadata 'labels' must be a non-empty list of class names"),
        ({"labels": ["cat", "dog"]}, "the graph answers shape [1, 3] per image, the metadata names 2 labels"),
        ({"labels": ["cat", "dog", "owl", "emu"]}, "the metadata names 4 labels"),
        ({"labels": ["cat", "cat", "owl"]}, "names a class twice"),
        ({"labels": []}, "must be a non-empty list"),
        ({"channels": 3}, "is not NHWC with 3 channel(s) as the metadata says"),
        ({"channels": True}, "metadata channels must be 1 or 3, not True"),
        ({"image_size": "16"}, "metadata image_size must be a whole number of pixels"),
        ({"image_size": 0}, "metadata image_size must be a whole number of pixels"),
        ({"name": "pixels"}, "metadata input name 'pixels' is not the graph's single input ['input']"),
        ({"dtype": "float32"}, "metadata dtype must be 'uint8'"),
    ],
)
def test_metadata_that_contradicts_the_graph_is_refused_at_load(
    onnx_model: Path, tmp_path: Path, edit: dict, message: str
) -> None:
    model = _with_metadata(onnx_model, tmp_path / "model.onnx", **edit)
    with pytest.raises(PipelineError) as error:
        OnnxModel(model)
    assert message in str(error.value) and "re-export the model" in str(error.value)


def test_predict_and_serve_refuse_a_model_with_bad_labels_at_start(onnx_model: Path, tmp_path: Path) -> None:
    model = _with_metadata(onnx_model, tmp_path / "model.onnx", labels='"notalist"')
    for command in (["predict", str(model), str(_image(tmp_path / "a.png"))], ["serve", str(model), "--port", "0"]):
        done = _tlpipe(*command)
        assert done.returncode == 1, done.stdout  # serve never started: it exits instead of serving
        assert done.stdout == "" and "metadata 'labels' must be" in done.stderr and "Traceback" not in done.stderr


def test_serving_does_not_import_tensorflow_or_keras() -> None:
    check = (
        "import sys, components.deploy.predict, components.deploy.serve, components.apps.cli\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'tf2onnx', 'onnx'})\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_split_inference_goes_batch_by_batch_in_split_order_like_one_call(onnx_model: Path, tmp_path: Path) -> None:
    """What export, the variants and promotion score with: every image once, in order, a partial last batch."""
    write_clean_dataset(tmp_path, "target", CLASSES, {"test": 7}, size=12)
    split = load_split(tmp_path, "target", "test")
    batched = onnx_runtime.predict_split(onnx_runtime.session(onnx_model), split, batch_size=4)  # 21 = 5 x 4 + 1
    whole = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    expected = whole.run(None, {"input": split.images(np.arange(len(split)))})[0]
    assert batched.shape == (len(split), len(CLASSES)) == (21, 3)
    np.testing.assert_allclose(batched, expected, atol=1e-6)
