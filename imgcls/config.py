"""Job configuration: pydantic models, YAML loading and `--set key=value` overrides.

Defaults live in the models, a YAML file overrides them, and `--set` overrides the file.
This module imports no TensorFlow or Ray so that validating a config is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgcls.errors import ConfigError


# Bytes read of one image file at most (config key `max_image_bytes`): far above any real photo.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
        description="[height, width] in pixels that every image is resized to before the model. "
        "The tutorial uses 64x64; small images (16-32 px) train much faster.",
    )
    channels: Literal[1, 3] = Field(
        default=3, description="Colour channels the model sees: 3 converts every image to RGB, 1 to greyscale."
    )
    max_image_pixels: int = Field(
        default=89_478_485,
        gt=0,
        description="Images with more pixels (width x height) than this are refused as possible "
        "decompression bombs and reported as skipped. Pillow's own default.",
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
        if min(value) < 8:
            raise ValueError(f"image_size must be at least [8, 8] pixels, got {list(value)}")
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
            raise ValueError("must not contain credentials; use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
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
            raise ValueError(f"every entry must be a positive integer, got {value}")
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
            raise ValueError(f"must be a positive number of layers or 'all', got {value}")
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
            if key.split(".")[0] in ("tune", "output_dir"):
                raise ValueError(f"{key}: tune.* and output_dir cannot be searched over")
            if len(domain) != 1 or next(iter(domain)) not in SEARCH_DOMAINS:
                raise ValueError(f"{key}: give exactly one of {', '.join(SEARCH_DOMAINS)}, got {domain}")
            (kind, values), = domain.items()
            if not values:
                raise ValueError(f"{key}: {kind} needs values")
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2 or not all(isinstance(bound, (int, float)) for bound in values):
                    raise ValueError(f"{key}: {kind} takes [low, high], got {values}")
                if values[0] >= values[1]:
                    raise ValueError(f"{key}: {kind} needs low < high, got {values}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{key}: loguniform needs low > 0, got {values}")
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
        default=89_478_485, gt=0, description="Larger images are refused as possible decompression bombs."
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

    @model_validator(mode="after")
    def _paths_differ(self) -> "PredictConfig":
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("output must differ from input, or predictions would be mixed with the images")
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
    max_image_pixels: int = Field(default=89_478_485, gt=0, description="Larger images are refused as bombs.")
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES, ge=1024, description="Larger image files are not read (256 MiB)."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _pool_bounds(self) -> "EvaluateConfig":
        _check_pool_bounds(self)
        return self


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """Turn `["a.b=1", "c=[1, 2]"]` into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, raw_value = assignment.partition("=")
        key = key.strip()
        if not separator or not key:
            raise ConfigError(f"--set expects key=value (for example train.epochs=5), got {assignment!r}.")
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {key}: the value {raw_value!r} is not valid YAML ({error}).") from None
        target = nested
        parts = key.split(".")
        for part in parts[:-1]:
            existing = target.setdefault(part, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"--set {key}: {part!r} was already given a value, it cannot also have sub-keys.")
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
    """One readable paragraph naming each bad dotted key."""
    problems = []
    for item in error.errors():
        dotted = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{dotted}'")
        elif item["type"] == "missing":
            problems.append(f"'{dotted}' is required")
        elif not item["loc"]:
            # Cross-field checks name their keys themselves; the input would be the whole config.
            problems.append(item["msg"].removeprefix("Value error, "))
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"'{dotted}': {message} (got {item.get('input')!r})")
    return f"Invalid configuration in {source}: " + "; ".join(problems) + "."


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"Cannot read config file {path}: {error.strerror or error}.") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys, got {type(loaded).__name__}.")
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
