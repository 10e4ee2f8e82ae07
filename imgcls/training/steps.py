"""The distributed train and eval steps, built once per model by `build_steps`.

Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy, so each worker runs an explicit step:
model and optimizer live in `strategy.scope()`, the optimizer all-reduces the gradients, and the loss
is averaged over the global batch. Every step returns the sums (loss, correct, count) of this worker's
batch; `sum_across_workers` adds them up over the group.
"""

from __future__ import annotations

import numpy as np


class DistributedSteps:
    """`train`, `eval`, `sum_across_workers` and `gather_across_workers` over one strategy and model."""

    def __init__(self, strategy, model, optimizer, loss_function, num_classes: int, mixed_precision: bool = False):
        import tensorflow as tf

        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.loss_function = loss_function
        self.binary = num_classes == 2
        self.mixed_precision = mixed_precision
        self._eval_step = tf.function(self._distributed(self._replica_eval_step), reduce_retracing=True)
        self._sum = tf.function(lambda values: strategy.reduce(
            tf.distribute.ReduceOp.SUM, strategy.run(tf.identity, args=(values,)), axis=None))  # fmt: skip
        self._gather = tf.function(lambda values: strategy.gather(strategy.run(tf.identity, args=(values,)), axis=0))
        self.retrace_train_step()

    def retrace_train_step(self) -> None:
        """A new traced train step: needed when the trainable variables change (a fine-tuning phase)."""
        import tensorflow as tf

        self._train_step = tf.function(self._distributed(self._replica_train_step), reduce_retracing=True)

    def train(self, images, labels) -> np.ndarray:
        return self._train_step(images, labels).numpy()

    def eval(self, images, labels) -> np.ndarray:
        return self._eval_step(images, labels).numpy()

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
        labels = tf.cast(labels, tf.int32)
        global_batch_size = tf.shape(labels)[0] * self.strategy.num_replicas_in_sync
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            per_example_loss = self.loss_function(labels, probabilities)
            loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=global_batch_size)
            scaled_loss = self.optimizer.scale_loss(loss) if self.mixed_precision else loss
        gradients = tape.gradient(scaled_loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([tf.reduce_sum(per_example_loss), self._correct_count(labels, probabilities), count])

    def _replica_eval_step(self, images, labels):
        import tensorflow as tf

        labels = tf.cast(labels, tf.int32)
        probabilities = self.model(tf.cast(images, tf.float32), training=False)
        per_example_loss = self.loss_function(labels, probabilities)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([tf.reduce_sum(per_example_loss), self._correct_count(labels, probabilities), count])


def build_steps(strategy, model, optimizer, loss_function, num_classes: int, mixed_precision: bool = False) -> DistributedSteps:
    return DistributedSteps(strategy, model, optimizer, loss_function, num_classes, mixed_precision)
