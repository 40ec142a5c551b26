"""`tlpipe serve MODEL.onnx`: an HTTP endpoint for an exported model (FastAPI + uvicorn + onnxruntime).

POST /predict takes one or more images (multipart files, or JSON {"images": [base64, ...]}) and
answers top-k labels with probabilities per image; GET /health and GET /metadata describe it.
Concurrent requests are micro-batched: a single worker collects what arrives within a few
milliseconds into one onnxruntime call, which is how a CPU server gets its throughput. Every
image is decoded and resized as the clean stage stored the training images (the same code as
`tlpipe predict`), so the batch stacks and the server and the CLI give the same answers.

Every error, FastAPI's own 404/405 included, is answered as JSON {"error": ...}; nothing a client
sends can make the server answer 500: body size and arrival time, pixel count and decoded bytes
(decompression bombs), undecodable bytes, content type, JSON depth, query values and image count
are each checked before the model runs. Messages name the problem, never a Python object.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import math
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException

from components.core.errors import PipelineError
from components.data.images import ImageTooLarge, normalize, open_guarded
from components.deploy.predict import OnnxModel, top_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one server. Serving config, not a pipeline stage: set per `tlpipe serve` call.

    Each field is the `tlpipe serve` option of the same name (`top_k` is `--top-k`); every one is
    checked when the settings are made, so a bad option fails at start, not on every request.
    """

    max_body_mb: float = 20.0  # per request, counted on the bytes received
    body_timeout_s: float = 30.0  # the whole body must arrive within this, else 408 (slow clients hold no slot)
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # concurrent connections and requests; past it uvicorn answers 503
    max_pixels: int = 40_000_000  # per image, read from the header before any decoding
    max_decoded_mb: float = 128.0  # per image: pixels x bytes per pixel of its mode, from the header
    decode_threads: int = 2  # requests decoding at once: with max_decoded_mb, bounds the server's memory
    max_images: int = 64  # per request
    top_k: int = 5
    batch_window_ms: float = 5.0  # how long the batcher waits for more requests after the first
    max_batch: int = 64  # images per onnxruntime call

    def __post_init__(self) -> None:
        for field in fields(self):
            value, option = getattr(self, field.name), "--" + field.name.replace("_", "-")
            whole = field.type == "int"  # a string: annotations are not evaluated in this module
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
                raise PipelineError(f"{option} must be {'a whole number' if whole else 'a number'}, got {value!r}")
            may_be_zero = field.name == "batch_window_ms"
            if not math.isfinite(value) or (value < 0 if may_be_zero else value <= 0):
                raise PipelineError(f"{option} must be {'>= 0' if may_be_zero else '> 0'}, got {value}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * 1024 * 1024)


class BadRequest(Exception):
    """A client error: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _BodyLimit:
    """ASGI middleware: reads the whole body up to the size and time limits, answers 413/408 past them,
    then replays it.

    Checked on the bytes actually received, so a chunked upload without Content-Length or one
    that lies about it is refused too, before the multipart parser spools anything to disk; a
    client that sends its body slowly (or never finishes it) loses the connection at the deadline.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int, timeout_s: float) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body over the server's limit of {self.limit} bytes; send fewer or smaller images"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if re.fullmatch(rb"[0-9]{1,20}", declared) and int(declared) > self.limit:
            return await _error(413, too_big)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                late = f"request body not received within {self.timeout_s:g} s; send it at once"
                return await _error(408, late)(scope, receive, send)
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
        return self.model.probabilities(batch)


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _plain(error: BaseException) -> str:
    """An exception as a short message for a client: its type and text, no Python object reprs."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image format the server reads (PNG, JPEG, GIF, BMP, WebP, TIFF, ...)"
    text = _OBJECT_REPR.sub("the upload", str(error)).strip()
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _decode(data: bytes, name: str, model: OnnxModel, settings: ServeSettings) -> np.ndarray:
    """(H, W, C) uint8 at the model's size, or BadRequest naming the image and what is wrong."""
    try:
        with open_guarded(io.BytesIO(data), settings.max_pixels, settings.max_decoded_bytes, "--max-pixels") as opened:
            image = normalize(opened, model.size, model.pil_mode)
    except ImageTooLarge as error:
        raise BadRequest(413, f"{name}: {error}") from None
    except Exception as error:  # Pillow raises many types for bytes that are not an image, or are cut short
        raise BadRequest(400, f"{name}: cannot decode image ({_plain(error)})") from None
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


async def _read_images(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a multipart or JSON request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=max_images + 1)
        except Exception as error:  # malformed multipart, or more parts than allowed
            message = str(getattr(error, "detail", "")) or _plain(error)
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
        except RecursionError:  # nesting deeper than Python's stack: not an image list in any case
            raise BadRequest(400, 'JSON nested too deeply; send {"images": [base64, ...]}') from None
        except ValueError as error:  # also bad UTF-8 and integers too long to read
            raise BadRequest(400, f"invalid JSON ({_plain(error)}); send {{\"images\": [base64, ...]}}") from None
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


_TOP_K = re.compile(r"[0-9]{1,6}")  # ASCII digits only: str.isdigit also accepts "²", which int() refuses


def create_app(model_path: Path, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The ASGI app for one model; the batcher starts and stops with the app's lifespan."""
    model = OnnxModel(Path(model_path))  # PipelineError here: a bad model fails at start, not per request
    sha256 = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    batcher = _Batcher(model, settings.batch_window_ms / 1000, settings.max_batch)
    decoding = asyncio.Semaphore(settings.decode_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.work())
        try:
            yield
        finally:
            worker.cancel()

    # No /docs or /redoc: they load Swagger UI from a CDN, which a server often cannot reach.
    app = FastAPI(title="tlpipe model server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return _error(error.status, error.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code in (404, 405):
            message = (f"no {request.method} {request.url.path}; the server answers POST /predict, "
                       "GET /health, GET /metadata")
        else:
            message = str(error.detail)
        answer = _error(error.status_code, message)
        answer.headers.update(error.headers or {})  # e.g. a 405's Allow
        return answer

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("error answering %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(error).__name__}); the server log has the details")

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
        if not _TOP_K.fullmatch(raw_k) or int(raw_k) < 1:
            shown = raw_k if len(raw_k) <= 20 else raw_k[:20] + "..."
            raise BadRequest(400, f"top_k must be a whole number from 1 to 999999, got {shown!r}")
        k = min(int(raw_k), len(model.labels))
        images = await _read_images(request, settings.max_images)
        async with decoding:
            pixels = await asyncio.to_thread(
                lambda: np.stack([_decode(data, name, model, settings) for name, data in images])
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

    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    return app


def uvicorn_server(app: FastAPI, settings: ServeSettings) -> Any:
    """A uvicorn.Server for `app` with the settings' connection limits (what `serve` and the tests run)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=10,  # SIGTERM: finish what is in flight, then stop even if a client lingers
    )
    return uvicorn.Server(config)


def serve(model_path: Path, host: str, port: int, settings: ServeSettings) -> None:
    """Run the server until interrupted (uvicorn handles SIGINT/SIGTERM and drains requests).

    The socket is bound here, before uvicorn runs, so port 0 works: the log line names the port
    the system chose, and connections made from then on wait in the backlog until uvicorn accepts.
    """
    if not 0 <= port <= 65535:
        raise PipelineError(f"--port must be from 0 to 65535 (0: any free port), got {port}")
    app = create_app(model_path, settings)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        raise PipelineError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host") from None
    bound = sock.getsockname()[1]
    log.info("serving %s on http://%s:%d (POST /predict, GET /health, GET /metadata)", model_path, host, bound)
    with sock:
        uvicorn_server(app, settings).run(sockets=[sock])
