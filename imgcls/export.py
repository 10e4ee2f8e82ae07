"""The export job: an artifact's model as a SavedModel, ONNX or LiteRT file for a serving runtime, with
labels.txt and metadata.json beside it. The export is written to a local scratch folder, run with its
own runtime against the Keras model, and only then copied to the output, file by file, atomically."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from imgcls.config import ExportConfig
from imgcls.errors import ExportError, UserError, clip
from imgcls.platform import storage

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
METADATA_FILE = "metadata.json"
# The random images of the check come from a fixed seed: two exports of one model check the same inputs.
VERIFY_SEED = 0
# Foreign files named in a refusal at most.
LISTED_FILES = 3


class ExportSummary(BaseModel):
    model_config = {"protected_namespaces": ()}

    format: str
    output_uri: str
    model_version: str
    files: list[str]
    size_bytes: int
    seconds: float
    max_difference: float | None


def run(config: ExportConfig) -> ExportSummary:
    """Export `config.model` to `config.format` in `config.output`; raises UserError (ExportError,
    StorageError) for what the user can fix, before anything is written where possible."""
    from imgcls.modeling.artifact import read_metadata
    from imgcls.modeling.export_formats import require_export_extra

    started = time.perf_counter()
    storage.configure(config.storage)
    endpoint_url = config.storage.endpoint_url
    read_metadata(config.model, endpoint_url)  # a wrong --model fails before TensorFlow starts
    output = storage.resolve(config.output, endpoint_url)
    earlier_files = earlier_export_files(output, config.format)
    require_export_extra(config.format)
    model, metadata = _load_model(config)
    height, width = metadata.image_size
    logger.info(
        "model %s from %s: %s, %d classes, %dx%dx%d input",
        metadata.model_version, config.model, metadata.task, len(metadata.class_names), height, width, metadata.channels,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="imgcls-export-") as scratch:
        directory = Path(scratch)
        details, max_difference = _convert_and_check(config, model, metadata, directory)
        files = _write_beside(directory, metadata, config.format, details, config.verify_images, max_difference)
        publish(directory, files, output, earlier_files, config.format)
        size_bytes = sum((directory / name).stat().st_size for name in files)
    seconds = time.perf_counter() - started
    shown_difference = "not checked" if max_difference is None else f"{max_difference:.1e}"
    logger.info(
        "exported %s to %s: %.2f MB, %.1f s, max |difference| vs keras %s",
        config.format, output.uri, size_bytes / 1e6, seconds, shown_difference,
    )  # fmt: skip
    return ExportSummary(
        format=config.format, output_uri=output.uri, model_version=metadata.model_version, files=files,
        size_bytes=size_bytes, seconds=round(seconds, 3), max_difference=max_difference,
    )  # fmt: skip


def _load_model(config: ExportConfig):
    from imgcls.modeling.artifact import load_artifact
    from imgcls.platform.logs import native_chatter_filtered
    from imgcls.platform.tensorflow_import import import_for_inference, process_is_ours

    with native_chatter_filtered():  # TensorFlow's start-up
        import_for_inference(lean=process_is_ours())
        return load_artifact(config.model, config.storage.endpoint_url)


def _convert_and_check(config: ExportConfig, model, metadata, directory: Path) -> tuple[dict, float | None]:
    from imgcls.modeling.export_formats import write_format
    from imgcls.modeling.serving import serving_model

    converting = time.perf_counter()
    serving = serving_model(model, metadata)
    details = write_format(serving, config.format, directory)
    logger.info("converted to %s in %.1f s", config.format, time.perf_counter() - converting)
    if config.verify_images == 0:
        return details, None
    max_difference = check_against_keras(config, model, metadata, directory, serving)
    logger.info(
        "checked on %d random images with the %s runtime: max |difference| vs keras %.1e",
        config.verify_images, config.format, max_difference,
    )  # fmt: skip
    return details, max_difference


def check_against_keras(config: ExportConfig, model, metadata, directory: Path, serving) -> float:
    """The largest difference of any class probability between the export, run by its own runtime, and
    the Keras model as prediction runs it, on `verify_images` random 0-255 images. A runtime that
    cannot run the export is an ExportError naming the layer (found in `serving`, the graph exported)."""
    from imgcls.inference.predictor import class_probabilities
    from imgcls.modeling.export_formats import runtime_refusal
    from imgcls.modeling.export_runtimes import exported_probabilities
    from imgcls.platform.logs import native_output_held

    height, width = metadata.image_size
    images = np.random.default_rng(VERIFY_SEED).integers(0, 256, (config.verify_images, height, width, metadata.channels))
    images = images.astype(np.float32)
    # An eager call: the same kernels as prediction's predict_on_batch without tracing the model again
    # (seconds for a backbone); the two agree far within any tolerance.
    expected = class_probabilities(np.asarray(model(images, training=False)), metadata.task)
    try:
        with native_output_held():  # onnxruntime logs its refusal natively before raising it
            actual = np.asarray(exported_probabilities(config.format, directory, images))
    except Exception as error:
        raise runtime_refusal(config.format, serving, directory, error) from None
    if actual.shape != expected.shape:
        raise ExportError(
            f"The {config.format} export gives output of shape {list(actual.shape)} for {len(images)} images where "
            f"the model gives {list(expected.shape)}; nothing was written. Export to another format."
        )
    difference = float(np.max(np.abs(actual - expected)))
    if not difference <= config.max_difference:  # NaN fails too
        raise ExportError(
            f"The {config.format} export does not reproduce the model: on {len(images)} random images its class "
            f"probabilities differ from the Keras model's by up to {difference:.2g}, more than max_difference "
            f"{config.max_difference:g}; nothing was written. Export to another format, or accept the difference "
            "with --set max_difference=..."
        )
    return difference


def _write_beside(
    directory: Path, metadata, export_format: str, details: dict, checked_images: int, max_difference: float | None
) -> list[str]:
    """labels.txt and metadata.json into `directory`; returns every file of the export, relative to it."""
    from imgcls.modeling.export_formats import MODEL_FILES, package_versions
    from imgcls.modeling.serving import contract

    (directory / LABELS_FILE).write_text("".join(f"{name}\n" for name in metadata.class_names), encoding="utf-8")
    model_files = sorted(
        path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file()
    )
    files = sorted({*model_files, LABELS_FILE, METADATA_FILE})
    export = {
        "format": export_format,
        "model_file": MODEL_FILES[export_format],
        "labels_file": LABELS_FILE,
        "source_model_version": metadata.model_version,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        **contract(metadata),
        **details,
        "versions": package_versions(export_format),
        "check": {"random_images": checked_images, "max_abs_difference": max_difference},
        "files": files,
    }
    document = {**metadata.model_dump(mode="json"), "export": export}
    (directory / METADATA_FILE).write_text(json.dumps(document, indent=2), encoding="utf-8")
    return files


def earlier_export_files(output: storage.Location, export_format: str) -> list[str]:
    """The files of an earlier imgcls export of `export_format` in `output` (which the new export may
    replace), or [] for a missing or empty folder. Anything else is refused: imgcls never replaces or
    deletes a file it cannot prove it wrote, and each format gets a folder of its own."""
    if storage.is_file(output):
        raise UserError(f"--output {output.uri} is a file; give the folder the export should be written to.")
    present = sorted(storage.iter_files(output))
    if not present:
        return []
    earlier = _export_record(output) if METADATA_FILE in present else None
    if earlier is None:
        raise UserError(
            f"--output {output.uri} already holds {len(present)} file(s) that are not an imgcls export "
            f"({_listed(present)}): export into an empty or new folder; imgcls never replaces files it did not write."
        )
    if earlier.get("format") != export_format:
        raise UserError(
            f"--output {output.uri} holds an imgcls {clip(str(earlier.get('format')), 40)} export; each format gets "
            f"a folder of its own: export {export_format} to another --output."
        )
    # Only names both listed by the earlier export and found in this folder: a metadata.json that
    # lists `../elsewhere` must not make the new export delete a file outside it.
    written = [name for name in earlier.get("files", []) if isinstance(name, str) and name in set(present)]
    foreign = [name for name in present if name not in set(written)]
    if foreign:
        raise UserError(
            f"--output {output.uri} holds an imgcls {export_format} export and files it did not write "
            f"({_listed(foreign)}): move them away or export into a new folder; imgcls never replaces them."
        )
    return written


def _export_record(output: storage.Location) -> dict | None:
    try:
        document = json.loads(storage.read_bytes(output.join(METADATA_FILE)))
    except ValueError:  # not JSON, or not UTF-8: not ours
        return None
    export = document.get("export") if isinstance(document, dict) else None
    return export if isinstance(export, dict) and isinstance(export.get("files"), list) else None


def _listed(names: list[str]) -> str:
    shown = ", ".join(clip(name, 80) for name in names[:LISTED_FILES])
    return shown + (f" and {len(names) - LISTED_FILES} more" if len(names) > LISTED_FILES else "")


def publish(directory: Path, files: list[str], output: storage.Location, earlier_files: list[str], export_format: str) -> None:
    """Copy the export to `output`, each file atomically: the model's other files first, then the file
    a runtime opens (a watcher such as TF Serving sees saved_model.pb only once its variables are
    complete), then labels.txt, and metadata.json last, as in an artifact. Files of the earlier export
    that this one does not have are deleted after."""
    from imgcls.modeling.export_formats import MODEL_FILES

    last = [MODEL_FILES[export_format], LABELS_FILE, METADATA_FILE]
    ordered = [name for name in files if name not in last] + [name for name in last if name in files]
    for name in ordered:
        storage.write_bytes_atomic(output.join(name), (directory / name).read_bytes())
    for name in sorted(set(earlier_files) - set(files)):
        stale = output.join(name)
        with storage.user_facing_errors(stale, "delete"):
            stale.filesystem.delete_file(stale.path)
