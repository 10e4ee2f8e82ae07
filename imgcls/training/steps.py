"""The distributed train and eval steps, built once per model by `build_steps`.

Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy, so each worker runs an explicit step:
model and optimizer live in `strategy.scope()`, the optimizer all-reduces the gradients, and the loss
is averaged over the global batch. Every step returns the sums of this worker's batch, and
`sum_across_workers` adds them up over the group: (loss, correct, count) for single-label models;
(loss, true positives, false positives, false negatives, exact label sets, count) at threshold 0.5
for multi-label ones, so micro-F1 is exact over the whole group, not an average of averages.
"""

from __future__ import annotations

import numpy as np


# Multi-label: a class counts as predicted at this probability while training (thresholds per
# class are chosen once training ends, see imgcls.training.thresholds).
TRAINING_THRESHOLD = 0.5


def epoch_metrics(sums: np.ndarray, multilabel: bool, prefix: str = "") -> dict[str, float]:
    """The epoch's metrics from the group's summed step results: loss and accuracy, or for
    multi-label loss, micro_f1 (at 0.5) and exact_match (the whole label set right)."""
    if not multilabel:
        loss, correct, count = sums
        count = count if not prefix else max(count, 1.0)
        return {f"{prefix}loss": float(loss / count), f"{prefix}accuracy": float(correct / count)}
    loss, true_positives, false_positives, false_negatives, exact, count = sums
    count = max(count, 1.0)
    denominator = 2 * true_positives + false_positives + false_negatives
    return {
        f"{prefix}loss": float(loss / count),
        f"{prefix}micro_f1": float(2 * true_positives / denominator) if denominator else 0.0,
        f"{prefix}exact_match": float(exact / count),
    }


class DistributedSteps:
    """`train`, `eval`, `predict`, `sum_across_workers` and `gather_across_workers` over one strategy and model."""

    def __init__(self, strategy, model, optimizer, loss_function, num_classes: int, mixed_precision: bool = False,
                 multilabel: bool = False):  # fmt: skip
        import tensorflow as tf

        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.loss_function = loss_function
        self.binary = num_classes == 2 and not multilabel
        self.multilabel = multilabel
        self.mixed_precision = mixed_precision
        self._eval_step = tf.function(self._distributed(self._replica_eval_step), reduce_retracing=True)
        self._predict_step = tf.function(
            lambda images: strategy.experimental_local_results(
                strategy.run(lambda batch: self.model(tf.cast(batch, tf.float32), training=False), args=(images,)))[0],
            reduce_retracing=True,
        )  # fmt: skip
        self._sum = tf.function(lambda values: strategy.reduce(
            tf.distribute.ReduceOp.SUM, strategy.run(tf.identity, args=(values,)), axis=None))  # fmt: skip
        self._gather = tf.function(lambda values: strategy.gather(strategy.run(tf.identity, args=(values,)), axis=0))
        self.retrace_train_step()

    def retrace_train_step(self) -> None:
        """A new traced train step: needed when the trainable variables change (a fine-tuning phase)."""
        import tensorflow as tf

        self._train_step = tf.function(self._distributed(self._replica_train_step), reduce_retracing=True)

    @property
    def sum_width(self) -> int:
        """How many sums each step returns."""
        return 6 if self.multilabel else 3

    def train(self, images, labels) -> np.ndarray:
        return self._train_step(images, labels).numpy()

    def eval(self, images, labels) -> np.ndarray:
        return self._eval_step(images, labels).numpy()

    def predict(self, images) -> np.ndarray:
        """This worker's probabilities for a batch, in inference mode."""
        return self._predict_step(images).numpy()

    def sum_across_workers(self, values: np.ndarray, dtype="float32") -> np.ndarray:
        import tensorflow as tf

        return self._sum(tf.constant(values, dtype=dtype)).numpy()

    def gather_across_workers(self, values: np.ndarray, dtype="float64") -> np.ndarray:
        import tensorflow as tf

        return self._gather(tf.constant(values, dtype=dtype)).numpy()

    # The per-replica bodies.
    def _distributed(self, replica_step):
        strategy = self.strategy

        def step(images, labels):
            return strategy.experimental_local_results(strategy.run(replica_step, args=(images, labels)))[0]

        return step

    def _labels(self, labels):
        import tensorflow as tf

        return tf.cast(labels, tf.float32) if self.multilabel else tf.cast(labels, tf.int32)

    def _batch_sums(self, per_example_loss, labels, probabilities):
        """The sums one step returns (see the module's docstring)."""
        import tensorflow as tf

        count = tf.cast(tf.shape(labels)[0], tf.float32)
        if not self.multilabel:
            return tf.stack([tf.reduce_sum(per_example_loss), self._correct_count(labels, probabilities), count])
        predicted = tf.cast(probabilities >= TRAINING_THRESHOLD, tf.float32)
        positive = tf.cast(labels > 0.5, tf.float32)
        exact = tf.reduce_all(tf.equal(predicted, positive), axis=-1)
        return tf.stack([
            tf.reduce_sum(per_example_loss), tf.reduce_sum(predicted * positive), tf.reduce_sum(predicted * (1 - positive)),
            tf.reduce_sum((1 - predicted) * positive), tf.reduce_sum(tf.cast(exact, tf.float32)), count,
        ])  # fmt: skip

    def _correct_count(self, labels, probabilities):
        import tensorflow as tf

        if self.binary:
            predicted = tf.cast(probabilities[:, 0] > 0.5, tf.int32)
        else:
            predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))

    def _replica_train_step(self, images, labels):
        import tensorflow as tf

        images = tf.cast(images, tf.float32)
        labels = self._labels(labels)
        global_batch_size = tf.shape(labels)[0] * self.strategy.num_replicas_in_sync
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            per_example_loss = self.loss_function(labels, probabilities)
            loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=global_batch_size)
            scaled_loss = self.optimizer.scale_loss(loss) if self.mixed_precision else loss
        gradients = tape.gradient(scaled_loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        return self._batch_sums(per_example_loss, labels, probabilities)

    def _replica_eval_step(self, images, labels):
        import tensorflow as tf

        labels = self._labels(labels)
        probabilities = self.model(tf.cast(images, tf.float32), training=False)
        per_example_loss = self.loss_function(labels, probabilities)
        return self._batch_sums(per_example_loss, labels, probabilities)


def build_steps(strategy, model, optimizer, loss_function, num_classes: int, mixed_precision: bool = False,
                multilabel: bool = False) -> DistributedSteps:  # fmt: skip
    return DistributedSteps(strategy, model, optimizer, loss_function, num_classes, mixed_precision, multilabel)
