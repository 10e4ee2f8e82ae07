"""The training job's config (`jobs/train.py --config`): data, augmentation, model, fine-tuning,
optimisation, scaling and tracking. Imports no TensorFlow or Ray."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from imgcls.config.common import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS_LIMIT,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_PIXELS_LIMIT,
    MIN_IMAGE_SIDE,
    StorageConfig,
    StrictModel,
    _usable_output,
    normalised_uri,
    uri_contains,
)  # fmt: skip
from imgcls.config.tracking import TrackingConfig
from imgcls.config.tuning import TuneSettings
from imgcls.errors import clip, shorten


class DataConfig(StrictModel):
    train: str = Field(
        description="Labelled training images, local or s3://: a folder with one sub-folder per class "
        "(`root/<class>/<image>`), or a CSV/Parquet manifest with `path,label` columns (paths absolute "
        "URIs or relative to the manifest). Multi-label images: a manifest with `path,labels`, the labels "
        "joined by `|` in CSV (`cat|dog`) or a list<string> in Parquet; an empty cell (or null, or []) is an "
        "image with none of the classes, a real training example."
    )
    val: str | None = Field(
        default=None,
        description="Optional separate validation set in the same forms as `train`, with no class that `train` "
        "lacks (converted to the run's task like `train`). When unset, `val_fraction` of `train` is held out "
        "instead (multi-label: per distinct label set).",
    )
    val_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Fraction of each class held out for validation when `data.val` is unset "
        "(0 disables validation). Rule of thumb: 0.1-0.2.",
    )
    profile_holdout_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=0.5,
        description="Without a validation split (val unset and val_fraction 0), the fraction of each class of `train` "
        "held out of training for the model's reference profile, which bulk runs are compared with for drift "
        "(0: no profile then). With a validation split, the profile is made on it instead.",
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
        default=DEFAULT_MAX_IMAGE_PIXELS,
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


# keras.applications backbones usable as `model.name`, with the smallest input they accept.
BACKBONES = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0", "ResNet50", "ConvNeXtTiny")


BACKBONE_MIN_IMAGE_SIZE = 32


ModelName = Literal["seed_cnn", "cnn", "MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0", "ResNet50", "ConvNeXtTiny"]


class ModelConfig(StrictModel):
    task: Literal["auto", "multiclass", "multilabel"] = Field(
        default="auto",
        description="auto: decided by the data (a manifest with a `labels` column is multi-label, anything else "
        "single-label); multiclass: one class per image (softmax; one sigmoid for two classes); multilabel: any "
        "number of classes per image, including none (a sigmoid per class, binary cross-entropy, per-class "
        "thresholds chosen on the validation split); single-label data then trains on one-label sets. A "
        "`labels` manifest trains multiclass only when every image has exactly one label. Stored in the artifact.",
    )
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
    monitor: str = Field(
        default="val_loss",
        description="reduce_on_plateau: metric watched (min for *loss, else max): loss, accuracy (multi-label: "
        "micro_f1, exact_match), each with val_ for the validation split.",
    )


class EarlyStoppingConfig(StrictModel):
    enabled: bool = Field(default=False, description="Stop when `monitor` stops improving.")
    monitor: str = Field(
        default="val_loss",
        description="Metric watched: minimised if it ends in 'loss', else maximised. loss or accuracy (multi-label: "
        "micro_f1 or exact_match), val_ + each for the validation split.",
    )
    patience: int = Field(default=3, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, description="Smallest change that counts as an improvement.")
    restore_best_weights: bool = Field(default=True, description="End with the weights of the best epoch.")


class TrainConfig(StrictModel):
    epochs: int = Field(default=10, gt=0, description="Passes over the training set.")
    batch_size: int = Field(
        default=32,
        gt=0,
        description="Images per step on each worker; the global batch is batch_size x scaling.num_workers. "
        "With fewer workers (elastic, scaling.min_workers) each one's batch grows to keep that global batch.",
    )
    learning_rate: float = Field(default=0.001, gt=0, description="Optimizer step size. Adam's usual 1e-3.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        default="adam", description="adam (the tutorial's), adamw (decoupled weight decay 1e-4) or sgd (momentum 0.9)."
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Soften one-hot targets by this much (0.1 is common); 0 disables. Multi-label: every "
        "per-class target y becomes y * (1 - s) + 0.5 * s (Keras' BinaryCrossentropy definition).",
    )
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        default=None,
        description="Loss weight per class for imbalanced data: none, `balanced` (n / (classes x count)), "
        "or a mapping {class_name: weight} (missing classes weigh 1). Multi-label: the weight multiplies "
        "only that class's positive term of the binary cross-entropy (PyTorch's BCEWithLogitsLoss pos_weight); "
        "`balanced` is negatives / positives of the class in the training split, capped at 100.",
    )
    max_failures: int = Field(
        default=0, ge=-1, description="Worker failures survived by restarting from the last checkpoint (-1: no limit)."
    )
    checkpoint_monitor: str = Field(
        default="val_loss",
        description="Metric that ranks checkpoints (minimised if it ends in 'loss'); `loss` is used without validation. "
        "Multi-label runs report micro_f1 and exact_match instead of accuracy.",
    )
    checkpoints_to_keep: int | None = Field(
        default=None, ge=1, description="Best checkpoints kept by checkpoint_monitor; unset keeps all."
    )
    checkpoint_every_epochs: int | None = Field(
        default=None,
        ge=1,
        description="Write a checkpoint every this many epochs. Unset: automatic, after every epoch whose "
        "checkpoint costs at most 5% of the epoch's time, otherwise whenever checkpoint_interval_s have passed "
        "since the last one. Either way the last epoch (and the epoch early stopping ends on) is always "
        "checkpointed, and a restart repeats at most the epochs since the last checkpoint.",
    )
    checkpoint_interval_s: float = Field(
        default=60.0,
        ge=0,
        description="With automatic checkpoints: seconds of training after which an epoch is checkpointed even "
        "when its checkpoint is expensive; 0 checkpoints every epoch. Bounds the work a failure can cost.",
    )
    deterministic: bool = Field(
        default=True,
        description="Bit-identical weights for the same config, data, seed, worker count and machine: "
        "TensorFlow's deterministic ops and data in a fixed order. Off: whatever order and kernels are fastest.",
    )
    mixed_precision: bool = Field(
        default=False, description="float16 compute with loss scaling; only applied when scaling.use_gpu is on."
    )
    tensorboard: bool = Field(
        default=False,
        description="Write TensorBoard event files to output_dir/tensorboard, from rank 0 as each epoch ends: "
        "`tensorboard --logdir OUTPUT_DIR/tensorboard` shows the run while it trains.",
    )

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
    min_workers: int | None = Field(
        default=None,
        gt=0,
        description="Elastic training. Unset: exactly num_workers workers, and a lost worker must be "
        "rescheduled. Set: training continues with any number of workers between min_workers and "
        "num_workers, as the cluster allows; the global batch (train.batch_size x num_workers) and the "
        "learning rate stay the same, so each remaining worker takes a larger share of every step.",
    )
    reschedule_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds the job waits for its workers to be scheduled, at the start and after a failure "
        "(a lost node), before it fails with exit 1 and a message naming the missing resources. Its "
        "checkpoints stay in output_dir; rerunning the same command resumes from the latest.",
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker also needs, {name: amount}, e.g. {trainer_slot: 1} "
        "to keep workers on nodes started with `ray start --resources '{\"trainer_slot\": 1}'`. CPU and GPU "
        "are set by cpus_per_worker and use_gpu.",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not name.strip():
                raise ValueError("a resource name must not be empty")
            if name.upper() in ("CPU", "GPU"):
                raise ValueError(
                    f"{shorten(name)} is set by scaling.cpus_per_worker and scaling.use_gpu, not here: "
                    "resources_per_worker holds custom resources only"
                )
            if not math.isfinite(amount) or amount <= 0:
                raise ValueError(f"the amount of {shorten(name)} must be a finite number > 0")
        return value

    @model_validator(mode="after")
    def _min_workers_fit(self) -> "ScalingConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"scaling.min_workers ({self.min_workers}) must be at most scaling.num_workers ({self.num_workers})"
            )
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers


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
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
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
