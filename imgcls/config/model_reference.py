"""`models:/NAME@ALIAS` and `models:/NAME/VERSION`: a model in an MLflow model registry, as predict and
evaluate take it for --model (MLflow's own URI form), and the names `tracking.register_as` and
`imgcls promote` accept. Imports no MLflow."""

from __future__ import annotations

import re

from pydantic import BaseModel

from imgcls.errors import clip

SCHEME = "models:/"

# Registered model names and aliases that read back unchanged from a `models:/` URI: no `/` or `@`
# (they split the URI), no spaces or quotes (they break MLflow's search filters).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}")
ALIAS_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,255}")
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,9}")


class ModelReference(BaseModel):
    """One registered model version, named directly (`version`) or through an alias."""

    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.name}@{self.alias}" if self.alias else f"{SCHEME}{self.name}/{self.version}"


def is_model_reference(text: str) -> bool:
    return text.strip().lower().startswith(SCHEME)


def parse_model_reference(text: str) -> ModelReference:
    """The reference `text` names; ValueError saying the two accepted forms otherwise."""
    body = text.strip()[len(SCHEME) :]
    if "@" in body:
        name, alias = body.split("@", 1)
        if NAME_PATTERN.fullmatch(name) and ALIAS_PATTERN.fullmatch(alias):
            return ModelReference(name=name, alias=alias)
    elif "/" in body:
        name, version = body.split("/", 1)
        if NAME_PATTERN.fullmatch(name) and VERSION_PATTERN.fullmatch(version):
            return ModelReference(name=name, version=version)
    raise ValueError(
        f"{clip(text, 200)} is not a registered model: use models:/NAME@ALIAS (e.g. models:/digits@champion) or "
        "models:/NAME/VERSION (e.g. models:/digits/3)"
    )


def check_model_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{clip(name, 200)} is not a usable registered model name: letters, digits, `_`, `.` and `-`, starting "
            "with a letter or digit, at most 256 characters"
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS_PATTERN.fullmatch(alias) or VERSION_PATTERN.fullmatch(alias.lstrip("vV")):
        raise ValueError(
            f"{clip(alias, 200)} is not a usable alias: letters, digits, `_` and `-`, starting with a letter or `_` "
            "(MLflow reserves v1, v2, ... for versions)"
        )
    return alias
