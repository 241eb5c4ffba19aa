"""Evaluation during pretraining: the kNN monitor the trainer runs every ``train.knn_every_epochs``.

The trainer imports nothing from :mod:`objcrop.evaluate`; its caller builds the monitor and hands it over
(``objcrop pretrain`` does)::

    from objcrop.evaluate.monitors import knn_monitor

    monitor = knn_monitor(config)  # None unless train.knn_every_epochs > 0
    pretrain(config, monitors=[monitor] if monitor else [])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from objcrop.ssl.monitors import Monitor

if TYPE_CHECKING:
    from objcrop.evaluate.knn import KNNMonitor
    from objcrop.ssl.trainer import Trainer

__all__ = ["KNNEpochMonitor", "knn_monitor"]


class KNNEpochMonitor(Monitor):
    """kNN test mAP of the backbone on seeded subsets of the training and test records (see
    :class:`~objcrop.evaluate.knn.KNNMonitor`), every ``train.knn_every_epochs`` epochs.

    The test split (``train.knn_test_annotations``) is read in :meth:`setup`, on the main process only.
    A dataset without a records table (a stream of tar shards) has no training subset: the monitor
    then does nothing.

    Args:
        config: The validated pretraining config.
    """

    name = "kNN"

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.every_epochs = int(config["train"]["knn_every_epochs"])
        self.knn: KNNMonitor | None = None

    def setup(self, trainer: Trainer) -> None:
        """Reads the test split and draws the subsets from the trainer's dataset."""
        if not hasattr(trainer.dataset, "records"):
            return
        from objcrop.data.readers import load_records
        from objcrop.evaluate.knn import KNNMonitor

        tcfg, data = self.config["train"], self.config["data"]
        test = load_records(
            data["format"],
            annotations=tcfg["knn_test_annotations"],
            images=data["images"],
            labels_csv=data["labels_csv"],
            classes_csv=data["classes_csv"],
        )
        size = int(tcfg["knn_size"] or self.config["crops"]["size"])
        self.knn = KNNMonitor(trainer.dataset.records, test, size=size, every_epochs=self.every_epochs)

    def on_epoch_end(self, trainer: Trainer) -> dict[str, float]:
        """``{"knn_map@20": ..., "knn_images_skipped": ...}`` every ``every_epochs`` epochs, ``{}`` in between."""
        if self.knn is None or trainer.epoch % self.every_epochs:
            return {}
        return self.knn(trainer.method.backbone)


def knn_monitor(config: Mapping[str, Any]) -> KNNEpochMonitor | None:
    """The kNN monitor ``train.knn_every_epochs`` asks for, or ``None`` when it is 0."""
    return KNNEpochMonitor(config) if config["train"]["knn_every_epochs"] else None
