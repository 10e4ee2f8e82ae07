"""Settings of the report job (`imgcls report`): which predictions output to read, where the trend
report goes, how many uncertain images its contact sheet shows. Imports no TensorFlow or Ray."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from imgcls.config.common import StorageConfig, StrictModel, _usable_output, normalised_uri, uri_contains
from imgcls.errors import clip

# The folder under the output that the report goes to by default; `_`-prefixed, so that readers of
# the predictions (pyarrow.dataset, pandas, Ray Data) skip it.
DEFAULT_REPORT_FOLDER = "_report"


class ReportConfig(StrictModel):
    """The trend report over an output's run records; CLI flags fill these and `--set` can change any."""

    output: str = Field(
        description="URI of a predictions output (the --output of `imgcls predict`), local or s3://: its "
        "run records (_runs/<run_id>.json) are read."
    )
    report_dir: str | None = Field(
        default=None,
        description="URI of the folder report.md and its figures are written to (files of the same names are "
        "replaced). Unset: <output>/_report. Inside the output only _report or a folder below it is allowed: "
        "predict refuses other files there as not its own.",
    )
    contact_sheet_images: int = Field(
        default=24,
        ge=0,
        le=200,
        description="Most uncertain images of the latest reviewed run shown as thumbnails (one image read "
        "each); 0 leaves the contact sheet out.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("output")
    @classmethod
    def _output_usable(cls, value: str) -> str:
        return _usable_output(value)

    @field_validator("report_dir")
    @classmethod
    def _report_dir_usable(cls, value: str | None) -> str | None:
        return None if value is None else _usable_output(value)

    @model_validator(mode="after")
    def _report_dir_not_among_the_predictions(self) -> "ReportConfig":
        if self.report_dir is None or not uri_contains(self.output, self.report_dir):
            return self
        if not uri_contains(normalised_uri(self.output) + "/" + DEFAULT_REPORT_FOLDER, self.report_dir):
            raise ValueError(
                f"report_dir ({clip(self.report_dir)}) lies inside the output ({clip(self.output)}) but not under "
                f"its {DEFAULT_REPORT_FOLDER} folder: the next predict run would find files it did not write there. "
                "Leave report_dir unset (<output>/_report) or choose a folder outside the output"
            )
        return self
