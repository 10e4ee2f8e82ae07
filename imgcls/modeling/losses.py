"""Training losses: per-example, optionally label-smoothed and class-weighted, for the distributed step."""

from __future__ import annotations

from imgcls.modeling.artifact import task_for


def class_weight_vector(
    class_weights: str | dict[str, float] | None, class_names: list[str], class_counts: dict[str, int]
) -> list[float] | None:
    """Per-class loss weights in class order; `balanced` gives n / (classes x count)."""
    if class_weights is None:
        return None
    if class_weights == "balanced":
        total = sum(class_counts.values())
        return [total / (len(class_names) * max(class_counts.get(name, 0), 1)) for name in class_names]
    unknown = sorted(set(class_weights) - set(class_names))
    if unknown:
        raise ValueError(f"train.class_weights names unknown class(es) {unknown}; classes are {class_names}")
    return [float(class_weights.get(name, 1.0)) for name in class_names]


def create_loss(num_classes: int, label_smoothing: float = 0.0, class_weights: list[float] | None = None):
    """A function (integer labels, probabilities) -> per-example losses, with optional label smoothing
    and class weights. No reduction: the distributed step averages over the global batch itself."""
    import keras
    import tensorflow as tf

    binary = task_for(num_classes) == "binary"
    if binary:
        base = keras.losses.BinaryCrossentropy(reduction=None, label_smoothing=label_smoothing)
    elif label_smoothing:
        base = keras.losses.CategoricalCrossentropy(reduction=None, label_smoothing=label_smoothing)
    else:
        base = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    weights = tf.constant(class_weights, tf.float32) if class_weights else None

    def per_example_loss(labels, probabilities):
        labels = tf.cast(labels, tf.int32)
        if binary:
            targets = tf.cast(tf.expand_dims(labels, -1), tf.float32)
        elif label_smoothing:
            targets = tf.one_hot(labels, num_classes)
        else:
            targets = labels
        losses = base(targets, probabilities)
        if weights is not None:
            losses = losses * tf.gather(weights, labels)
        return losses

    return per_example_loss
