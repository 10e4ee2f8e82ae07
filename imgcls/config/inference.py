"""Settings of the jobs that run a model over images, predict and evaluate: the ones they share are
written once (`InferenceSettings`). Imports no TensorFlow or Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from imgcls.config.common import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS_LIMIT,
    MIN_IMAGE_PIXELS_LIMIT,
    StorageConfig,
    StrictModel,
    _usable_output,
    normalised_uri,
    uri_contains,
)  # fmt: skip
from imgcls.config.model_reference import is_model_reference, parse_model_reference
from imgcls.config.tracking import check_tracking_uri
from imgcls.errors import clip

# Where bulk classification runs its model (see PredictConfig.placement).
Placement = Literal["auto", "driver", "actor_pool"]


class InferenceSettings(StrictModel):
    """The settings predict and evaluate share: the model, how images are decoded, and where the
    model runs. CLI flags fill these and `--set` can change any of them."""

    model: str = Field(
        description="URI of a model artifact directory (contains model.keras and metadata.json), or a registered "
        "model in MLflow: models:/NAME@ALIAS or models:/NAME/VERSION (resolved through mlflow_uri)."
    )
    mlflow_uri: str | None = Field(
        default=None,
        description="MLflow tracking server whose model registry resolves a models:/ --model. Unset: the "
        "environment's MLFLOW_TRACKING_URI. Credentials never go here (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN).",
    )
    batch_size: int = Field(default=64, gt=0, description="Images per model call.")
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
        description="With placement auto, runs with fewer images stay in the job's own process without looking "
        "for a Ray cluster: an actor pool takes seconds to start, longer than such a run.",
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        ge=MIN_IMAGE_PIXELS_LIMIT,
        le=MAX_IMAGE_PIXELS_LIMIT,
        description="Larger images are refused as possible decompression bombs (1,024 to 1,000,000,000).",
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES, ge=1024, description="Larger image files are not read: an error row (256 MiB)."
    )
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each model actor asks for besides its CPU/GPU, e.g. {model_node: 1} to "
        "keep the actors on nodes started with `ray start --resources '{\"model_node\": 4}'`. Empty: none.",
    )
    stall_timeout_s: float = Field(
        default=600.0,
        ge=1,
        description="Seconds the run may go without a single image completing before it fails (exit 1, run record "
        "failed, committed chunks kept): a cluster that lost the nodes the run needed never hangs it.",
    )
    thresholds: list[float] | dict[str, float] | None = Field(
        default=None,
        description="Multi-label models only: per-class decision thresholds in [0, 1], either one per class in "
        "class order ([0.3, 0.6, 0.5]) or some classes by name ({cat: 0.3}; the others keep theirs). A class is "
        "predicted when its probability is at least its threshold. Unset: the artifact's thresholds (0.5 each "
        "where it has none). Takes precedence over min_score for the classes it gives.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("thresholds", mode="before")
    @classmethod
    def _thresholds_are_probabilities(cls, value: object) -> object:
        if value is None:
            return value
        if isinstance(value, dict):
            # YAML reads `{3: 0.4}` with an integer key; class names are text (digits data has "3").
            value = {str(name) if isinstance(name, int) and not isinstance(name, bool) else name: number
                     for name, number in value.items()}  # fmt: skip
            values = list(value.values())
            if not all(isinstance(name, str) and name for name in value):
                raise ValueError("a mapping of thresholds must be keyed by class name")
        elif isinstance(value, list):
            values = value
        else:
            raise ValueError("must be a list with one number per class (in class order) or a mapping {class: number}")
        for number in values:
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0.0 <= number <= 1.0:
                raise ValueError(f"each threshold must be a number between 0 and 1, got {clip(repr(number), 80)}")
        return value

    @field_validator("model")
    @classmethod
    def _registered_model_form(cls, value: str) -> str:
        if is_model_reference(value):
            parse_model_reference(value)  # a malformed models:/ URI fails here, before any server is asked
        return value

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials_in_uri(cls, value: str | None) -> str | None:
        return check_tracking_uri(value)

    @field_validator("actor_resources")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{name} is planned by imgcls (num_actors, use_gpu): list only custom resources here")
            if not (amount > 0 and amount < float("inf")):
                raise ValueError(f"the amount of {clip(name, 80)} must be a positive number")
        return value

    @field_validator("output", check_fields=False)
    @classmethod
    def _output_usable(cls, value: str) -> str:
        return _usable_output(value)

    @model_validator(mode="after")
    def _pool_bounds(self) -> "InferenceSettings":
        _check_pool_bounds(self)
        return self


class PredictConfig(InferenceSettings):
    """Bulk classification settings; CLI flags fill these and `--set` can change any of them."""

    input: str = Field(description="URI of a folder of images (read recursively) or a CSV/Parquet manifest with a `path` column.")
    output: str = Field(description="URI of the Parquet dataset directory the predictions are written to.")
    top_k: int | None = Field(
        default=None, gt=0, description="Labels kept per image in top_k_labels; default min(5, number of classes)."
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
        description="Rows whose top score is below this get label 'unknown' (their top-k is kept, labels is []). "
        "For a multi-label model it also sets every class's threshold (thresholds, when given, overrides it for "
        "the classes it names). Unset: off.",
    )
    rows_per_file: int | None = Field(
        default=None, gt=0, description="Upper bound on rows per Parquet file (bounds file sizes). Unset: 1,000,000."
    )
    commit_every_images: int = Field(
        default=100_000,
        gt=0,
        description="Commit the run's rows in chunks of at most this many images (or every commit_every_s, whichever "
        "comes first): each chunk becomes visible to readers at once, and a killed run loses at most the chunk "
        "it was writing (the rerun classifies only images that no committed chunk holds). Not used with overwrite.",
    )
    commit_every_s: float = Field(
        default=600.0, gt=0, description="Seconds after which the chunk being written is committed even when smaller."
    )
    partition_by: Literal["run_date"] | None = Field(
        default=None, description="run_date: write each run under `run_date=YYYY-MM-DD/` (UTC) partitions."
    )
    overwrite: bool = Field(
        default=False,
        description="Reclassify every input and replace the earlier output. Default: skip images already in the "
        "output for this model_version, so a rerun only classifies new arrivals.",
    )
    review: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="Write the run's this many least certain images (smallest margin; multi-label: highest entropy), "
        "with their top-k, to output/_review/<run_id>.parquet. 0: no review queue.",
    )
    review_folder: str | None = Field(
        default=None,
        description="Also copy the review queue's images into this folder (local or s3://), under a folder per "
        "predicted label, for a person to sort and add to the training data. Existing files are never overwritten.",
    )
    monitoring: bool = Field(
        default=True,
        description="Summarise the run's images (class shares, score, margin, image statistics) and test them for "
        "drift against the artifact's reference profile, into the run record. false: neither (margin and entropy "
        "columns are still written).",
    )
    fail_on_drift: bool = Field(
        default=False,
        description="Exit 3 when the run's drift test flags it (after its rows are committed), so a schedule can alert.",
    )
    drift_min_images: int = Field(
        default=100,
        ge=10,
        description="Runs with fewer readable images report drift status insufficient_images instead of a verdict.",
    )
    drift_false_alarm_rate: float = Field(
        default=0.01,
        gt=0,
        le=0.2,
        description="Probability that a run of images like the validation split's is flagged anyway (split over the "
        "drift signals).",
    )

    @field_validator("review_folder")
    @classmethod
    def _review_folder_usable(cls, value: str | None) -> str | None:
        return None if value is None else _usable_output(value)

    @model_validator(mode="after")
    def _paths_differ(self) -> "PredictConfig":
        if normalised_uri(self.input) == normalised_uri(self.output):
            raise ValueError("output must differ from input, or predictions would be mixed with the images")
        if self.fail_on_drift and not self.monitoring:
            raise ValueError("fail_on_drift needs monitoring: the drift test is part of it")
        if self.review_folder is not None:
            if self.review == 0:
                raise ValueError("review_folder needs review > 0: the number of images to copy there (--review N)")
            for name in ("input", "output"):
                place = getattr(self, name)
                if normalised_uri(self.review_folder) == normalised_uri(place) or uri_contains(place, self.review_folder):
                    raise ValueError(
                        f"review_folder ({clip(self.review_folder)}) must lie outside the {name} ({clip(place)}): "
                        + ("the next run would classify the copies" if name == "input" else "the output is imgcls's own")
                    )
        # Overwriting replaces the output folder: inside the input it would delete images, and around it
        # the run would classify (and then delete) its own earlier output.
        if self.overwrite and (uri_contains(self.input, self.output) or uri_contains(self.output, self.input)):
            inner, outer = ("output", "input") if uri_contains(self.input, self.output) else ("input", "output")
            raise ValueError(
                f"with overwrite, {inner} ({clip(getattr(self, inner))}) must not lie inside {outer} "
                f"({clip(getattr(self, outer))}): replacing the output would touch the images being classified"
            )
        return self


def pool_settings(config: "InferenceSettings") -> list[str]:
    """The settings given that size an actor pool (each of them asks for one)."""
    given = (("use_gpu", config.use_gpu), ("num_actors", config.num_actors), ("max_actors", config.max_actors),
             ("actor_resources", config.actor_resources))  # fmt: skip
    return [name for name, value in given if value]


def _check_pool_bounds(config: "InferenceSettings") -> None:
    num_actors, max_actors = config.num_actors, config.max_actors
    if num_actors is not None and max_actors is not None and max_actors < num_actors:
        raise ValueError(f"max_actors ({max_actors}) must be at least num_actors ({num_actors}), the pool's minimum")
    sized = pool_settings(config)
    if config.placement == "driver" and sized:
        raise ValueError(f"{' and '.join(sized)} size an actor pool, and placement driver has none: drop them or use placement auto")


class EvaluateConfig(InferenceSettings):
    """Evaluation of an artifact on labelled images; CLI flags fill these and `--set` can change any."""

    data: str = Field(description="Labelled images: a folder per class or a CSV/Parquet manifest with path,label.")
    output: str = Field(description="Folder for metrics.json, figures, mistakes.parquet and report.md.")
    top_k: int = Field(default=5, gt=0, description="k of the top-k accuracy (capped at the number of classes).")
    calibration_bins: int = Field(default=15, ge=2, le=100, description="Equal-width confidence bins for the ECE.")
    mistakes: int = Field(
        default=50,
        ge=0,
        description="Most confident mistakes kept in mistakes.parquet (multi-label: of each kind, false positives "
        "and false negatives, in label_mistakes.parquet).",
    )
    min_score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Multi-label models only: every class's decision threshold (thresholds, when given, overrides "
        "it for the classes it names). Unset: the artifact's thresholds.",
    )
