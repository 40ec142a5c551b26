"""Which layers train in each fine-tuning phase: the one place that decides it.

- `head`: the backbone frozen whole; only the new head trains (the Keras transfer-learning guide).
- `unfrozen`: the top `unfreeze_top` weighted backbone layers train too (-1: all, 0: none).

In both, every BatchNorm layer stays frozen, in inference mode: its moving statistics are the source
task's, and a small target batch would overwrite them (see models.keep_batchnorm_inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras

from components.training.models import BACKBONE_NAME, keep_batchnorm_inference, weighted_layers

Phase = Literal["head", "unfrozen"]


@dataclass(frozen=True)
class Trainable:
    """What trains in a phase, as weighted layer paths ("backbone.block3_conv2", "head")."""

    phase: Phase
    backbone: tuple[str, ...]  # the backbone layers that train (BatchNorm never does)
    frozen: int  # weighted backbone layers that do not train (BatchNorm included)
    others: tuple[str, ...]  # the weighted layers outside the backbone (the head), which always train

    def __str__(self) -> str:
        if not self.backbone:
            return f"{self.phase} phase: training {', '.join(self.others)} only, backbone frozen ({self.frozen} layers)"
        return (f"{self.phase} phase: training {', '.join(self.others)} and {len(self.backbone)} backbone layers "
                f"({self.frozen} frozen, BatchNorm included): {', '.join(p.split('.', 1)[1] for p in self.backbone)}")


def set_phase(model: keras.Model, phase: Phase, unfreeze_top: int = 0) -> Trainable:
    """Set `trainable` on every layer of `model` for `phase`; returns what trains.

    `unfreeze_top` counts weighted backbone layers from the top (BatchNorm layers among them count,
    but stay frozen); the head phase ignores it.
    """
    backbone = model.get_layer(BACKBONE_NAME)
    weighted = [layer for _, layer in weighted_layers(backbone)]
    count = 0 if phase == "head" else len(weighted) if unfreeze_top < 0 else min(unfreeze_top, len(weighted))
    chosen = weighted[len(weighted) - count :] if count else []
    # The whole-model switch first: setting it on a model resets every sublayer.
    backbone.trainable = bool(chosen)
    for layer in weighted:
        layer.trainable = layer in chosen
    kept = set(keep_batchnorm_inference(backbone))
    training = tuple(f"{BACKBONE_NAME}.{layer.name}" for layer in chosen if layer.name not in kept)
    others = tuple(path for path, layer in weighted_layers(model) if not path.startswith(f"{BACKBONE_NAME}."))
    return Trainable(phase, training, len(weighted) - len(training), others)
