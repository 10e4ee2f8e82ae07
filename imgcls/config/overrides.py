"""Reading configs: bounded, strict YAML (no aliases), `--set key=value` overrides, deep merges, and
validation errors as one readable paragraph. Defaults live in the models, a YAML file overrides
them, and `--set` overrides the file. Imports no TensorFlow or Ray."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from imgcls.config.common import CREDENTIALS_ERROR_TYPE, StrictModel
from imgcls.config.training import JobConfig
from imgcls.errors import ConfigError, clip, shorten

# Bytes of a config file read at most: real configs are a few kilobytes, and the file is read whole.
MAX_CONFIG_BYTES = 1_048_576


# Nesting of YAML collections accepted at most: PyYAML composes recursively, so `[[[[...` a megabyte
# deep would end in a RecursionError; configs nest three or four levels.
MAX_YAML_DEPTH = 64


# Problems listed at most in one validation message; the count of the rest is given.
MAX_PROBLEMS_SHOWN = 10


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


def set_dotted(values: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of nested `values` with the dotted `key` (e.g. `train.learning_rate`) set to `value`, as it
    is, with no parsing: Tune's trial values arrive as Python values already."""
    parts = key.split(".")
    updated = dict(values)
    target = updated
    for part in parts[:-1]:
        child = target.get(part)
        target[part] = dict(child) if isinstance(child, dict) else {}
        target = target[part]
    target[parts[-1]] = value
    return updated


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
    """Defaults, then the YAML file at `path`, then `--set` overrides. `tracking.experiment` left unset
    becomes the file's name without its extension: the runs of one config file go to one experiment."""
    values = read_yaml_mapping(path) if path is not None else {}
    values = merge(values, parse_overrides(overrides or []))
    tracking = values.get("tracking", {})
    if path is not None and isinstance(tracking, dict) and tracking.get("experiment") is None:
        values["tracking"] = {**tracking, "experiment": Path(path).stem}
    source = str(path) if path is not None else "overrides"
    if overrides:
        source += " with --set overrides"
    return build_model(JobConfig, values, source)


def config_to_yaml(config: StrictModel) -> str:
    """The resolved config as YAML that `load_job_config` accepts back unchanged."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
