"""Pretrained keras.applications backbones: building them with their own preprocessing, loading
their weights (ImageNet, a file, or an S3 object) and freezing them for two-phase fine-tuning."""

from __future__ import annotations

import logging
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from imgcls.config import ModelConfig
from imgcls.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

BACKBONE_LAYER_NAME = "backbone"
# Keras' ImageNet download has no timeout of its own; a firewalled machine must fail, not hang.
DOWNLOAD_TIMEOUT_SECONDS = 60


@keras.saving.register_keras_serializable(package="imgcls")
class CaffePreprocessing(keras.layers.Layer):
    """ResNet50's ImageNet preprocessing inside the model: RGB -> BGR and the ImageNet channel means
    subtracted, so the saved model takes raw 0-255 pixels like every other imgcls model. A registered
    layer (not a Lambda) so the artifact still loads with safe_mode=True."""

    MEANS_BGR = (103.939, 116.779, 123.68)

    def call(self, images):
        bgr = keras.ops.flip(images, axis=-1)
        return bgr - keras.ops.convert_to_tensor(self.MEANS_BGR, dtype=bgr.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _application(name: str) -> tuple[Callable[..., keras.Model], dict[str, Any]]:
    """The keras.applications constructor and the arguments that put its preprocessing inside it."""
    applications = keras.applications
    if name == "MobileNetV3Small":
        return applications.MobileNetV3Small, {"include_preprocessing": True}
    if name == "MobileNetV3Large":
        return applications.MobileNetV3Large, {"include_preprocessing": True}
    if name == "EfficientNetB0":
        return applications.EfficientNetB0, {}  # Rescaling and Normalization are always inside.
    if name == "ResNet50":
        return applications.ResNet50, {}  # Preprocessing comes from CaffePreprocessing in front.
    if name == "ConvNeXtTiny":
        return applications.ConvNeXtTiny, {"include_preprocessing": True}
    raise ValueError(f"unknown backbone {name!r}")


def create_backbone(name: str, image_size: tuple[int, int], weights: str | None) -> keras.Model:
    """The backbone without its top. `weights` is None, "imagenet" or a local file path; the
    constructor's own loading code is used for both, as Keras users expect."""
    constructor, arguments = _application(name)
    return constructor(
        include_top=False, weights=weights, input_shape=(*image_size, 3), pooling=None, name=BACKBONE_LAYER_NAME,
        **arguments,
    )  # fmt: skip


def create_backbone_model(
    config: ModelConfig,
    image_size: tuple[int, int],
    channels: int,
    num_classes: int,
    backbone_weights: str | None = None,
    multilabel: bool = False,
) -> keras.Model:
    """Raw pixels -> (grey to RGB) -> backbone preprocessing -> backbone (in inference mode when
    pretrained) -> global average pooling -> dense head -> predictions."""
    from imgcls.modeling.models import dense_head

    inputs = keras.Input(shape=(*image_size, channels), name="image")
    features = inputs
    if channels == 1:
        # Pretrained filters expect three channels; a grey image is the same value in each.
        features = keras.layers.Concatenate(axis=-1, name="grey_to_rgb")([inputs, inputs, inputs])
    if config.name == "ResNet50":
        features = CaffePreprocessing(name="caffe_preprocessing")(features)
    backbone = create_backbone(config.name, tuple(image_size), backbone_weights)
    if config.is_pretrained_backbone:
        # training=False keeps BatchNorm (and the backbone's dropout) in inference mode even while
        # the rest of the model trains, so pretrained statistics never drift on small batches.
        features = backbone(features, training=False)
    else:
        # From scratch, BatchNorm learns its statistics as usual, but the applications' momenta
        # (0.99-0.999) need thousands of steps to settle: a small data set would validate at chance.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = config.batch_norm_momentum
        features = backbone(features)
    features = keras.layers.GlobalAveragePooling2D(name="global_pool")(features)
    return keras.Model(inputs, dense_head(features, config, num_classes, multilabel), name=config.name)


def backbone_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_LAYER_NAME)


def set_finetune_phase(model: keras.Model, frozen: bool, unfreeze_layers: int | str = "all") -> list[str]:
    """Phase 1 (`frozen`): the whole backbone is frozen. Phase 2: the top `unfreeze_layers` of its
    layers are trainable. BatchNormalization layers are frozen in both. Returns the trainable
    backbone layer names."""
    backbone = backbone_of(model)
    if frozen:
        backbone.trainable = False
        return []
    backbone.trainable = True
    layers = backbone.layers
    first_trainable = 0 if unfreeze_layers == "all" else max(0, len(layers) - int(unfreeze_layers))
    trainable = []
    for index, layer in enumerate(layers):
        layer.trainable = index >= first_trainable and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.trainable and layer.weights:
            trainable.append(layer.name)
    return trainable


def _local_weights_file(uri: str, endpoint_url: str | None, scratch: Path) -> str:
    """A local path for a weights file given as a path or s3:// URI (downloaded into `scratch`)."""
    from imgcls.platform import storage

    location = storage.resolve(uri, endpoint_url)
    if not storage.exists(location):
        raise ConfigError(
            f"model.weights: no weights file at {uri}. Give `imagenet`, `none`, or the path / s3:// URI of a "
            "weights file for the backbone without its top."
        )
    if location.is_local:
        return location.path
    # Keras picks the weights format from the file name, so keep it.
    local = scratch / Path(location.path).name
    local.write_bytes(storage.read_bytes(location))
    return str(local)


def load_pretrained_model(
    config: ModelConfig, image_size: tuple[int, int], channels: int, num_classes: int, endpoint_url: str | None,
    multilabel: bool = False,
) -> keras.Model:
    """Build a backbone model with `model.weights` loaded, or fail with a message that says what to do."""
    name = config.name
    if config.weights == "none":
        return create_backbone_model(config, image_size, channels, num_classes, None, multilabel)
    if config.weights == "imagenet":
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)
        try:
            return create_backbone_model(config, image_size, channels, num_classes, "imagenet", multilabel)
        except Exception as error:  # Keras raises a bare Exception when the download fails.
            if "URL fetch failure" not in str(error) and not isinstance(error, OSError):
                raise
            raise UserError(
                f"Could not download the ImageNet weights for {name} ({error}). This machine cannot reach "
                f"Keras' weight store. Copy the weights file for {name} without its top (from a machine with "
                "internet access, `keras.applications."
                f"{name}(include_top=False).save_weights('{name}.weights.h5')`) and set "
                f"model.weights to its local path or s3:// URI, or set model.weights=none to start from random weights."
            ) from None
        finally:
            socket.setdefaulttimeout(previous_timeout)
    with tempfile.TemporaryDirectory(prefix="imgcls-weights-") as scratch:
        path = _local_weights_file(config.weights, endpoint_url, Path(scratch))
        try:
            return create_backbone_model(config, image_size, channels, num_classes, path, multilabel)
        except (ValueError, KeyError, OSError) as error:
            raise ConfigError(
                f"model.weights: {config.weights} does not fit {name} without its top at image size "
                f"{list(image_size)} ({str(error).splitlines()[0][:300]}). Give a weights file saved from "
                f"keras.applications.{name}(include_top=False)."
            ) from None
