"""Inference benchmark: onnxruntime vs Keras `predict` on the same model and images, and `tlpipe serve` req/s.

    .venv/bin/python bench/bench_inference.py [--backbone simple_cnn] [--image-size 16] [--repeats 3]

The model is built from params.yaml's `model`/`data` sections (overridable here), exported with the
same tf2onnx call as the export stage; weights do not change the timing, so it is not trained.
Measured, each repeated --repeats times and reported as the median (ratios come from one run):
batch-1 latency p50/p95 (Keras `model.predict`, Keras direct `model(x)`, onnxruntime `run`),
batch-64 throughput in images/s, and the server's requests/s (one image per request) under N
concurrent clients on 127.0.0.1, with micro-batching on and off. Prints a JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _percentiles(call, x: np.ndarray, n: int) -> tuple[float, float]:
    call(x)  # warm-up: graph tracing / session allocation is not latency
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.percentile(times, 50)), 1000 * float(np.percentile(times, 95))


def _throughput(call, x: np.ndarray, seconds: float) -> float:
    call(x)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call(x)
        done += len(x)
    return done / (time.perf_counter() - start)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def _clients(url: str, images: list[bytes], clients: int, seconds: float) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as client:
        stop = time.perf_counter() + seconds
        counts = [0] * clients

        async def loop(index: int) -> None:
            while time.perf_counter() < stop:
                data = images[(index + counts[index]) % len(images)]
                answer = await client.post(f"{url}/predict?top_k=1", files={"f": ("x.png", data, "image/png")})
                answer.raise_for_status()
                counts[index] += 1

        start = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        return sum(counts) / (time.perf_counter() - start)


def _server_rps(model: Path, images: list[bytes], clients: int, seconds: float, window_ms: float) -> float:
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "components", "serve", str(model), "--port", str(port),
               "--batch-window-ms", str(window_ms)]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health").raise_for_status()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {server.stderr.read().decode()}") from None
                time.sleep(0.2)
        asyncio.run(_clients(f"http://127.0.0.1:{port}", images, clients, 1.0))  # warm-up
        return asyncio.run(_clients(f"http://127.0.0.1:{port}", images, clients, seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", help="model.backbone (default: params.yaml)")
    parser.add_argument("--image-size", type=int, help="data.image_size (default: params.yaml)")
    parser.add_argument("--color-mode", choices=["grayscale", "rgb"], help="data.color_mode (default: params.yaml)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-calls", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput / server measurement")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    import keras
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    from components.core.config import load_params, with_overrides
    from components.training.models import INPUT_NAME, build_model

    overrides = {"model.backbone": args.backbone, "data.image_size": args.image_size, "data.color_mode": args.color_mode}
    params = with_overrides(load_params(REPO / "params.yaml", root=REPO), {k: v for k, v in overrides.items() if v})
    side, channels = params.data.image_size, params.data.channels
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, params.data, 10, bn_inference=True)
    signature = [tf.TensorSpec((None, None, None, channels), tf.uint8, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=params.export.opset)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    x64 = rng.integers(0, 256, size=(64, side, side, channels), dtype=np.uint8)
    x1 = x64[:1]
    np.testing.assert_allclose(session.run(None, {INPUT_NAME: x64})[0], model.predict(x64, verbose=0), atol=1e-4)
    calls = {
        "keras_predict": lambda x: model.predict(x, verbose=0),
        "keras_call": lambda x: model(x, training=False),
        "onnxruntime": lambda x: session.run(None, {INPUT_NAME: x}),
    }

    with tempfile.TemporaryDirectory() as folder:
        import onnx

        onnx.helper.set_model_props(proto, {
            "labels": json.dumps([str(i) for i in range(10)]),
            "input_spec": json.dumps({"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": channels,
                                      "color_mode": params.data.color_mode, "image_size": side}),
        })
        model_path = Path(folder) / "model.onnx"
        model_path.write_bytes(proto.SerializeToString())
        pngs = [_png(image) for image in x64]

        runs = []
        for repeat in range(args.repeats):
            run: dict[str, float] = {}
            for name, call in calls.items():
                run[f"{name}_b1_p50_ms"], run[f"{name}_b1_p95_ms"] = _percentiles(call, x1, args.latency_calls)
                run[f"{name}_b64_images_per_s"] = _throughput(call, x64, args.seconds)
            for window in (5.0, 0.0):
                run[f"server_rps_window_{window:g}ms"] = _server_rps(model_path, pngs, args.clients, args.seconds, window)
            run["ratio_b1_p50_keras_predict_over_ort"] = run["keras_predict_b1_p50_ms"] / run["onnxruntime_b1_p50_ms"]
            run["ratio_b64_ort_over_keras_predict"] = (
                run["onnxruntime_b64_images_per_s"] / run["keras_predict_b64_images_per_s"]
            )
            print(f"repeat {repeat + 1}: " + json.dumps({k: round(v, 3) for k, v in run.items()}), file=sys.stderr)
            runs.append(run)

    median = {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}
    print(json.dumps({
        "command": " ".join([".venv/bin/python", "bench/bench_inference.py", *sys.argv[1:]]),
        "machine": f"{platform.platform()}, {os.cpu_count()} logical CPUs, {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": {"backbone": params.model.backbone, "image_size": side, "channels": channels,
                  "parameters": int(model.count_params())},
        "versions": {"onnxruntime": ort.__version__, "keras": keras.__version__, "tensorflow": tf.__version__},
        "clients": args.clients, "repeats": args.repeats,
        "median": median,
        "runs": [{k: round(v, 3) for k, v in run.items()} for run in runs],
    }, indent=2))


if __name__ == "__main__":
    main()
