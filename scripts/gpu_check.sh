#!/usr/bin/env bash
# GPU check: run the fine-tune stage with KERAS_BACKEND=jax, print images/second and whether mixed
# precision is active. On a GPU it fails unless the backbone computed in float16/bfloat16
# (finetune.precision: auto picks mixed_bfloat16 there); on CPU it reports float32 and passes.
#
#   scripts/gpu_check.sh [params.yaml]     (PYTHON=... to pick the interpreter; default .venv/bin/python)
#
# Needs data/clean and models/transferred (from `dvc repro transfer`); if they are missing it runs
# the stages before finetune first (those need the full install, TensorFlow not required).
set -euo pipefail
cd "$(dirname "$0")/.."
PARAMS="${1:-params.yaml}"
PYTHON="${PYTHON:-.venv/bin/python}"
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2 GX_ANALYTICS_ENABLED=false

read -r clean transferred report < <("$PYTHON" - "$PARAMS" <<'PY'
import sys
from components.core.config import load_params
p = load_params(sys.argv[1]).paths
print(p.clean, p.transferred_model, p.finetune_report)
PY
)
echo "devices: $("$PYTHON" -c 'import jax; print(", ".join(str(d) for d in jax.devices()))')"
if [[ ! -f "$transferred/model.keras" || ! -f "$clean/target/classes.json" ]]; then
  for stage in ingest validate clean source transfer; do
    "$PYTHON" -m components stage "$stage" --params "$PARAMS"
  done
fi
"$PYTHON" -m components stage finetune --params "$PARAMS"

"$PYTHON" - "$report" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
import jax
on_accelerator = any(d.platform != "cpu" for d in jax.devices())
for name, phase in report["phases"].items():
    print(f"{name}: {phase['images_per_second']:.1f} images/second over {phase['epochs_run']} epochs "
          f"({phase['seconds']:.1f} s)")
mixed = any(dtype in ("float16", "bfloat16") for dtype in report["compute_dtype"])
print(f"backend {report['backend']}, policy {report['precision']}, compute dtype {report['compute_dtype']}: "
      f"mixed precision {'ACTIVE' if mixed else 'not active'}; val accuracy {report['val_accuracy']:.4f}")
if on_accelerator and not mixed:
    sys.exit("gpu_check: on an accelerator but mixed precision is not active (finetune.precision?)")
PY
