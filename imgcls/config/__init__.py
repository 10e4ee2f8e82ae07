"""Every config of imgcls, as pydantic models that reject unknown keys, and how they are read.

    common      the strict base, storage settings, limits, location comparisons
    training    the training job (`jobs/train.py --config`)
    tuning      its `tune:` section
    tracking    its `tracking:` section (MLflow)
    inference   predict and evaluate (the settings they share written once)
    export      the export job (an artifact to saved_model, onnx or litert)
    report      the report job (the trend report over a predictions output's run records)
    overrides   bounded YAML reading, `--set` overrides, readable validation errors

The names below are the package's interface. Nothing here imports TensorFlow or Ray.
"""

from imgcls.config.common import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS_LIMIT,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_PIXELS_LIMIT,
    MIN_IMAGE_SIDE,
    StorageConfig,
    StrictModel,
    metric_mode,
    normalised_uri,
    uri_contains,
)  # fmt: skip
from imgcls.config.export import EXPORT_FORMATS, ExportConfig, ExportFormat
from imgcls.config.inference import EvaluateConfig, InferenceSettings, Placement, PredictConfig, pool_settings
from imgcls.config.overrides import (
    MAX_CONFIG_BYTES,
    NoAliasSafeLoader,
    build_model,
    config_to_yaml,
    format_validation_error,
    load_job_config,
    merge,
    parse_overrides,
    read_yaml_mapping,
    set_dotted,
)  # fmt: skip
from imgcls.config.report import DEFAULT_REPORT_FOLDER, ReportConfig
from imgcls.config.training import (
    BACKBONE_MIN_IMAGE_SIZE,
    BACKBONES,
    AugmentConfig,
    DataConfig,
    EarlyStoppingConfig,
    FinetuneConfig,
    JobConfig,
    ModelConfig,
    ScalingConfig,
    ScheduleConfig,
    TrainConfig,
)  # fmt: skip
from imgcls.config.tracking import DEFAULT_EXPERIMENT, TrackingConfig
from imgcls.config.tuning import SEARCH_DOMAINS, TuneSettings

__all__ = [
    "AugmentConfig", "BACKBONES", "BACKBONE_MIN_IMAGE_SIZE", "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_IMAGE_PIXELS",
    "DataConfig", "EarlyStoppingConfig", "EvaluateConfig", "FinetuneConfig", "InferenceSettings", "JobConfig",
    "MAX_CONFIG_BYTES", "MAX_IMAGE_PIXELS_LIMIT", "MAX_IMAGE_SIDE", "MIN_IMAGE_PIXELS_LIMIT", "MIN_IMAGE_SIDE",
    "ModelConfig", "NoAliasSafeLoader", "Placement", "PredictConfig", "SEARCH_DOMAINS", "ScalingConfig",
    "ScheduleConfig", "StorageConfig", "StrictModel", "TrackingConfig", "TrainConfig", "TuneSettings", "build_model", "config_to_yaml",
    "format_validation_error", "load_job_config", "merge", "metric_mode", "normalised_uri", "parse_overrides",
    "pool_settings", "read_yaml_mapping", "set_dotted", "uri_contains",
    "DEFAULT_EXPERIMENT", "EXPORT_FORMATS", "ExportConfig", "ExportFormat", "DEFAULT_REPORT_FOLDER", "ReportConfig",
]  # fmt: skip
