"""Job configuration: pydantic models, YAML loading and `--set key=value` overrides.

Defaults live in the models, a YAML file overrides them, and `--set` overrides the file.
This module imports no TensorFlow or Ray so that validating a config is instant.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from imgcls.errors import ConfigError, clip, shorten


# Bytes read of one image file at most (config key `max_image_bytes`): far above any real photo.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
# Bounds of `max_image_pixels`: below 32x32 nothing real decodes; above 1e9 pixels (4 GB of RGBA) the
# limit no longer protects a worker's memory.
MIN_IMAGE_PIXELS_LIMIT = 1_024
MAX_IMAGE_PIXELS_LIMIT = 1_000_000_000
# Bounds of each side of `data.image_size`: every batch is batch_size x height x width x channels
# floats, so a side of 100,000 asks Ray for hundreds of GiB before any image is read.
MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 4096
# Bytes of a config file read at most: real configs are a few kilobytes, and the file is read whole.
MAX_CONFIG_BYTES = 1_048_576
# Nesting of YAML collections accepted at most: PyYAML composes recursively, so `[[[[...` a megabyte
# deep would end in a RecursionError; configs nest three or four levels.
MAX_YAML_DEPTH = 64
# Problems listed at most in one validation message; the count of the rest is given.
MAX_PROBLEMS_SHOWN = 10


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment, and
    no float may be infinite or NaN (YAML's `.inf` and `.nan` would pass every `gt`/`le` bound check
    or poison training silently)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def normalised_uri(uri: str) -> str:
    """`uri` in the one form that comparisons between config locations use (the same resolution as
    `imgcls.storage.resolve`, without touching any filesystem): `file://` dropped; `s3://` and `s3a://`
    URIs as `s3://` plus the rest without trailing slashes, object keys otherwise untouched; local paths
    with `~` expanded, made absolute against `IMGCLS_BASE_DIR` (else the current directory) and
    normalised. Other schemes are only stripped of trailing slashes (storage refuses them later)."""
    scheme, separator, rest = uri.partition("://")
    if separator:
        scheme = scheme.lower()
        if scheme in ("s3", "s3a"):
            return "s3://" + rest.rstrip("/")
        if scheme != "file":
            return f"{scheme}://{rest.rstrip('/')}"
        uri = rest
    path = os.path.expanduser(uri)
    if not os.path.isabs(path):
        path = os.path.join(os.environ.get("IMGCLS_BASE_DIR") or os.getcwd(), path)
    path = os.path.normpath(path)
    # POSIX normpath keeps exactly two leading slashes; for comparisons `//x` is `/x`.
    return "/" + path.lstrip("/") if path.startswith("//") else path


def uri_contains(parent: str, child: str) -> bool:
    """Whether `child` is `parent` or lies below it, on whole path components (`/a` holds `/a/b`, not
    `/ab`). Both are normalised first; an s3:// URI never contains a local path or the reverse."""
    parent, child = normalised_uri(parent), normalised_uri(child)
    if parent == child:
        return True
    prefix = parent if parent.endswith("/") else parent + "/"
    return child.startswith(prefix)


def _usable_output(value: str) -> str:
    """An output location must name a folder of its own: empty would be the current directory by
    accident, and `/` would have a run write (and an overwrite replace) files at the filesystem root."""
    if not value.strip():
        raise ValueError("must not be empty; name the folder the outputs go to")
    if normalised_uri(value) == "/":
        raise ValueError("must not be the root directory (/); name a folder of its own")
    return value


class DataConfig(StrictModel):
    train: str = Field(
        description="Labelled training images, local or s3://: a folder with one sub-folder per class "
        "(`root/<class>/<image>`), or a CSV/Parquet manifest with `path,label` columns (paths absolute "
        "URIs or relative to the manifest)."
    )
    val: str | None = Field(
        default=None,
        description="Optional separate validation set in the same forms as `train`. When unset, "
        "`val_fraction` of `train` is held out instead.",
    )
    val_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Fraction of each class held out for validation when `data.val` is unset "
        "(0 disables validation). Rule of thumb: 0.1-0.2.",
    )
    image_size: tuple[int, int] = Field(
        default=(64, 64),
        description="[height, width] in pixels that every image is resized to before the model, each "
        "between 8 and 4096. The tutorial uses 64x64; small images (16-32 px) train much faster.",
    )
    channels: Literal[1, 3] = Field(
        default=3, description="Colour channels the model sees: 3 converts every image to RGB, 1 to greyscale."
    )
    max_image_pixels: int = Field(
        default=89_478_485,
        ge=MIN_IMAGE_PIXELS_LIMIT,
        le=MAX_IMAGE_PIXELS_LIMIT,
        description="Images with more pixels (width x height) than this are refused as possible "
        "decompression bombs and reported as skipped. Pillow's own default; between 1,024 and 1,000,000,000.",
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES,
        ge=1024,
        description="Image files larger than this many bytes are not read and are reported as skipped (a huge or "
        "endless file must never exhaust memory). Default 256 MiB; no real photo comes close.",
    )
    decode_batch_size: int = Field(
        default=64, gt=0, description="Images decoded per Ray Data task batch. Larger batches mean fewer, bigger tasks."
    )

    @field_validator("image_size")
    @classmethod
    def _image_size_positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < MIN_IMAGE_SIDE:
            raise ValueError(f"image_size must be at least [{MIN_IMAGE_SIDE}, {MIN_IMAGE_SIDE}] pixels, got {list(value)}")
        if max(value) > MAX_IMAGE_SIDE:
            raise ValueError(
                f"image_size must be at most [{MAX_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] pixels: each batch holds "
                "batch_size images of this size"
            )
        return value


class AugmentConfig(StrictModel):
    """Random changes to training images, drawn afresh every epoch; validation, evaluation and
    prediction images are never augmented. All off by default. The tutorial's settings (Keras'
    ImageDataGenerator) were `horizontal_flip: true`, `zoom: 0.2`, `shear_degrees: 0.2`."""

    horizontal_flip: bool = Field(default=False, description="Mirror left-right with probability 0.5.")
    vertical_flip: bool = Field(default=False, description="Mirror top-bottom with probability 0.5.")
    rotation_degrees: float = Field(
        default=0.0, ge=0, le=180, description="Rotate by up to +/- this many degrees. Rule of thumb: 10-20."
    )
    shear_degrees: float = Field(default=0.0, ge=0, lt=60, description="Shear by up to +/- this many degrees.")
    zoom: float = Field(
        default=0.0, ge=0, lt=1, description="Zoom by a factor in [1 - zoom, 1 + zoom]; zooming in is a random crop."
    )
    translation: float = Field(
        default=0.0, ge=0, lt=1, description="Shift by up to +/- this fraction of the height and width."
    )
    brightness: float = Field(
        default=0.0, ge=0, le=1, description="Add up to +/- this fraction of full scale (255) to every pixel."
    )
    contrast: float = Field(
        default=0.0, ge=0, lt=1, description="Scale contrast around the image mean by a factor in [1 - c, 1 + c]."
    )

    @property
    def is_geometric(self) -> bool:
        return bool(
            self.horizontal_flip
            or self.vertical_flip
            or self.rotation_degrees
            or self.shear_degrees
            or self.zoom
            or self.translation
        )

    @property
    def is_active(self) -> bool:
        return self.is_geometric or bool(self.brightness or self.contrast)


# Error type of a value refused for holding credentials: its input is never shown.
CREDENTIALS_ERROR_TYPE = "credentials_in_url"


class StorageConfig(StrictModel):
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (e.g. http://minio:9000) for every s3:// URI. Unset: "
        "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS S3. Credentials never go here: they come "
        "from the standard AWS chain (environment, ~/.aws, instance or pod role).",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        if value and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            # Its own error type, so that format_validation_error never echoes the value: it holds a secret.
            raise PydanticCustomError(
                CREDENTIALS_ERROR_TYPE, "must not contain credentials; use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        return value


# keras.applications backbones usable as `model.name`, with the smallest input they accept.
BACKBONES = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0", "ResNet50", "ConvNeXtTiny")
BACKBONE_MIN_IMAGE_SIZE = 32
ModelName = Literal["seed_cnn", "cnn", "MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0", "ResNet50", "ConvNeXtTiny"]


class ModelConfig(StrictModel):
    name: ModelName = Field(
        default="seed_cnn",
        description="Architecture. `seed_cnn` is the tutorial network, fixed: Conv2D(32, 3x3) -> MaxPool -> "
        "Flatten -> Dense(128) -> sigmoid/softmax. `cnn` is built from the keys below. A keras.applications "
        "backbone (MobileNetV3Small, MobileNetV3Large, EfficientNetB0, ResNet50, ConvNeXtTiny) gets its own "
        "preprocessing, global average pooling and a new head (`dense_units`, `dense_dropout`); see `finetune`.",
    )
    weights: str = Field(
        default="imagenet",
        description="Backbones only: `imagenet` (Keras' published weights, downloaded once into ~/.keras/models), "
        "`none` (random initialisation), or a local path / s3:// URI of a weights file for the backbone "
        "without its top (`.weights.h5` from `save_weights`, or Keras' `*_no_top*.h5`).",
    )
    init_from: str | None = Field(
        default=None,
        description="Warm start: URI of an earlier imgcls artifact (output_dir/model) with the same architecture "
        "and image size. Its weights are the starting point; a new head is made when the classes differ. "
        "Takes precedence over `weights`.",
    )
    filters: list[int] = Field(
        default=[32, 64, 128],
        min_length=1,
        description="cnn: one conv block per entry, with this many filters. Doubling per block is the usual rule.",
    )
    convs_per_block: int = Field(default=2, ge=1, le=4, description="cnn: Conv2D layers in each block.")
    kernel_size: int = Field(default=3, ge=1, le=11, description="cnn: square kernel side in pixels.")
    batch_norm: bool = Field(default=True, description="cnn: BatchNormalization after each convolution.")
    batch_norm_momentum: float = Field(
        default=0.9,
        gt=0,
        lt=1,
        description="cnn, and backbones trained from scratch (weights: none): BatchNorm moving-statistics momentum. "
        "Keras' 0.99 needs thousands of steps to settle; 0.9 suits the few hundred steps of a small data set.",
    )
    block_dropout: float = Field(default=0.1, ge=0, lt=1, description="cnn: dropout rate after each block.")
    pooling: Literal["max", "average"] = Field(default="max", description="cnn: 2x2 pooling after each block.")
    head: Literal["global_average", "flatten"] = Field(
        default="global_average",
        description="cnn: how feature maps become a vector: global average pooling (few parameters) or flatten.",
    )
    dense_units: list[int] = Field(default=[128], description="cnn: hidden Dense layers (relu) before the output.")
    dense_dropout: float = Field(default=0.3, ge=0, lt=1, description="cnn: dropout rate before each Dense layer.")

    @property
    def is_pretrained_backbone(self) -> bool:
        """A backbone that starts from learned weights: it gets the frozen-BatchNorm fine-tuning
        treatment. A backbone with `weights: none` trains from scratch like any network."""
        return self.name in BACKBONES and (self.weights != "none" or self.init_from is not None)

    @field_validator("filters", "dense_units")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if any(size <= 0 for size in value):
            raise ValueError(f"every entry must be a positive integer, got {shorten(value)}")
        return value


class FinetuneConfig(StrictModel):
    """Two-phase transfer learning for backbones: first the new head alone, then the top of the backbone.
    BatchNorm layers stay frozen and in inference mode throughout, so small batches never disturb
    the pretrained statistics."""

    freeze_epochs: int | None = Field(
        default=None,
        ge=0,
        description="Epochs with the whole backbone frozen (only the head trains). Unset: frozen for the whole "
        "run (feature extraction). 0: fine-tune from the first epoch.",
    )
    unfreeze_layers: int | Literal["all"] = Field(
        default="all",
        description="After freeze_epochs, how many of the backbone's layers, counted from its top, become "
        "trainable (BatchNorm excepted); `all` unfreezes every layer.",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        description="Base learning rate once the backbone is unfrozen. Unset: train.learning_rate / 10; small "
        "rates keep the pretrained features from being wiped out.",
    )

    @field_validator("unfreeze_layers")
    @classmethod
    def _unfreeze_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"must be a positive number of layers or 'all', got {shorten(value)}")
        return value


class ScheduleConfig(StrictModel):
    """Learning rate over training; `train.learning_rate` is the peak/base rate."""

    name: Literal["constant", "step", "cosine", "reduce_on_plateau"] = Field(
        default="constant",
        description="constant; step (x step_factor every step_epochs); cosine (to min_learning_rate at the end); "
        "reduce_on_plateau (x plateau_factor when `monitor` stalls for plateau_patience epochs).",
    )
    warmup_epochs: float = Field(
        default=0.0, ge=0, description="Linear warm-up from ~0 to the base rate over this many epochs, before any schedule."
    )
    step_epochs: int = Field(default=10, ge=1, description="step: epochs between decays.")
    step_factor: float = Field(default=0.1, gt=0, le=1, description="step: multiplier at each decay.")
    min_learning_rate: float = Field(default=0.0, ge=0, description="cosine and reduce_on_plateau: the floor.")
    plateau_factor: float = Field(default=0.5, gt=0, lt=1, description="reduce_on_plateau: multiplier on a plateau.")
    plateau_patience: int = Field(default=2, ge=1, description="reduce_on_plateau: epochs without improvement.")
    monitor: str = Field(default="val_loss", description="reduce_on_plateau: metric watched (min for *loss, else max).")


class EarlyStoppingConfig(StrictModel):
    enabled: bool = Field(default=False, description="Stop when `monitor` stops improving.")
    monitor: str = Field(default="val_loss", description="Metric watched: minimised if it ends in 'loss', else maximised.")
    patience: int = Field(default=3, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, description="Smallest change that counts as an improvement.")
    restore_best_weights: bool = Field(default=True, description="End with the weights of the best epoch.")


class TrainConfig(StrictModel):
    epochs: int = Field(default=10, gt=0, description="Passes over the training set.")
    batch_size: int = Field(
        default=32,
        gt=0,
        description="Images per step on each worker; the global batch is batch_size x scaling.num_workers.",
    )
    learning_rate: float = Field(default=0.001, gt=0, description="Optimizer step size. Adam's usual 1e-3.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        default="adam", description="adam (the tutorial's), adamw (decoupled weight decay 1e-4) or sgd (momentum 0.9)."
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=1, description="Soften one-hot targets by this much (0.1 is common); 0 disables."
    )
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        default=None,
        description="Loss weight per class for imbalanced data: none, `balanced` (n / (classes x count)), "
        "or a mapping {class_name: weight} (missing classes weigh 1).",
    )
    max_failures: int = Field(
        default=0, ge=-1, description="Worker failures survived by restarting from the last checkpoint (-1: no limit)."
    )
    checkpoint_monitor: str = Field(
        default="val_loss",
        description="Metric that ranks checkpoints (minimised if it ends in 'loss'); `loss` is used without validation.",
    )
    checkpoints_to_keep: int | None = Field(
        default=None, ge=1, description="Best checkpoints kept by checkpoint_monitor; unset keeps all."
    )
    mixed_precision: bool = Field(
        default=False, description="float16 compute with loss scaling; only applied when scaling.use_gpu is on."
    )
    tensorboard: bool = Field(default=False, description="Write TensorBoard event files to output_dir/tensorboard.")

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights_finite_and_non_negative(cls, value: Any) -> Any:
        # Checked before the union is tried, so that a bad weight gives one message, not one per member.
        if isinstance(value, dict):
            for class_name, weight in value.items():
                if isinstance(weight, (int, float)) and not isinstance(weight, bool):
                    if not math.isfinite(weight) or weight < 0:
                        raise ValueError(
                            f"the weight of class {shorten(class_name)} must be a finite number >= 0"
                        )
        return value


class ScalingConfig(StrictModel):
    num_workers: int = Field(default=1, gt=0, description="Data-parallel Ray Train workers (one model replica each).")
    use_gpu: bool = Field(default=False, description="Give each worker one GPU.")
    cpus_per_worker: float | None = Field(
        default=None,
        gt=0,
        description="CPUs reserved per training worker. Unset: up to 1, shrunk so that `data_cpus` stay free.",
    )
    data_cpus: float = Field(
        default=1.0,
        ge=0.25,
        description="CPUs kept free for Ray Data (reading, decoding). Training workers that take every CPU "
        "starve the data pipeline and hang, so at least a quarter CPU is always kept.",
    )


SEARCH_DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")


class TuneSettings(StrictModel):
    """A Ray Tune search over JobConfig fields; each trial is a full training run with its own output."""

    search_space: dict[str, dict[str, list[Any]]] = Field(
        description="Dotted config key -> one domain: `{choice: [a, b]}` (random pick), `{grid: [a, b]}` (every "
        "value, times num_samples), `{uniform: [low, high]}`, `{loguniform: [low, high]}` (learning rates), "
        "`{randint: [low, high]}` (high excluded). Example: `train.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}`.",
    )
    num_samples: int = Field(default=8, gt=0, description="Trials drawn from the space (each grid value this many times).")
    metric: str = Field(default="val_accuracy", description="Reported metric that ranks trials, e.g. val_accuracy, val_loss.")
    mode: Literal["min", "max"] | None = Field(
        default=None, description="Whether `metric` is minimised or maximised. Unset: min for *loss, else max."
    )
    max_concurrent_trials: int | None = Field(
        default=None,
        gt=0,
        description="Trials run at once. Unset: as many as the cluster's CPUs allow with CPU left for Ray Data "
        "(one at a time on 2 CPUs). Each trial gets an equal share of the cluster.",
    )
    asha: bool = Field(default=True, description="Stop poor trials early with ASHA (asynchronous successive halving).")
    grace_period: int = Field(default=1, ge=1, description="ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(
        default=2.0, gt=1, description="ASHA: keep the top 1/reduction_factor of trials at each rung."
    )

    @field_validator("search_space")
    @classmethod
    def _domains_well_formed(cls, value: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        if not value:
            raise ValueError("needs at least one key to search over")
        for key, domain in value.items():
            shown_key = clip(key)
            if key.split(".")[0] in ("tune", "output_dir"):
                raise ValueError(f"{shown_key}: tune.* and output_dir cannot be searched over")
            if len(domain) != 1 or next(iter(domain)) not in SEARCH_DOMAINS:
                raise ValueError(f"{shown_key}: give exactly one of {', '.join(SEARCH_DOMAINS)}, got {shorten(domain)}")
            (kind, values), = domain.items()
            if not values:
                raise ValueError(f"{shown_key}: {kind} needs values")
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2 or not all(isinstance(bound, (int, float)) for bound in values):
                    raise ValueError(f"{shown_key}: {kind} takes [low, high], got {shorten(values)}")
                # NaN compares false with everything, so it would slip past the checks below.
                if not all(math.isfinite(bound) for bound in values):
                    raise ValueError(f"{shown_key}: {kind} bounds must be finite numbers, got {values}")
                if values[0] >= values[1]:
                    raise ValueError(f"{shown_key}: {kind} needs low < high, got {values}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{shown_key}: loguniform needs low > 0, got {values}")
        return value

    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric.endswith("loss") else "max")


class JobConfig(StrictModel):
    """Everything a training run needs; saved resolved as `output_dir/config.yaml`."""

    data: DataConfig
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tune: TuneSettings | None = Field(
        default=None, description="Hyperparameter search for `jobs/tune.py`; ignored by `jobs/train.py`."
    )
    output_dir: str = Field(
        default="runs/latest",
        description="Where the run writes config.yaml, checkpoints and the model artifact (`output_dir/model`); "
        "local or s3://.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    seed: int = Field(default=0, description="Seeds the train/val split, weight initialisation and data order.")

    @field_validator("output_dir")
    @classmethod
    def _output_dir_usable(cls, value: str) -> str:
        return _usable_output(value)

    @model_validator(mode="after")
    def _output_dir_apart_from_data(self) -> "JobConfig":
        # A run writes (and a rerun replaces) files under output_dir: the images must not be among them.
        for key, data_uri in (("data.train", self.data.train), ("data.val", self.data.val)):
            if data_uri is not None and uri_contains(self.output_dir, data_uri):
                relation = "is" if normalised_uri(self.output_dir) == normalised_uri(data_uri) else "holds"
                raise ValueError(
                    f"output_dir {clip(self.output_dir)} {relation} {key} {clip(data_uri)}: the run's checkpoints "
                    "and model would be written among the training images; choose an output_dir outside the data"
                )
        return self

    @model_validator(mode="after")
    def _backbone_fits(self) -> "JobConfig":
        if self.model.name in BACKBONES:
            if min(self.data.image_size) < BACKBONE_MIN_IMAGE_SIZE:
                raise ValueError(
                    f"model.name {self.model.name} needs data.image_size of at least "
                    f"[{BACKBONE_MIN_IMAGE_SIZE}, {BACKBONE_MIN_IMAGE_SIZE}], got {list(self.data.image_size)}"
                )
        if self.finetune.freeze_epochs is not None and not self.model.is_pretrained_backbone:
            what = (
                f"model.name {self.model.name}"
                if self.model.name not in BACKBONES
                else f"{self.model.name} with model.weights none (training from scratch)"
            )
            raise ValueError(
                f"finetune.freeze_epochs applies to backbones ({', '.join(BACKBONES)}) that start from pretrained "
                f"weights (model.weights, or model.init_from), not to {what}"
            )
        return self


# Where bulk classification runs its model (see PredictConfig.placement).
Placement = Literal["auto", "driver", "actor_pool"]


class PredictConfig(StrictModel):
    """Bulk classification settings; CLI flags fill these and `--set` can change any of them."""

    model: str = Field(description="URI of a model artifact directory (contains model.keras and metadata.json).")
    input: str = Field(description="URI of a folder of images (read recursively) or a CSV/Parquet manifest with a `path` column.")
    output: str = Field(description="URI of the Parquet dataset directory the predictions are written to.")
    top_k: int | None = Field(
        default=None, gt=0, description="Labels kept per image in top_k_labels; default min(5, number of classes)."
    )
    batch_size: int = Field(default=64, gt=0, description="Images per model call in each actor.")
    decode_batch_size: int = Field(default=64, gt=0, description="Images decoded per Ray Data task batch.")
    num_actors: int | None = Field(
        default=None, gt=0, description="Model actors in the pool. Unset: cluster CPUs minus one, at least one."
    )
    max_actors: int | None = Field(
        default=None,
        gt=0,
        description="Let the pool grow from num_actors up to this many actors while they are busy and the "
        "cluster has room (an autoscaling pool). Unset: a fixed pool of num_actors.",
    )
    use_gpu: bool = Field(default=False, description="Give each model actor one GPU.")
    placement: Placement = Field(
        default="auto",
        description="Where the model runs. driver: in the job's own process, decoding on threads (no Ray tasks or "
        "actors). actor_pool: Ray Data decode tasks and a pool of model actors. auto: a pool when one is sized "
        "(use_gpu, num_actors, max_actors) or when a run of at least pool_min_images can use more than this "
        "machine (a Ray cluster of several nodes, or a machine with more than 8 CPUs); otherwise the driver.",
    )
    pool_min_images: int = Field(
        default=5_000,
        ge=0,
        description="With placement auto, runs with fewer images to classify stay in the job's own process "
        "without looking for a Ray cluster: an actor pool takes 5-8 s to start on 2 cores and decode tasks "
        "1-2 s more, longer than such a run.",
    )
    max_image_pixels: int = Field(
        default=89_478_485,
        ge=MIN_IMAGE_PIXELS_LIMIT,
        le=MAX_IMAGE_PIXELS_LIMIT,
        description="Larger images are refused as possible decompression bombs (1,024 to 1,000,000,000).",
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES, ge=1024, description="Larger image files are not read: an error row (256 MiB)."
    )
    allow_foreign_files: bool = Field(
        default=False,
        description="Let the output folder hold files imgcls did not write (they are left alone, never read or "
        "deleted). Default: such an output is refused, since it is usually a wrong --output.",
    )
    lock_ttl_s: float = Field(
        default=120.0,
        ge=1,
        le=86_400,
        description="Seconds the output's one-writer lease (output/_lock) lasts without a heartbeat; the holder "
        "renews it every ttl/4. A killed run's lease is taken over once it has expired (at once on the same "
        "machine, when its process is gone).",
    )
    lock_wait_s: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a run waits for another run's lease on the same output before exit 2. 0: give up at once.",
    )
    min_score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Rows whose top score is below this get label 'unknown' (their top-k is kept). Unset: off.",
    )
    rows_per_file: int | None = Field(
        default=None, gt=0, description="Upper bound on rows per Parquet file (bounds file sizes). Unset: 1,000,000."
    )
    partition_by: Literal["run_date"] | None = Field(
        default=None, description="run_date: write each run under `run_date=YYYY-MM-DD/` (UTC) partitions."
    )
    overwrite: bool = Field(
        default=False,
        description="Reclassify every input and replace the earlier output. Default: skip images already in the "
        "output for this model_version, so a rerun only classifies new arrivals.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("output")
    @classmethod
    def _output_usable(cls, value: str) -> str:
        return _usable_output(value)

    @model_validator(mode="after")
    def _paths_differ(self) -> "PredictConfig":
        if normalised_uri(self.input) == normalised_uri(self.output):
            raise ValueError("output must differ from input, or predictions would be mixed with the images")
        # Overwriting replaces the output folder: inside the input it would delete images, and around it
        # the run would classify (and then delete) its own earlier output.
        if self.overwrite and (uri_contains(self.input, self.output) or uri_contains(self.output, self.input)):
            inner, outer = ("output", "input") if uri_contains(self.input, self.output) else ("input", "output")
            raise ValueError(
                f"with overwrite, {inner} ({clip(getattr(self, inner))}) must not lie inside {outer} "
                f"({clip(getattr(self, outer))}): replacing the output would touch the images being classified"
            )
        _check_pool_bounds(self)
        return self


def pool_settings(config: "PredictConfig | EvaluateConfig") -> list[str]:
    """The settings given that size an actor pool (each of them asks for one)."""
    given = (("use_gpu", config.use_gpu), ("num_actors", config.num_actors), ("max_actors", config.max_actors))
    return [name for name, value in given if value]


def _check_pool_bounds(config: "PredictConfig | EvaluateConfig") -> None:
    num_actors, max_actors = config.num_actors, config.max_actors
    if num_actors is not None and max_actors is not None and max_actors < num_actors:
        raise ValueError(f"max_actors ({max_actors}) must be at least num_actors ({num_actors}), the pool's minimum")
    sized = pool_settings(config)
    if config.placement == "driver" and sized:
        raise ValueError(f"{' and '.join(sized)} size an actor pool, and placement driver has none: drop them or use placement auto")


class EvaluateConfig(StrictModel):
    """Evaluation of an artifact on labelled images; CLI flags fill these and `--set` can change any."""

    model: str = Field(description="URI of a model artifact directory.")
    data: str = Field(description="Labelled images: a folder per class or a CSV/Parquet manifest with path,label.")
    output: str = Field(description="Folder for metrics.json, figures, mistakes.parquet and report.md.")
    top_k: int = Field(default=5, gt=0, description="k of the top-k accuracy (capped at the number of classes).")
    calibration_bins: int = Field(default=15, ge=2, le=100, description="Equal-width confidence bins for the ECE.")
    mistakes: int = Field(default=50, ge=0, description="Most confident mistakes kept in mistakes.parquet.")
    batch_size: int = Field(default=64, gt=0, description="Images per model call in each actor.")
    decode_batch_size: int = Field(default=64, gt=0, description="Images decoded per Ray Data task batch.")
    num_actors: int | None = Field(default=None, gt=0, description="Model actors; unset: cluster CPUs minus one.")
    max_actors: int | None = Field(default=None, gt=0, description="Autoscaling pool: up to this many actors.")
    use_gpu: bool = Field(default=False, description="Give each model actor one GPU.")
    placement: Placement = Field(default="auto", description="driver, actor_pool or auto (see predict).")
    pool_min_images: int = Field(
        default=5_000, ge=0, description="With placement auto, fewer images stay in the job's own process (see predict)."
    )
    max_image_pixels: int = Field(
        default=89_478_485,
        ge=MIN_IMAGE_PIXELS_LIMIT,
        le=MAX_IMAGE_PIXELS_LIMIT,
        description="Larger images are refused as bombs (1,024 to 1,000,000,000).",
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES, ge=1024, description="Larger image files are not read (256 MiB)."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("output")
    @classmethod
    def _output_usable(cls, value: str) -> str:
        return _usable_output(value)

    @model_validator(mode="after")
    def _pool_bounds(self) -> "EvaluateConfig":
        _check_pool_bounds(self)
        return self


class YamlAliasError(yaml.YAMLError):
    """A YAML alias (`*name`), refused by NoAliasSafeLoader before anything is built from it."""

    def __init__(self, anchor: str, line: int) -> None:
        super().__init__(f"alias *{anchor} at line {line}")
        self.anchor = anchor
        self.line = line


class YamlTooDeepError(yaml.YAMLError):
    """Collections nested deeper than MAX_YAML_DEPTH."""

    def __init__(self, line: int) -> None:
        super().__init__(f"collections nested more than {MAX_YAML_DEPTH} deep at line {line}")
        self.line = line


class NoAliasSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and deep nesting while composing, before any object is built.

    Aliases are what make a "billion laughs" file: 400 bytes of nested anchors and aliases expand to
    gigabytes of lists (and a message repeating them). No imgcls config needs one, so every alias is
    refused; an anchor alone (`&name`) is harmless and allowed. Pure Python on purpose: the C loader
    composes in C, where this check could not run.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.composing_depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlAliasError(event.anchor, event.start_mark.line + 1)
        self.composing_depth += 1
        try:
            if self.composing_depth > MAX_YAML_DEPTH:
                raise YamlTooDeepError(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.composing_depth -= 1


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line saying what is wrong, for a message: PyYAML's own text spans lines and quotes the
    offending input, which can be a megabyte on one line."""
    if isinstance(error, yaml.MarkedYAMLError):
        parts = [clip(" ".join(part.split())) for part in (error.context, error.problem) if part]
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return (", ".join(parts) or "invalid YAML") + where
    return clip(" ".join(str(error).split()))


def _parse_yaml(text: str, what: str) -> Any:
    """`text` parsed as YAML by NoAliasSafeLoader; every failure a ConfigError starting with `what`."""
    loader = NoAliasSafeLoader(text)
    try:
        return loader.get_single_data()
    except YamlAliasError as error:
        anchor = clip(error.anchor, 100)
        raise ConfigError(
            f"{what} uses a YAML alias (*{anchor}) at line {error.line}; imgcls configs do not expand "
            "aliases: write the value out."
        ) from None
    except YamlTooDeepError as error:
        raise ConfigError(
            f"{what} nests collections more than {MAX_YAML_DEPTH} deep (line {error.line}); imgcls configs "
            "nest a few levels."
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(error)}.") from None
    except RecursionError:
        # MAX_YAML_DEPTH keeps composing shallow; this is a last resort should anything else recurse.
        raise ConfigError(f"{what} is not valid YAML: it nests too deeply.") from None
    except ValueError as error:
        # Python refuses integers of more than 4,300 digits: a ValueError, not a YAMLError.
        raise ConfigError(f"{what} is not valid YAML: {clip(str(error))}.") from None
    finally:
        loader.dispose()


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """Turn `["a.b=1", "c=[1, 2]"]` into a nested dict; values are parsed as YAML (aliases refused)."""
    nested: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, raw_value = assignment.partition("=")
        key = key.strip()
        if not separator or not key:
            raise ConfigError(f"--set expects key=value (for example train.epochs=5), got {shorten(assignment)}.")
        shown_key = clip(key)
        value = _parse_yaml(raw_value, f"--set {shown_key}: the value {shorten(raw_value)}") if raw_value.strip() else None
        target = nested
        parts = key.split(".")
        for part in parts[:-1]:
            existing = target.setdefault(part, {})
            if not isinstance(existing, dict):
                raise ConfigError(
                    f"--set {shown_key}: {shorten(part)} was already given a value, it cannot also have sub-keys."
                )
            target = existing
        target[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`; mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def format_validation_error(error: ValidationError, source: str) -> str:
    """One readable paragraph naming each bad dotted key. Input values are shortened and credentials in
    URLs masked (a refused value can be megabytes, or hold a password), and at most MAX_PROBLEMS_SHOWN
    problems are listed."""
    items = error.errors()
    problems = []
    for item in items[:MAX_PROBLEMS_SHOWN]:
        dotted = clip(".".join(str(part) for part in item["loc"])) or "(top level)"
        # Messages of imgcls' own checks shorten the values they quote; this bounds them all the same.
        message = clip(item["msg"].removeprefix("Value error, "), 5 * 200)
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{dotted}'")
        elif item["type"] == "missing":
            problems.append(f"'{dotted}' is required")
        elif not item["loc"]:
            # Cross-field checks name their keys themselves; the input would be the whole config.
            problems.append(message)
        elif item["type"] == CREDENTIALS_ERROR_TYPE:
            # The value is the secret: name the key, never echo it, masked or not.
            problems.append(f"'{dotted}': {message}")
        else:
            problems.append(f"'{dotted}': {message} (got {shorten(item.get('input'))})")
    if len(items) > MAX_PROBLEMS_SHOWN:
        problems.append(f"and {len(items) - MAX_PROBLEMS_SHOWN} more problems")
    return f"Invalid configuration in {clip(source)}: " + "; ".join(problems) + "."


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _read_config_bytes(path: Path, shown: str) -> bytes:
    """At most MAX_CONFIG_BYTES + 1 bytes of the file: enough to tell that it is too large. Regular files
    and character devices (`--config /dev/null`) are read; a FIFO would block until a writer came, a
    socket or directory cannot hold a config."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below), nor reading a tty.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError) as error:
        try:
            mode = os.stat(path).st_mode
        except (OSError, ValueError):
            mode = None
        # Opening a Unix socket fails (ENXIO); say what it is rather than "No such device or address".
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            raise ConfigError(
                f"Config file {shown} is not a regular file but {_file_kind(mode)}: give the path of a YAML file."
            ) from None
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"Cannot read config file {shown}: {reason}.") from None
    too_large = ConfigError(
        f"Config file {shown} is larger than {MAX_CONFIG_BYTES:,} bytes (1 MiB, MAX_CONFIG_BYTES), the most "
        "imgcls reads of a config; real configs are a few kilobytes."
    )
    try:
        status = os.fstat(descriptor)
        if not (stat.S_ISREG(status.st_mode) or stat.S_ISCHR(status.st_mode)):
            raise ConfigError(
                f"Config file {shown} is not a regular file but {_file_kind(status.st_mode)}: "
                "give the path of a YAML file."
            )
        if stat.S_ISREG(status.st_mode) and status.st_size > MAX_CONFIG_BYTES:
            raise too_large
        chunks: list[bytes] = []
        remaining = MAX_CONFIG_BYTES + 1
        while remaining > 0:
            chunk = os.read(descriptor, min(remaining, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as error:
        # A character device with nothing to read yet (a terminal) fails with EAGAIN rather than waiting.
        raise ConfigError(f"Cannot read config file {shown}: {error.strerror or error}.") from None
    finally:
        os.close(descriptor)
    if remaining <= 0:
        raise too_large
    return b"".join(chunks)


def _decode_config(data: bytes, shown: str) -> str:
    """`data` as UTF-8 (a leading byte-order mark allowed), strictly: a file in another encoding is
    refused with the offset of its first bad byte rather than read as something else."""
    byte_order_mark = b"\xef\xbb\xbf"
    skipped = len(byte_order_mark) if data.startswith(byte_order_mark) else 0
    try:
        return data[skipped:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = skipped + error.start
        line = data.count(b"\n", 0, offset) + 1
        raise ConfigError(
            f"Config file {shown} is not UTF-8 text: the byte 0x{data[offset]:02x} at offset {offset} (line {line}) "
            "cannot be decoded; save the file as UTF-8."
        ) from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file. Bounded: at most
    MAX_CONFIG_BYTES are read, only from a regular file or character device, and YAML aliases are
    refused, so no file can hang the job, exhaust its memory or fill its log."""
    path = Path(path)
    shown = clip(str(path))
    text = _decode_config(_read_config_bytes(path, shown), shown)
    loaded = _parse_yaml(text, f"Config file {shown}")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"Config file {shown} must hold a mapping of keys, got {type(loaded).__name__}.")
    return loaded


def build_model(model_type: type[StrictModel], values: dict[str, Any], source: str) -> Any:
    try:
        return model_type.model_validate(values)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def load_job_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults, then the YAML file at `path`, then `--set` overrides."""
    values = read_yaml_mapping(path) if path is not None else {}
    values = merge(values, parse_overrides(overrides or []))
    source = str(path) if path is not None else "overrides"
    if overrides:
        source += " with --set overrides"
    return build_model(JobConfig, values, source)


def config_to_yaml(config: StrictModel) -> str:
    """The resolved config as YAML that `load_job_config` accepts back unchanged."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
