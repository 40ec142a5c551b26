"""The deployment bundle: one folder a user copies to a server, written by the export stage.

    <bundle>/model.onnx, labels.txt, MODEL_CARD.md      for `tlpipe serve` or any onnxruntime
    <bundle>/report.html                                the run report, its export section filled in
    <bundle>/triton/<name>/config.pbtxt, labels.txt     a Triton Inference Server model repository
    <bundle>/triton/<name>/1/model.onnx                 (`tritonserver --model-repository <bundle>/triton`)

config.pbtxt is generated from the ONNX graph's own signature (names, element types, dims), so it
cannot drift from the model it describes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import onnx

from components.core.artifacts import atomic_dir
from components.core.errors import PipelineError
from components.core.reports import ExportReport, GatesReport, Lineage, gate_table, number

TRITON_NAME = "tlpipe_classifier"
CARD_FILE = "MODEL_CARD.md"
LINEAGE_FILE = "lineage.json"
TRITON_MAX_BATCH = 64

# ONNX element type -> Triton data_type (model_config.proto); the types an image classifier uses.
_TRITON_TYPES = {
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
}


def _signature(value: onnx.ValueInfoProto) -> tuple[str, int, list[int]]:
    """(name, element type, dims with -1 for every dynamic dim)."""
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return value.name, tensor.elem_type, dims


def _tensor_block(value: onnx.ValueInfoProto, batched: bool, extra: str = "") -> str:
    name, elem, dims = _signature(value)
    if elem not in _TRITON_TYPES:
        raise PipelineError(f"tensor {name!r} has ONNX element type {elem}, which the Triton config does not map")
    shown = dims[1:] if batched else dims  # with max_batch_size > 0, Triton's dims leave out the batch dim
    return (
        "  {\n"
        f'    name: "{name}"\n'
        f"    data_type: {_TRITON_TYPES[elem]}\n"
        f"    dims: [ {', '.join(map(str, shown))} ]\n"
        f"{extra}"
        "  }"
    )


def triton_config(model: onnx.ModelProto, name: str, max_batch_size: int) -> str:
    """config.pbtxt for Triton's onnxruntime backend, from the graph's inputs and outputs."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    # Triton batches only along a leading dynamic dim shared by every tensor; else it sends whole tensors.
    batched = max_batch_size > 0 and all(_signature(v)[2][:1] == [-1] for v in [*inputs, *model.graph.output])
    labels = '    label_filename: "labels.txt"\n' if len(model.graph.output) == 1 else ""
    blocks_in = ",\n".join(_tensor_block(v, batched) for v in inputs)
    blocks_out = ",\n".join(_tensor_block(v, batched, labels) for v in model.graph.output)
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size if batched else 0}\n"
        f"input [\n{blocks_in}\n]\n"
        f"output [\n{blocks_out}\n]\n"
        + ("dynamic_batching { }\n" if batched else "")
        + 'instance_group [ { kind: KIND_CPU } ]\n'
    )


def labels_text(labels: Iterable[str]) -> str:
    """labels.txt: one class name a line, in output order (the bundle's, Triton's and a release's)."""
    return "".join(f"{label}\n" for label in labels)


def metadata(model: onnx.ModelProto, path: Path) -> dict[str, str]:
    """The tlpipe metadata of an exported model (labels, input spec, preprocessing, version)."""
    meta = {prop.key: prop.value for prop in model.metadata_props}
    if "labels" not in meta or "input_spec" not in meta:
        raise PipelineError(f"{path}: ONNX model without tlpipe metadata; export it with `tlpipe stage export`")
    return meta


def _lineage_section(lineage: Lineage) -> list[str]:
    code, data, metrics = lineage.code, lineage.dvc.get("data") or {}, lineage.metrics
    challenger, champion = metrics["challenger"], metrics.get("champion")
    return [
        f"## Lineage: release {lineage.version}",
        "",
        f"- Promoted {lineage.time}; ONNX sha256 `{lineage.onnx_sha256}`",
        f"- Code: commit `{code['commit']}`" + (" with uncommitted changes" if code.get("dirty") else "")
        if code.get("commit") else f"- Code: {code.get('note')}",
        f"- Git tag: `{lineage.tag}`" if lineage.tag else "- Git tag: none",
        f"- Replaced: {lineage.replaced or 'nothing (first champion: absolute gates only)'}",
        "- Data (md5 as dvc.lock pins them):" if data
        else f"- Data: {lineage.dvc.get('note', 'no data outputs in dvc.lock')}",
        *(f"  - `{path}`: `{md5}`" for path, md5 in data.items()),
        f"- Test split: {challenger.test_images} images; accuracy {number(challenger.accuracy)}, macro F1 "
        f"{number(challenger.macro_f1)}"
        + (f" (champion it replaced: {number(champion.accuracy)}, {number(champion.macro_f1)})" if champion else ""),
        "",
        "### Promotion gates",
        "",
        gate_table(lineage.gates),
        "",
        f"Params, every DVC output hash and per-class metrics: `{LINEAGE_FILE}`.",
        "",
    ]


def model_card(data: bytes, export_report: ExportReport | None, gates: GatesReport | None,
               lineage: Lineage | None = None) -> str:
    """MODEL_CARD.md of an exported model: the bundle's (export facts and evaluation gates), and a release's
    (the same, when the export report describes this model, then its lineage and promotion gates)."""
    meta = metadata(onnx.load_from_string(data), Path("model.onnx"))
    labels = json.loads(meta["labels"])
    spec = json.loads(meta["input_spec"])
    side = spec["image_size"]
    if export_report is not None:
        parity = (f"- ONNX opset {export_report.opset}; onnxruntime agrees with the Keras model to\n"
                  f"  {export_report.max_abs_diff:.1e} (max |difference|) on held-out images.\n")
        variants = [f"- `{name}`: {'accepted' if v.get('accepted') else 'refused'} ({v.get('reason', '')})"
                    for name, v in export_report.variants.items()] or ["- none built (export.variants in params.yaml)"]
        variants_text = "\n## Optimized variants\n\n" + "\n".join(variants) + "\n"
    else:
        parity, variants_text = "", ""
    gates_text = ("\n## Evaluation gates (held-out target test split)\n\n" + gate_table(gates.gates) + "\n"
                  if gates is not None else "")
    # No timestamp: an unchanged model must give a byte-identical bundle (DVC then stores nothing new).
    card = f"""# Model card: tlpipe image classifier

Written by the tlpipe export stage (tlpipe {meta.get('tlpipe_version', 'unknown')}).

## Model

- File: `model.onnx`, {len(data)} bytes, sha256 `{hashlib.sha256(data).hexdigest()}`
- Classes ({len(labels)}), in output order: {', '.join(f'`{label}`' for label in labels)} (also `labels.txt`)
- Input `{spec['name']}`: {spec['dtype']} {spec['layout']}, {spec['channels']} channel(s) ({spec['color_mode']}),
  any batch and any height/width; the model scales and resizes to {side}x{side} inside.
- Output: softmax probabilities, one per class.
{parity}
## Preprocessing

{meta.get('preprocessing', '')}
{gates_text}{variants_text}
## Serving

- HTTP: `tlpipe serve model.onnx --host 0.0.0.0 --port 8000`, then
  `curl -F file=@image.png http://HOST:8000/predict` (see README, "Deploy").
- Triton Inference Server: `tritonserver --model-repository triton` (model `{TRITON_NAME}`,
  `config.pbtxt` generated from this graph's signature). Triton does no decoding or resizing:
  send uint8 pixels resized to {side}x{side} as above for the same answers as training.

## Limitations

Trained on the image folders named in params.yaml only; it labels every input as one of the
classes above, including images of none of them. Check the metrics before trusting it on a new
kind of image.
"""
    return card if lineage is None else card + "\n" + "\n".join(_lineage_section(lineage))


def write_bundle(
    model_path: Path, out_dir: Path, export_report: ExportReport, gates: GatesReport, name: str = TRITON_NAME,
    report_html: Path | None = None,
) -> Path:
    """Write the bundle folder atomically (a killed run leaves the previous bundle whole).

    report_html: the run report (the report stage's page), copied with this export's facts filled in.
    """
    data = Path(model_path).read_bytes()
    model = onnx.load_from_string(data)
    labels_txt = labels_text(json.loads(metadata(model, model_path)["labels"]))
    with atomic_dir(out_dir) as folder:
        (folder / "model.onnx").write_bytes(data)
        (folder / "labels.txt").write_text(labels_txt)
        (folder / CARD_FILE).write_text(model_card(data, export_report, gates))
        if report_html is not None and Path(report_html).is_file():
            from components.deploy.report import refresh_export

            page = refresh_export(Path(report_html).read_text(encoding="utf-8"), export_report)
            (folder / "report.html").write_text(page, encoding="utf-8")
        triton = folder / "triton" / name
        (triton / "1").mkdir(parents=True)
        (triton / "1" / "model.onnx").write_bytes(data)
        (triton / "labels.txt").write_text(labels_txt)
        (triton / "config.pbtxt").write_text(triton_config(model, name, TRITON_MAX_BATCH))
    return Path(out_dir)
