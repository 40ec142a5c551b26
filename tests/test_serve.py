"""`tlpipe serve`: a real uvicorn server on 127.0.0.1 and real HTTP clients (httpx, http.client)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from components.core.errors import PipelineError
from components.data.images import load_normalized
from components.deploy.serve import ServeSettings, create_app, uvicorn_server
from tests.conftest import REPO, export_tiny_model

CLASSES = ["cat", "dog", "owl"]
LIMITS = ServeSettings(max_body_mb=0.2, max_pixels=100_000, max_images=4, top_k=2)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("serve"), CLASSES)


@contextmanager
def _threaded_server(model: Path, settings: ServeSettings) -> Iterator[tuple[str, object]]:
    """(base URL, app) of a real uvicorn server in a thread, on a socket bound here to a port the system picks.

    The socket listens before uvicorn starts, so requests made at once wait in its backlog: no
    polling for readiness and no port chosen by one process and bound by another.
    """
    app = create_app(model, settings)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn_server(app, settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture(scope="module")
def server(onnx_model: Path) -> Iterator[tuple[str, object]]:
    with _threaded_server(onnx_model, LIMITS) as running:
        yield running


@contextmanager
def _cli_server(model: Path, *options: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`tlpipe serve MODEL --port 0 ...` as a process; yields (base URL from its log line, process)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "components", "serve", str(model), "--port", "0", *options],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # read stderr to its end, so a full pipe never blocks the server
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        seen: list[str] = []
        while not (match := re.search(r"on (http://127\.0\.0\.1:\d+) ", seen[-1] if seen else "")):
            line = lines.get(timeout=180)
            assert line is not None, f"tlpipe serve exited with {process.wait()}: {''.join(seen)}"
            seen.append(line)
        yield match.group(1), process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


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
    url, _ = server
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    meta = httpx.get(f"{url}/metadata").json()
    assert meta["labels"] == CLASSES
    assert meta["input_spec"]["image_size"] == 16 and meta["input_spec"]["dtype"] == "uint8"
    assert meta["model_sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert meta["limits"]["max_images"] == LIMITS.max_images


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(onnx_model: Path) -> None:
    # The batch closes when max_batch images are in, or when the window ends: with a window far
    # longer than 16 requests take to arrive, all 16 go in one onnxruntime call on any machine.
    settings = ServeSettings(batch_window_ms=120_000, max_batch=16)
    images = [_png(100 + i) for i in range(16)]
    with _threaded_server(onnx_model, settings) as (url, app):

        def ask(data: bytes) -> dict:
            answer = httpx.post(f"{url}/predict?top_k=3", files={"f": ("x.png", data, "image/png")}, timeout=180)
            assert answer.status_code == 200, answer.text
            return answer.json()["predictions"][0]

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, images))
        assert app.state.batcher.calls == 1
    for answer, data in zip(answers, images):
        _check(answer, _expected(onnx_model, data), k=3)
    # Different images gave different answers, so a mix-up inside the batch would show.
    assert len({tuple(p["probability"] for p in a["top_k"]) for a in answers}) == len(images)


def _bomb() -> bytes:
    # 1000x1000 = 1e6 pixels of one colour: a few KB of PNG, over the 1e5-pixel limit once decoded.
    buffer = io.BytesIO()
    Image.new("L", (1000, 1000), 0).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("body too large", 413, f"request body over the server's limit of {LIMITS.max_body_bytes} bytes"),
        ("too many pixels", 413, "bomb.png: decompression bomb: 1000x1000 = 1000000 pixels, over --max-pixels=100000"),
        ("undecodable", 400, "notes.png: cannot decode image (not an image format the server reads"),
        ("truncated", 400, "cut.png: cannot decode image"),
        ("wrong content type", 415, "content type 'text/plain' not supported"),
        ("too many images", 413, "5 images in one request, over the limit of 4"),
        ("too many json images", 413, "5 images in one request, over the limit of 4"),
        ("bad base64", 400, "images[0]: not valid base64"),
        ("bad json", 400, "invalid JSON"),
        ("deep json", 400, "JSON nested too deeply"),
        ("json without images", 400, 'JSON body must be {"images"'),
        ("no images", 400, "no images in the request"),
        ("top_k zero", 400, "top_k must be a whole number from 1 to 999999, got '0'"),
        ("top_k superscript", 400, "top_k must be a whole number from 1 to 999999, got '²'"),
        ("top_k 4301 digits", 400, "top_k must be a whole number from 1 to 999999, got '11111111111111111111...'"),
        ("no route", 404, "no GET /; the server answers POST /predict, GET /health, GET /metadata"),
        ("wrong method", 405, "no GET /predict; the server answers POST /predict"),
        ("no docs from a CDN", 404, "no GET /docs"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(server: tuple[str, object], case: str, status: int, message: str) -> None:
    url, _ = server
    one = [("files", ("ok.png", _png(0), "image/png"))]
    send = {
        "body too large": lambda: httpx.post(f"{url}/predict", files=[("f", ("big.png", b"x" * 300_000, "image/png"))]),
        "too many pixels": lambda: httpx.post(f"{url}/predict", files=[("f", ("bomb.png", _bomb(), "image/png"))]),
        "undecodable": lambda: httpx.post(f"{url}/predict", files=[("f", ("notes.png", b"not pixels", "image/png"))]),
        "truncated": lambda: httpx.post(f"{url}/predict", files=[("f", ("cut.png", _png(0)[:60], "image/png"))]),
        "wrong content type": lambda: httpx.post(f"{url}/predict", content=_png(0), headers={"content-type": "text/plain"}),
        "too many images": lambda: httpx.post(f"{url}/predict", files=one * 5),
        "too many json images": lambda: httpx.post(f"{url}/predict", json={"images": ["aGk="] * 5}),
        "bad base64": lambda: httpx.post(f"{url}/predict", json={"images": ["not base64!"]}),
        "bad json": lambda: httpx.post(f"{url}/predict", content=b"{oops", headers={"content-type": "application/json"}),
        "deep json": lambda: httpx.post(f"{url}/predict", content=b"[" * 2000 + b"]" * 2000,
                                        headers={"content-type": "application/json"}),
        "json without images": lambda: httpx.post(f"{url}/predict", json={"pictures": []}),
        "no images": lambda: httpx.post(f"{url}/predict", json={"images": []}),
        "top_k zero": lambda: httpx.post(f"{url}/predict?top_k=0", files=one),
        "top_k superscript": lambda: httpx.post(f"{url}/predict", params={"top_k": "²"}, files=one),
        "top_k 4301 digits": lambda: httpx.post(f"{url}/predict", params={"top_k": "1" * 4301}, files=one),
        "no route": lambda: httpx.get(f"{url}/"),
        "wrong method": lambda: httpx.get(f"{url}/predict"),
        "no docs from a CDN": lambda: httpx.get(f"{url}/docs"),
    }[case]
    answer = send()
    assert answer.status_code == status, answer.text
    assert answer.json().keys() == {"error"}  # one error shape, FastAPI's own 404/405 included
    assert message in answer.json()["error"]
    assert " at 0x" not in answer.json()["error"]  # no Python object reprs
    assert httpx.get(f"{url}/health").status_code == 200  # still serving


def test_body_limit_holds_without_content_length(server: tuple[str, object]) -> None:
    url, _ = server

    def chunks() -> Iterator[bytes]:  # a chunked upload declares no size
        for _ in range(30):
            yield b"x" * 10_000

    answer = httpx.post(f"{url}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert "over the server's limit" in answer.json()["error"]


def test_cli_serves_on_the_port_it_bound_until_stopped(onnx_model: Path) -> None:
    with _cli_server(onnx_model, "--top-k", "1") as (url, process):
        answer = httpx.post(f"{url}/predict", files={"f": ("a.png", _png(5), "image/png")}, timeout=60)
        assert answer.status_code == 200, answer.text
        _check(answer.json()["predictions"][0], _expected(onnx_model, _png(5)), k=1)
        process.terminate()
        # uvicorn drains, then re-raises SIGTERM so the exit status says how the server stopped.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--top-k", "0", "--top-k must be > 0, got 0"),
        ("--max-body-mb", "-1", "--max-body-mb must be > 0, got -1.0"),
        ("--max-images", "0", "--max-images must be > 0, got 0"),
        ("--body-timeout-s", "nan", "--body-timeout-s must be > 0, got nan"),
        ("--port", "70000", "--port must be from 0 to 65535"),
    ],
)
def test_bad_serve_options_fail_at_start(onnx_model: Path, option: str, value: str, message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "components", "serve", str(onnx_model), option, value],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_every_setting_refuses_bools_and_non_positive_values() -> None:
    for field in ServeSettings().__dict__:
        for bad in (True, -1, float("inf")) + ((0,) if field != "batch_window_ms" else ()):
            with pytest.raises(PipelineError, match="--" + field.replace("_", "-")):
                ServeSettings(**{field: bad})


def test_a_file_that_is_not_a_model_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_text("not a graph")
    done = subprocess.run(
        [sys.executable, "-m", "components", "serve", str(tmp_path / "model.onnx")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "not a readable ONNX model" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# Hostile inputs against `tlpipe serve` as users run it: no 5xx, no reset, bounded memory.

HOSTILE_OPTIONS = ("--max-body-mb", "2", "--body-timeout-s", "1", "--max-images", "8",
                   "--max-decoded-mb", "96", "--decode-threads", "1")
DECODED_LIMIT = 96 * 1024 * 1024


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_header(width: int, height: int, colour: int = 0, depth: int = 8) -> bytes:
    """A PNG that claims width x height but holds a few bytes of pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _images_in_every_mode() -> dict[str, bytes]:
    """Real files in every mode and format Pillow writes that a user might send: each must get a 200."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    palette = rgb.convert("P")
    clear = palette.copy()
    clear.info["transparency"] = 0
    sixteen = Image.fromarray(rng.integers(0, 65536, (23, 31), dtype=np.uint16))
    sideways = Image.Exif()
    sideways[0x0112] = 6
    frames = [grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "1.png": _encode(rgb.convert("1"), "PNG"),
        "L.png": _encode(grey, "PNG"),
        "P.png": _encode(palette, "PNG"),
        "P-transparent.png": _encode(clear, "PNG"),
        "LA.png": _encode(rgb.convert("LA"), "PNG"),
        "RGB.png": _encode(rgb, "PNG"),
        "RGBA.png": _encode(rgb.convert("RGBA"), "PNG"),
        "I16.png": _encode(sixteen, "PNG"),
        "I.tiff": _encode(Image.fromarray(rng.integers(-5, 70_000, (23, 31)).astype(np.int32)), "TIFF"),
        "F.tiff": _encode(Image.fromarray(rng.random((23, 31)).astype(np.float32)), "TIFF"),
        "F-nan.tiff": _encode(Image.fromarray(np.full((23, 31), np.nan, dtype=np.float32)), "TIFF"),
        "CMYK.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "CMYK.tiff": _encode(rgb.convert("CMYK"), "TIFF"),
        "YCbCr.jpg": _encode(rgb.convert("YCbCr"), "JPEG"),
        "LAB.tiff": _encode(rgb.convert("LAB"), "TIFF"),
        "progressive.jpg": _encode(rgb, "JPEG", progressive=True),
        "sideways.jpg": _encode(rgb, "JPEG", exif=sideways),
        "RGB.webp": _encode(rgb, "WEBP"),
        "RGBA.webp": _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "RGB.bmp": _encode(rgb, "BMP"),
        "animated.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "pages.tiff": _encode(rgb, "TIFF", save_all=True, append_images=[grey]),
        "RGB.ico": _encode(rgb, "ICO"),
        "RGB.ppm": _encode(rgb, "PPM"),
        "RGB.tga": _encode(rgb, "TGA"),
        "1x1.png": _encode(Image.new("L", (1, 1), 7), "PNG"),
        "1x5000.png": _encode(Image.new("L", (1, 5000), 7), "PNG"),
        # 77 KB of PNG, 79 MB decoded: the float64 conversion once took 1.2 GB and seconds (D3).
        "16-bit 6300x6300.png": _encode(Image.new("I;16", (6300, 6300), 1000), "PNG"),
    }


def _bad_images() -> dict[str, tuple[bytes, int]]:
    """Files that must be refused with the given status, each before costing memory."""
    png, jpeg = _png(0, size=(64, 64)), _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    gif = _encode(Image.new("L", (64, 64), 3), "GIF")
    return {
        "100000x100000.png": (_png_header(100_000, 100_000), 413),  # over Pillow's own bomb limit too
        "7000x7000.png": (_png_header(7000, 7000), 413),  # over --max-pixels (default 40e6)
        "5200x5200 RGB.png": (_png_header(5200, 5200, colour=2), 413),  # 27e6 pixels, 108 MB decoded
        "16-bit 7000x7000.png": (_png_header(7000, 7000, depth=16), 413),
        "header only.png": (_png_header(64, 64), 400),  # claims pixels it does not hold
        "truncated.png": (png[: len(png) // 2], 400),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], 400),
        "truncated.gif": (gif[:20], 400),
        "signature only.png": (b"\x89PNG\r\n\x1a\n", 400),
        "empty.png": (b"", 400),
        "text.png": (b"hello, not pixels", 400),
        "random.jpg": (np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), 400),
    }


def _multipart(parts: list[tuple[str, str, bytes]], boundary: str = "b0undary") -> tuple[dict[str, str], bytes]:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        for name, filename, data in parts
    ) + f"--{boundary}--\r\n".encode()
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body


def _hostile_requests() -> list[tuple[str, str, str, dict[str, str], bytes, set[int], bool]]:
    """(name, method, target, headers, body, allowed statuses, may close the connection) for the corpus."""
    good = _png(3)
    as_json = {"Content-Type": "application/json"}
    one = _multipart([("f", "ok.png", good)])
    cases: list[tuple[str, str, str, dict[str, str], bytes, set[int], bool]] = []
    for name, data in _images_in_every_mode().items():
        cases.append((f"mode {name}", "POST", "/predict", *_multipart([("f", name, data)]), {200}, False))
    for name, (data, status) in _bad_images().items():
        cases.append((f"bad {name}", "POST", "/predict", *_multipart([("f", name, data)]), {status}, False))
    for name, body in {
        "list nested 2000": b"[" * 2000 + b"]" * 2000,
        "dict nested 2000": b'{"a":' * 2000 + b"1" + b"}" * 2000,
        "list nested 500000": b"[" * 500_000,
        "images nested 3000": b'{"images": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        "not JSON": b"{oops",
        "bad UTF-8": b'{"images": ["\xff\xfe"]}',
        "4301-digit number": b'{"images": ' + b"9" * 4301 + b"}",
        "NaN": b'{"images": NaN}',
        "null": b"null",
        "a list": b"[]",
        "images a string": b'{"images": "abc"}',
        "images of numbers": b'{"images": [1, 2]}',
        "images of null": b'{"images": [null]}',
        "a data URL": json.dumps({"images": ["data:image/png;base64," + base64.b64encode(good).decode()]}).encode(),
        "base64 of text": json.dumps({"images": [base64.b64encode(b"not pixels").decode()]}).encode(),
        "nine images": json.dumps({"images": [base64.b64encode(good).decode()] * 9}).encode(),
    }.items():
        cases.append((f"json {name}", "POST", "/predict", as_json, body, {400, 413}, False))
    cases.append(("json UTF-16", "POST", "/predict", as_json,
                  json.dumps({"images": [base64.b64encode(good).decode()]}).encode("utf-16"), {200}, False))
    for query, statuses in {
        "top_k=%C2%B2": {400}, "top_k=" + "7" * 4301: {400}, "top_k=-1": {400}, "top_k=0": {400},
        "top_k=1e3": {400}, "top_k=%203": {400}, "top_k=%D9%A3": {400}, "top_k=%EF%BC%93": {400},
        "top_k=": {400}, "top_k=%00": {400}, "top_k=%ff": {400}, "top_k=3&top_k=x": {400},
        "top_k=999999": {200}, "foo=bar": {200}, "%ff%fe=1": {200}, "top_k": {400},
    }.items():
        cases.append((f"query {query[:30]}", "POST", f"/predict?{query}", *one, statuses, False))
    for name, headers, body in [
        ("text/plain", {"Content-Type": "text/plain"}, good),
        ("image/png", {"Content-Type": "image/png"}, good),
        ("form-urlencoded", {"Content-Type": "application/x-www-form-urlencoded"}, b"images=abc"),
        ("no content type", {}, good),
        ("multipart without boundary", {"Content-Type": "multipart/form-data"}, one[1]),
        ("multipart of garbage", {"Content-Type": "multipart/form-data; boundary=zz"}, b"garbage" * 100),
        ("multipart text field", {"Content-Type": "multipart/form-data; boundary=zz"},
         b'--zz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--zz--\r\n'),
        ("multipart nine files", *_multipart([("f", f"{i}.png", good) for i in range(9)])),
        ("multipart empty", *_multipart([])),
    ]:
        cases.append((f"content {name}", "POST", "/predict", headers, body, {400, 413, 415}, False))
    for method, target in [("GET", "/"), ("GET", "/predict"), ("PUT", "/predict"), ("DELETE", "/health"),
                           ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/%ff%00"), ("HEAD", "/health"),
                           ("OPTIONS", "/predict"), ("GET", "/metadata/../health"), ("GET", "/" + "a" * 8000)]:
        cases.append((f"route {method} {target[:20]}", method, target, {}, b"", {200, 404, 405}, False))
    # Refused before the body is read: the server may then close the connection (after its answer).
    cases.append(("body over the limit", "POST", "/predict", {**as_json, "Content-Length": str(3 << 20)}, b"", {413}, True))
    cases.append(("bad Content-Length", "POST", "/predict", {"Content-Length": "abc"}, b"", {400}, True))
    return cases


def _rss_kb(pid: int, key: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def _ask(port: int, method: str, target: str, headers: dict[str, str], body: bytes,
         connection: http.client.HTTPConnection | None = None) -> tuple[int, bytes, http.client.HTTPConnection]:
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest(method, target, skip_accept_encoding=True)
    for key, value in headers.items():
        connection.putheader(key, value)
    if "Content-Length" not in headers and method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body or None)
    response = connection.getresponse()
    return response.status, response.read(), connection


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_hostile_inputs_get_4xx_on_a_live_connection_in_bounded_memory(onnx_model: Path) -> None:
    cases = _hostile_requests()
    with _cli_server(onnx_model, *HOSTILE_OPTIONS) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        status, _, first = _ask(port, "POST", "/predict", *_multipart([("f", "warm.png", _png(9))]))
        assert status == 200  # imports, the session and the batcher are warm: what is left is per request
        first.close()
        baseline = _rss_kb(process.pid, "VmRSS")

        failures = []
        for name, method, target, headers, body, allowed, may_close in cases:
            try:
                status, answer, connection = _ask(port, method, target, headers, body)
                if status not in allowed:
                    failures.append(f"{name}: {status} {answer[:200]!r}")
                if status >= 400 and answer and not name.startswith("bad Content-Length"):
                    error = json.loads(answer)  # one error shape: {"error": message}, never an object repr
                    if error.keys() != {"error"} or " at 0x" in error["error"]:
                        failures.append(f"{name}: error body {answer[:200]!r}")
                if not may_close:  # the keep-alive connection still works: no reset after a bad request
                    status, answer, _ = _ask(port, "GET", "/health", {}, b"", connection)
                    if status != 200:
                        failures.append(f"{name}: next request on the connection got {status}")
                connection.close()
            except (OSError, http.client.HTTPException) as error:
                failures.append(f"{name}: {type(error).__name__}: {error}")
        assert not failures, "\n".join(failures)

        # A body that never finishes loses its connection at --body-timeout-s, with a 408.
        with socket.create_connection(("127.0.0.1", port), timeout=60) as slow:
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"images\": [")
            status_line = b""
            while b"\r\n" not in status_line and (chunk := slow.recv(4096)):
                status_line += chunk
            assert status_line.startswith(b"HTTP/1.1 408 ")

        assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
        # Peak memory over the whole corpus: one image's decode at a time (--decode-threads 1),
        # each costing at most a few times its decoded size, never a float64 copy (4x of it).
        growth = _rss_kb(process.pid, "VmHWM") * 1024 - baseline * 1024
        assert growth < 3 * DECODED_LIMIT, f"server peak memory grew by {growth / 2**20:.0f} MiB"
        assert process.poll() is None
