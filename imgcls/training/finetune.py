"""The fine-tuning phase plan of a pretrained backbone: head only while frozen, then the top of the
backbone at a lower base learning rate. Other models have one phase and the configured rate."""

from __future__ import annotations

import logging

from imgcls.config import JobConfig

logger = logging.getLogger(__name__)


class PhasePlan:
    """Which phase each epoch is in, and its base learning rate."""

    def __init__(self, config: JobConfig):
        self.finetune = config.finetune
        self.learning_rate = config.train.learning_rate
        self.fine_tuning = config.model.is_pretrained_backbone
        self.current_frozen: bool | None = None

    def frozen_at(self, epoch: int) -> bool:
        return self.fine_tuning and (self.finetune.freeze_epochs is None or epoch < self.finetune.freeze_epochs)

    def base_learning_rate_at(self, epoch: int) -> float:
        if self.fine_tuning and not self.frozen_at(epoch):
            return self.finetune.learning_rate or self.learning_rate / 10
        return self.learning_rate

    def prepare_for_optimizer(self, model) -> None:
        """Before the optimizer is built: with two phases, give it slots for every variable phase 2 will
        train, so the optimizer state (and the checkpoint layout) is the same in both phases."""
        from imgcls.modeling.backbones import set_finetune_phase

        if self.fine_tuning and self.finetune.freeze_epochs is not None:
            set_finetune_phase(model, frozen=False, unfreeze_layers=self.finetune.unfreeze_layers)
        elif self.fine_tuning:
            set_finetune_phase(model, frozen=True)

    def enter(self, model, epoch: int, log: bool) -> bool:
        """Set the model's trainable layers for `epoch`; True when the phase changed (the train step
        must then be traced again: its trainable variables are fixed when traced)."""
        from imgcls.modeling.backbones import set_finetune_phase

        frozen = self.frozen_at(epoch)
        if not self.fine_tuning or frozen == self.current_frozen:
            return False
        trainable_layers = set_finetune_phase(model, frozen, self.finetune.unfreeze_layers)
        if log and frozen:
            logger.info("fine-tuning phase 1: backbone frozen, training the head only")
        elif log:
            logger.info(
                "fine-tuning phase 2 from epoch %d: %d backbone layers trainable (BatchNorm stays frozen), "
                "base learning rate %.3g", epoch + 1, len(trainable_layers), self.base_learning_rate_at(epoch),
            )  # fmt: skip
        self.current_frozen = frozen
        return True
