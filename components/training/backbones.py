"""The backbone registry: every `model.backbone` tlpipe can build, and what it needs, in one table.

Plain data, so the config validates `model.backbone` against it without importing Keras; the
constructor is looked up by name in `keras.applications` where a model is built
(components.training.models). Adding a backbone is one entry here (and a test run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How pixels reach the backbone: "unit" (tlpipe scales 0..255 to 0..1: its own CNN), "own" (the
# application scales 0..255 itself, include_preprocessing=True), "caffe" (ImageNet mean subtraction,
# done by a built-in Normalization layer; the BGR-trained first convolution is flipped to RGB).
Preprocessing = Literal["unit", "own", "caffe"]


@dataclass(frozen=True)
class Backbone:
    name: str  # the model.backbone value
    keras_class: str | None  # keras.applications.<keras_class>; None: tlpipe's own simple CNN
    min_side: int  # smallest data.image_size the architecture takes
    preprocessing: Preprocessing
    # ImageNet weights without the top as Keras publishes them: the file under source.mirror, and
    # Keras's md5 of it (keras/src/applications/*.py); None: no published weights.
    imagenet_file: str | None = None
    imagenet_md5: str | None = None

    @property
    def is_application(self) -> bool:
        return self.keras_class is not None


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("simple_cnn", None, 4, "unit"),  # two 2x2 poolings
    Backbone("mobilenet_v3_small", "MobileNetV3Small", 32, "own",
             "mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", "d3e8ec802a04aa4fc771ee12a9a9b836"),
    Backbone("mobilenet_v3_large", "MobileNetV3Large", 32, "own",
             "mobilenet_v3/weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", "07fb09a5933dd0c8eaafa16978110389"),
    Backbone("efficientnet_v2_b0", "EfficientNetV2B0", 32, "own",
             "efficientnet_v2/efficientnetv2-b0_notop.h5", "893217f2bb855e2983157299931e43ff"),
    Backbone("resnet50", "ResNet50", 32, "caffe",
             "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "4d473c1dd8becc155b73f8504c6f6626"),
    Backbone("vgg16", "VGG16", 32, "caffe",
             "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"),
)}
NAMES = tuple(BACKBONES)
