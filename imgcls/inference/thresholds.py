"""The per-class decision thresholds of one run of a multi-label model: the artifact's, with
`min_score` setting every class and `thresholds` setting the classes it names. Imports no
TensorFlow or Ray, so both jobs check the settings before any image is read."""

from __future__ import annotations

from imgcls.errors import ConfigError, shorten


def resolve_thresholds(
    metadata, thresholds: list[float] | dict[str, float] | None, min_score: float | None
) -> list[float] | None:
    """One threshold per class, in class order, or None for a single-label model (which has none).

    Precedence, lowest first: the artifact's thresholds (0.5 each where it stores none), then
    `min_score` for every class, then `thresholds` for each class it gives (a list gives them all,
    a mapping the classes it names). A class is predicted when its probability is at least its
    threshold."""
    names = list(metadata.class_names)
    if metadata.task != "multilabel":
        if thresholds is not None:
            raise ConfigError(
                f"thresholds apply to multi-label models only, and model {metadata.model_version} is {metadata.task} "
                "(one label per image, the most probable class), so there is nothing to threshold: drop "
                "--set thresholds."
            )
        return None
    resolved = [float(min_score)] * len(names) if min_score is not None else metadata.decision_thresholds()
    if thresholds is None:
        return resolved
    if isinstance(thresholds, list):
        if len(thresholds) != len(names):
            raise ConfigError(
                f"--set thresholds lists {len(thresholds)} value(s), but model {metadata.model_version} has "
                f"{len(names)} classes ({shorten(names, 300)}): give one value per class in that order, or a "
                "mapping such as {" + f"{names[0]}: 0.3" + "} for the classes to change."
            )
        return [float(value) for value in thresholds]
    unknown = sorted(set(thresholds) - set(names))
    if unknown:
        raise ConfigError(
            f"--set thresholds names class(es) {shorten(unknown, 300)} that model {metadata.model_version} does "
            f"not know (it knows {shorten(names, 300)}). Name classes exactly as the model does."
        )
    for name, value in thresholds.items():
        resolved[names.index(name)] = float(value)
    return resolved


def thresholds_by_class(class_names: list[str], thresholds: list[float] | None) -> dict[str, float] | None:
    """The thresholds as {class: threshold} (for run records and reports), in class order."""
    return None if thresholds is None else dict(zip(class_names, thresholds))
