"""The one way tlpipe runs an ONNX model: a CPU onnxruntime session, and batched inference over a split.

`tlpipe predict` and `tlpipe serve` (through predict.OnnxModel), the export stage's parity check,
the variants' gates and latency, and promotion's scoring all make their sessions here, so every
figure about an ONNX model comes from the same settings, and a split is read batch by batch from
its shards (Split.batches), never whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from components.core.errors import PipelineError
from components.data.dataset import PREDICT_BATCH, Split

# CPU only: the exported model is meant for any machine, and the numbers it is gated on must be
# the ones a CPU server gets (a CUDA build of onnxruntime would otherwise pick the GPU).
PROVIDERS = ["CPUExecutionProvider"]


def session(model: bytes | Path, *, optimized_to: Path | None = None) -> ort.InferenceSession:
    """A session on the model (its bytes, or a file); PipelineError naming the file if it does not load.

    `optimized_to`: also apply onnxruntime's extended graph optimizations and save the optimized
    graph there (the `optimized` export variant).
    """
    ort.disable_telemetry_events()  # usage events (only Windows builds send them), off like GX's and Prefect's
    options = ort.SessionOptions()
    # Idle intra-op threads would otherwise spin for a while after each call, taking the CPU from
    # image decoding and, in the server, from the event loop between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_to is not None:
        # EXTENDED keeps the graph portable across CPUs (ALL adds layout changes tied to this machine).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_to)
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=PROVIDERS)
    except Exception as error:  # onnxruntime's load errors share no useful base class
        where = "the model" if isinstance(model, bytes) else str(model)
        raise PipelineError(
            f"{where}: not a readable ONNX model ({error}); pass the .onnx file the export stage wrote"
        ) from None


def run(model: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """The model's first output for a batch of uint8 images (its single input)."""
    return model.run(None, {model.get_inputs()[0].name: images})[0]


def predict_split(model: ort.InferenceSession, split: Split, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Outputs for every image of the split, in its order, read batch by batch from its shards."""
    return np.concatenate([run(model, x) for x, _ in split.batches(batch_size)])
