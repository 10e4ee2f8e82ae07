"""The resolved config as MLflow params: dotted keys, values as text within MLflow's limits, and
nothing that could be a credential. Imports no MLflow."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from imgcls.errors import redact

logger = logging.getLogger(__name__)

# Characters of a param's value that every MLflow server accepts (older servers refuse longer ones;
# 3.x allows 6,000). A longer value is cut and says how long it was.
MAX_PARAM_VALUE_CHARACTERS = 500


MAX_KEY_CHARACTERS = 250


# Below MLflow's limit on a tag's value (8,000).
MAX_TAG_VALUE_CHARACTERS = 5000


# Sections left out whole: `storage.*` is the bucket's endpoint and client settings, nothing a
# comparison of trainings needs, and the place a credential would be put by mistake.
DROPPED_SECTIONS = ("storage",)


# A key holding any of these (in any component, any case) may name a credential: left out.
CREDENTIAL_WORDS = ("secret", "token", "password", "passwd", "credential", "key", "aws")


# Variables whose values are secrets: a value that contains one is left out, wherever it came from.
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN", "RAY_AUTH_TOKEN",
)  # fmt: skip


# Shorter values of those variables (a test's "x") would match everywhere.
MIN_SECRET_CHARACTERS = 8


# An AWS access key id (AKIA... for a user, ASIA... for a session), inside any text.
_ACCESS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}")


# What MLflow accepts in a param key besides the dots between components.
_KEY_CHARACTER_REFUSED = re.compile(r"[^\w\- ]")


def config_params(values: dict[str, Any]) -> dict[str, str]:
    """`values` (a config's `model_dump(mode="json")`) flattened to {dotted key: text}, without the
    dropped sections and without any key or value that looks like a credential."""
    params, dropped = {}, []
    for key, value in flatten(values):
        text = redact(param_text(value))
        if key.split(".", 1)[0] in DROPPED_SECTIONS:
            continue
        if looks_like_credential(key, text):
            dropped.append(key)
            continue
        params[param_key(key)] = clipped(text, MAX_PARAM_VALUE_CHARACTERS)
    if dropped:
        logger.info("MLflow params: left out %d keys that look like credentials", len(dropped))
    return params


def flatten(values: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) of nested mappings; lists and empty mappings are leaves."""
    if isinstance(values, dict) and values:
        for key, value in values.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif prefix:
        yield prefix, values


def param_text(value: Any) -> str:
    """A value as MLflow stores it: text as it is, everything else as JSON (true, null, [64, 64])."""
    return value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))


def param_key(key: str) -> str:
    """`key` with the characters MLflow refuses in a name (`/`, `:` between components, quotes, ...)
    replaced by `_`, and empty components filled, so that no two dots meet."""
    components = [_KEY_CHARACTER_REFUSED.sub("_", component) or "_" for component in key.split(".")]
    return ".".join(components)[:MAX_KEY_CHARACTERS]


def looks_like_credential(key: str, text: str) -> bool:
    """Whether a key names, or a value holds, what may be a secret: a credential word in the key, an
    AWS access key id, or the value of one of the environment's credential variables."""
    lowered = key.lower()
    if any(word in lowered for word in CREDENTIAL_WORDS):
        return True
    if _ACCESS_KEY_ID.search(text):
        return True
    return any(secret in text for secret in environment_secrets())


def environment_secrets() -> list[str]:
    values = (os.environ.get(name, "") for name in CREDENTIAL_VARIABLES)
    return [value for value in values if len(value) >= MIN_SECRET_CHARACTERS]


def clipped(text: str, limit: int) -> str:
    """`text` of at most `limit` characters, saying how long it was when cut."""
    if len(text) <= limit:
        return text
    suffix = f"… ({len(text):,} characters)"
    return text[: limit - len(suffix)] + suffix


def safe_tag(key: str, value: str) -> str | None:
    """A tag's value for MLflow, URLs' credentials masked; None when it looks like a credential.
    The key is imgcls's own (never a credential word), so only the value is checked."""
    text = redact(value)
    if _ACCESS_KEY_ID.search(text) or any(secret in text for secret in environment_secrets()):
        logger.info("MLflow tag %s left out: its value looks like a credential", key)
        return None
    return clipped(text, MAX_TAG_VALUE_CHARACTERS)
