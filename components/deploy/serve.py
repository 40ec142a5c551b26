"""`tlpipe serve MODEL.onnx`: an HTTP endpoint for an exported model (FastAPI + uvicorn + onnxruntime).

POST /predict takes one or more images (multipart files, or JSON {"images": [base64, ...]}) and
answers top-k labels with probabilities per image; GET /health and GET /metadata describe it.
Concurrent requests are micro-batched: a single worker collects what arrives within a few
milliseconds into one onnxruntime call, which is how a CPU server gets its throughput. Every
image is decoded and resized as the clean stage stored the training images (the same code as
`tlpipe predict`), so the batch stacks and the server and the CLI give the same answers.

Every bad request is answered with a 4xx and a JSON {"error": ...}; nothing a client sends can
make the server answer 500: body size, pixel count (decompression bombs), undecodable bytes,
content type and image count are each checked before the model runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from components.data.images import load_normalized
from components.deploy.predict import OnnxModel, top_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one server. Serving config, not a pipeline stage: set per `tlpipe serve` call."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # per image, read from the header before any decoding
    max_images: int = 64  # per request
    top_k: int = 5
    batch_window_ms: float = 5.0  # how long the batcher waits for more requests after the first
    max_batch: int = 64  # images per onnxruntime call


class BadRequest(Exception):
    """A client error: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _BodyLimit:
    """ASGI middleware: reads the whole body up to the limit, answers 413 past it, then replays it.

    Checked on the bytes actually received, so a chunked upload without Content-Length or one
    that lies about it is refused too, before the multipart parser spools anything to disk.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body over the server's limit of {self.limit} bytes; send fewer or smaller images"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, too_big)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _error(413, too_big)(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect like the server would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class _Batcher:
    """Groups images from concurrent requests into one onnxruntime call (the session runs in a thread)."""

    def __init__(self, model: OnnxModel, window_s: float, max_batch: int) -> None:
        self.model, self.window_s, self.max_batch = model, window_s, max_batch
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = asyncio.Queue()
        self.calls = 0  # onnxruntime calls made; /metadata shows it, tests read it

    async def predict(self, pixels: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, future))
        return await future

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            count = len(pending[0][0])
            deadline = loop.time() + self.window_s
            while count < self.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                pending.append(item)
                count += len(item[0])
            batch = np.concatenate([pixels for pixels, _ in pending])
            try:
                probabilities = await asyncio.to_thread(self._run, batch)
            except Exception as error:  # a model failure fails these requests, never the worker
                for _, future in pending:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for pixels, future in pending:
                if not future.done():  # the client may have gone away
                    future.set_result(probabilities[start : start + len(pixels)])
                start += len(pixels)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.model.session.run(None, {self.model.input_name: batch})[0]


def _decode(data: bytes, name: str, model: OnnxModel, max_pixels: int) -> np.ndarray:
    """(H, W, C) uint8 at the model's size, or BadRequest naming the image and what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                width, height = header.size
    except Image.DecompressionBombError:
        raise BadRequest(413, f"{name}: too many pixels (decompression bomb guard); limit {max_pixels}") from None
    except Exception as error:  # Pillow raises many types for bytes that are not an image
        raise BadRequest(400, f"{name}: cannot decode image ({type(error).__name__}: {error})") from None
    if width * height > max_pixels:
        raise BadRequest(413, f"{name}: {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_normalized(io.BytesIO(data), model.size, model.pil_mode)
    except Exception as error:  # truncated or corrupt data shows only when decoding
        raise BadRequest(400, f"{name}: cannot decode image ({type(error).__name__}: {error})") from None
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


async def _read_images(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a multipart or JSON request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=max_images + 1)
        except Exception as error:  # malformed multipart, or more parts than allowed
            message = str(getattr(error, "detail", error))
            if "too many" in message.lower():
                raise BadRequest(413, f"more than {max_images} parts in one request, over the image limit") from None
            raise BadRequest(400, f"unreadable multipart body ({message}); send image files as form parts") from None
        images = []
        for key, value in form.multi_items():
            if isinstance(value, str):
                raise BadRequest(400, f"form field {key!r} is text; send images as file parts")
            images.append((value.filename or key, await value.read()))
    elif content_type == "application/json":
        try:
            payload = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as error:
            raise BadRequest(400, f"invalid JSON ({error}); send {{\"images\": [base64, ...]}}") from None
        encoded = payload.get("images") if isinstance(payload, dict) else None
        if not isinstance(encoded, list) or not all(isinstance(item, str) for item in encoded):
            raise BadRequest(400, 'JSON body must be {"images": [base64 string, ...]}')
        if len(encoded) > max_images:
            raise BadRequest(413, f"{len(encoded)} images in one request, over the limit of {max_images}")
        images = []
        for index, item in enumerate(encoded):
            try:
                images.append((f"images[{index}]", base64.b64decode(item, validate=True)))
            except (binascii.Error, ValueError):
                raise BadRequest(400, f"images[{index}]: not valid base64") from None
    else:
        raise BadRequest(
            415,
            f"content type {content_type or 'missing'!r} not supported; use multipart/form-data or application/json",
        )
    if not images:
        raise BadRequest(400, "no images in the request")
    if len(images) > max_images:
        raise BadRequest(413, f"{len(images)} images in one request, over the limit of {max_images}")
    return images


def create_app(model_path: Path, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The ASGI app for one model; the batcher starts and stops with the app's lifespan."""
    model = OnnxModel(Path(model_path))  # PipelineError here: a bad model fails at start, not per request
    sha256 = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    batcher = _Batcher(model, settings.batch_window_ms / 1000, settings.max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.work())
        try:
            yield
        finally:
            worker.cancel()

    app = FastAPI(title="tlpipe model server", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return _error(error.status, error.message)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return {
            "labels": model.labels,
            "input_spec": model.input_spec,
            "preprocessing": model.preprocessing,
            "model_sha256": sha256,
            "limits": asdict(settings),
            "batches_run": batcher.calls,
        }

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        raw_k = request.query_params.get("top_k", str(settings.top_k))
        if not raw_k.isdigit() or int(raw_k) < 1:
            raise BadRequest(400, f"top_k must be a whole number >= 1, got {raw_k!r}")
        k = min(int(raw_k), len(model.labels))
        images = await _read_images(request, settings.max_images)
        pixels = await asyncio.to_thread(
            lambda: np.stack([_decode(data, name, model, settings.max_pixels) for name, data in images])
        )
        probabilities = await batcher.predict(pixels)
        return {
            "predictions": [
                {
                    "image": name,
                    "top_k": [{"label": model.labels[i], "probability": float(row[i])} for i in top_indices(row, k)],
                }
                for (name, _), row in zip(images, probabilities)
            ]
        }

    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    return app


def serve(model_path: Path, host: str, port: int, settings: ServeSettings) -> None:
    """Run the server until interrupted (uvicorn handles SIGINT/SIGTERM and drains requests)."""
    import uvicorn

    app = create_app(model_path, settings)
    log.info("serving %s on http://%s:%d (POST /predict, GET /health, GET /metadata)", model_path, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
