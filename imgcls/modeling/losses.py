"""Training losses: per-example, optionally label-smoothed and class-weighted, for the distributed step.

Multi-label (a sigmoid per class) uses binary cross-entropy per class, averaged over the classes of
each example:

    loss(y, p) = mean_k [ -(w_k * t_k * log(p_k) + (1 - t_k) * log(1 - p_k)) ],   t_k = y_k * (1 - s) + 0.5 * s

with `s` = train.label_smoothing (Keras' BinaryCrossentropy definition) and `w_k` the positive weight
of class k (PyTorch's `BCEWithLogitsLoss(pos_weight=...)`): 1 without class weights, n_neg / n_pos
of the training split for `balanced` (capped at MAX_POSITIVE_WEIGHT), or the mapping's value.
Probabilities are clipped to [1e-7, 1 - 1e-7] as Keras does.
"""

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


# `balanced` positive weights never exceed this: a class with 1 positive in 10,000 images would
# otherwise weigh its positives 9,999 times and swamp every other class's gradient.
MAX_POSITIVE_WEIGHT = 100.0
# Keras' backend epsilon: probabilities are clipped this far from 0 and 1 before the logarithm.
PROBABILITY_EPSILON = 1e-7


def positive_weight_vector(
    class_weights: str | dict[str, float] | None, class_names: list[str], class_counts: dict[str, int], num_images: int
) -> list[float] | None:
    """Multi-label: the weight of each class's positive term in class order. `balanced` gives
    negatives / positives of the class in the training split, capped at MAX_POSITIVE_WEIGHT; a
    mapping gives its value (missing classes 1)."""
    if class_weights is None:
        return None
    if class_weights == "balanced":
        weights = []
        for name in class_names:
            positives = max(class_counts.get(name, 0), 1)
            weights.append(min(max(num_images - positives, 0) / positives, MAX_POSITIVE_WEIGHT))
        return weights
    return class_weight_vector(class_weights, class_names, class_counts)


def create_loss(
    num_classes: int, label_smoothing: float = 0.0, class_weights: list[float] | None = None, multilabel: bool = False
):
    """A function (labels, probabilities) -> per-example losses, with optional label smoothing and
    class weights. Labels are class indices, or for `multilabel` (images, classes) 0/1 vectors, whose
    `class_weights` weigh each class's positive term (see the module's docstring). No reduction: the
    distributed step averages over the global batch itself."""
    import keras
    import tensorflow as tf

    if multilabel:
        return _multilabel_loss(label_smoothing, class_weights)
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


def _multilabel_loss(label_smoothing: float, positive_weights: list[float] | None):
    import tensorflow as tf

    weights = tf.constant(positive_weights, tf.float32) if positive_weights else None

    def per_example_loss(labels, probabilities):
        targets = tf.cast(labels, tf.float32)
        if label_smoothing:
            targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
        probabilities = tf.clip_by_value(tf.cast(probabilities, tf.float32), PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)
        positive = targets * tf.math.log(probabilities)
        if weights is not None:
            positive = positive * weights
        negative = (1.0 - targets) * tf.math.log(1.0 - probabilities)
        return -tf.reduce_mean(positive + negative, axis=-1)

    return per_example_loss
