"""What the trainer runs at fixed points of a run besides training: evaluations, plots, anything.

The caller builds the monitors and hands them to :class:`~objcrop.ssl.trainer.Trainer`, the way
solo-learn's ``main_pretrain.py`` hands its callbacks to Lightning's Trainer. The trainer itself then
needs nothing from the layers above it: ``objcrop pretrain`` builds the kNN monitor
(:mod:`objcrop.evaluate.monitors`) and the loss plot (:mod:`objcrop.analysis.loss_curve`).

Example::

    class PrintEpoch(Monitor):
        name = "print"

        def on_epoch_end(self, trainer):
            print("epoch", trainer.epoch, "done at step", trainer.step)
            return {}

    Trainer(config, monitors=[PrintEpoch()]).fit()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from objcrop.ssl.trainer import Trainer

__all__ = ["Monitor"]


class Monitor:
    """Hooks the trainer calls on the main process only (rank 0); each does nothing unless overridden.

    A hook may read the trainer's ``config``, ``dataset``, ``method`` (``method.backbone`` is the network
    to evaluate), ``out`` (the run's folder), ``epoch`` and ``step``; it must not change them.

    Attributes:
        name: How the trainer's log lines name the monitor's results.
    """

    name: str = "monitor"

    def setup(self, trainer: Trainer) -> None:
        """Once, after the dataset and the model are built and before the first step."""

    def on_epoch_end(self, trainer: Trainer) -> dict[str, float]:
        """After each epoch (and its checkpoint); ``trainer.epoch`` is the number of epochs done.

        Returns:
            Numbers for ``eval.csv`` and TensorBoard's ``eval/`` (``{}``: nothing to log this epoch).
        """
        return {}

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last step, the logs closed (also when a finished run is started again)."""
