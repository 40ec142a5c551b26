"""`tlpipe serve`: a real uvicorn server on 127.0.0.1 and a real HTTP client (httpx)."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import uvicorn
from PIL import Image

from components.data.images import load_normalized
from components.deploy.serve import ServeSettings, create_app
from tests.conftest import REPO, export_tiny_model

CLASSES = ["cat", "dog", "owl"]
LIMITS = ServeSettings(max_body_bytes=200_000, max_pixels=100_000, max_images=4, top_k=2, batch_window_ms=50)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("serve"), CLASSES)


@pytest.fixture(scope="module")
def server(onnx_model: Path) -> Iterator[tuple[str, object]]:
    """(base URL, app) of a real uvicorn server in a thread, on a free port of 127.0.0.1."""
    app = create_app(onnx_model, LIMITS)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _png(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _expected(model: Path, png: bytes) -> np.ndarray:
    """onnxruntime directly, on the image as `tlpipe predict` reads it."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pixels = np.asarray(load_normalized(io.BytesIO(png), 16, "L"), dtype=np.uint8)[None, ..., None]
    return session.run(None, {"input": pixels})[0][0]


def _check(answer: dict, expected: np.ndarray, k: int) -> None:
    order = np.argsort(-expected, kind="stable")[:k]
    assert [p["label"] for p in answer["top_k"]] == [CLASSES[i] for i in order]
    assert [p["probability"] for p in answer["top_k"]] == pytest.approx([float(expected[i]) for i in order], abs=1e-5)


def test_multipart_and_base64_json_get_the_onnxruntime_answer(server: tuple[str, object], onnx_model: Path) -> None:
    url, _ = server
    images = [_png(1), _png(2, size=(40, 30))]  # the second is resized to the model's size by the server
    files = [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    multipart = httpx.post(f"{url}/predict", files=files, timeout=30)
    assert multipart.status_code == 200, multipart.text
    predictions = multipart.json()["predictions"]
    assert [p["image"] for p in predictions] == ["img0.png", "img1.png"]
    for answer, data in zip(predictions, images):
        _check(answer, _expected(onnx_model, data), k=LIMITS.top_k)

    encoded = {"images": [base64.b64encode(data).decode() for data in images]}
    as_json = httpx.post(f"{url}/predict?top_k=3", json=encoded, timeout=30)
    assert as_json.status_code == 200, as_json.text
    for answer, data in zip(as_json.json()["predictions"], images):
        _check(answer, _expected(onnx_model, data), k=3)


def test_health_and_metadata_describe_the_model(server: tuple[str, object], onnx_model: Path) -> None:
    import hashlib

    url, _ = server
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    meta = httpx.get(f"{url}/metadata").json()
    assert meta["labels"] == CLASSES
    assert meta["input_spec"]["image_size"] == 16 and meta["input_spec"]["dtype"] == "uint8"
    assert meta["model_sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert meta["limits"]["max_images"] == LIMITS.max_images


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    server: tuple[str, object], onnx_model: Path
) -> None:
    url, app = server
    images = [_png(100 + i) for i in range(16)]
    calls_before = app.state.batcher.calls

    def ask(data: bytes) -> dict:
        answer = httpx.post(f"{url}/predict?top_k=3", files={"f": ("x.png", data, "image/png")}, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["predictions"][0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, images))
    for answer, data in zip(answers, images):
        _check(answer, _expected(onnx_model, data), k=3)
    # Different images gave different answers (so a mix-up would show), in fewer model calls than requests.
    assert len({tuple(p["probability"] for p in a["top_k"]) for a in answers}) == len(images)
    assert app.state.batcher.calls - calls_before < len(images)


def _bomb() -> bytes:
    # 1000x1000 = 1e6 pixels of one colour: a few KB of PNG, over the 1e5-pixel limit once decoded.
    buffer = io.BytesIO()
    Image.new("L", (1000, 1000), 0).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("body too large", 413, "request body over the server's limit of 200000 bytes"),
        ("too many pixels", 413, "1000x1000 = 1000000 pixels, over the limit of 100000"),
        ("undecodable", 400, "notes.png: cannot decode image"),
        ("truncated", 400, "cut.png: cannot decode image"),
        ("wrong content type", 415, "content type 'text/plain' not supported"),
        ("too many images", 413, "5 images in one request, over the limit of 4"),
        ("too many json images", 413, "5 images in one request, over the limit of 4"),
        ("bad base64", 400, "images[0]: not valid base64"),
        ("bad json", 400, "invalid JSON"),
        ("json without images", 400, 'JSON body must be {"images"'),
        ("no images", 400, "no images in the request"),
        ("bad top_k", 400, "top_k must be a whole number >= 1"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(server: tuple[str, object], case: str, status: int, message: str) -> None:
    url, _ = server
    one = [("files", ("ok.png", _png(0), "image/png"))]
    post = {
        "body too large": lambda: httpx.post(f"{url}/predict", files=[("f", ("big.png", b"x" * 300_000, "image/png"))]),
        "too many pixels": lambda: httpx.post(f"{url}/predict", files=[("f", ("bomb.png", _bomb(), "image/png"))]),
        "undecodable": lambda: httpx.post(f"{url}/predict", files=[("f", ("notes.png", b"not pixels", "image/png"))]),
        "truncated": lambda: httpx.post(f"{url}/predict", files=[("f", ("cut.png", _png(0)[:60], "image/png"))]),
        "wrong content type": lambda: httpx.post(f"{url}/predict", content=_png(0), headers={"content-type": "text/plain"}),
        "too many images": lambda: httpx.post(f"{url}/predict", files=one * 5),
        "too many json images": lambda: httpx.post(f"{url}/predict", json={"images": ["aGk="] * 5}),
        "bad base64": lambda: httpx.post(f"{url}/predict", json={"images": ["not base64!"]}),
        "bad json": lambda: httpx.post(f"{url}/predict", content=b"{oops", headers={"content-type": "application/json"}),
        "json without images": lambda: httpx.post(f"{url}/predict", json={"pictures": []}),
        "no images": lambda: httpx.post(f"{url}/predict", json={"images": []}),
        "bad top_k": lambda: httpx.post(f"{url}/predict?top_k=0", files=one),
    }[case]
    answer = post()
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert httpx.get(f"{url}/health").status_code == 200  # still serving


def test_body_limit_holds_without_content_length(server: tuple[str, object]) -> None:
    url, _ = server

    def chunks() -> Iterator[bytes]:  # a chunked upload declares no size
        for _ in range(30):
            yield b"x" * 10_000

    answer = httpx.post(f"{url}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert "over the server's limit" in answer.json()["error"]


def test_cli_serves_until_stopped(onnx_model: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "components", "serve", str(onnx_model), "--port", str(port), "--top-k", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/predict", files={"f": ("a.png", _png(5), "image/png")})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "tlpipe serve did not start"
                time.sleep(0.1)
        assert answer.status_code == 200
        _check(answer.json()["predictions"][0], _expected(onnx_model, _png(5)), k=1)
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_a_file_that_is_not_a_model_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_text("not a graph")
    done = subprocess.run(
        [sys.executable, "-m", "components", "serve", str(tmp_path / "model.onnx")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "not a readable ONNX model" in done.stderr and "Traceback" not in done.stderr
