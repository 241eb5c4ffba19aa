"""objcrop's views in other libraries: lightly's MoCo building blocks and a Lightning DataModule."""

import copy
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from objcrop.crops.augment import moco_v2_view_transform
from objcrop.crops.dataset import ObjectAwareDataset
from objcrop.crops.policies import KIND_CODES, ViewPairPolicy
from objcrop.crops.transforms import ViewPairTransform
from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.proposals import open_proposals
from objcrop.ssl.backbones import build_backbone

torch.set_num_threads(1)

PX = 32


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("interop")
    synthesize(out, 8, seed=4, size=48, test_fraction=0.0, progress=False)
    return load_records("coco", annotations=out / "annotations.json", images=out / "images")


def _dataset(records, seed=0) -> ObjectAwareDataset:
    store = open_proposals("gt", records)
    return ObjectAwareDataset(records, store, ViewPairPolicy("obj-obj-dilate"), size=PX, seed=seed)


def test_lightly_moco_blocks_train_on_objcrop_views(records):
    lightly_loss = pytest.importorskip("lightly.loss")
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    head = MoCoProjectionHead(dim, 64, 16)
    backbone_key, head_key = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_key)
    deactivate_requires_grad(head_key)
    criterion = lightly_loss.NTXentLoss(temperature=0.2, memory_bank_size=(16, 16))
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.06, momentum=0.9)
    before = [p.detach().clone() for p in params]
    key_before = [p.detach().clone() for p in backbone_key.parameters()]

    losses = []
    for batch in DataLoader(_dataset(records), batch_size=4, drop_last=True):
        update_momentum(backbone, backbone_key, m=0.99)
        update_momentum(head, head_key, m=0.99)
        x_query, x_key = batch["views"]  # objcrop's object-aware pair
        query = head(backbone(x_query))
        key = head_key(backbone_key(x_key)).detach()
        loss = criterion(query, key)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True) if p.ndim > 1)
    assert any(not torch.equal(p, b) for p, b in zip(backbone_key.parameters(), key_before, strict=True))
    assert criterion.memory_bank.bank.shape == (16, 16)  # lightly's MoCo queue, filled from our keys


def test_view_pair_transform_has_the_shape_of_a_lightly_multi_view_transform(records):
    multi_view = pytest.importorskip("lightly.transforms.multi_view_transform")
    from objcrop.data.images import load_image

    pil = load_image(records.path(0))
    theirs = multi_view.MultiViewTransform([moco_v2_view_transform(PX)] * 2)(pil)
    ours, kinds = ViewPairTransform(ViewPairPolicy("obj-obj-dilate"), size=PX, seed=0)(pil, records.boxes_of(0))
    assert [v.shape for v in theirs] == [v.shape for v in ours] == [(3, PX, PX)] * 2
    assert [v.dtype for v in theirs] == [v.dtype for v in ours]
    assert set(kinds) <= set(KIND_CODES)


class SpyDataset(ObjectAwareDataset):
    """Records every set_epoch call (in the main process)."""

    def set_epoch(self, epoch: int) -> None:
        self.calls = [*getattr(self, "calls", []), int(epoch)]
        super().set_epoch(epoch)


def _spy(records, seed=0) -> SpyDataset:
    return SpyDataset(records, open_proposals("gt", records), ViewPairPolicy("obj-obj-dilate"), size=PX, seed=seed)


def _module():
    import lightning.pytorch as pl

    from objcrop.ssl.moco import MoCoV2

    class TinyMoCo(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.method = MoCoV2("timm:test_resnet", dim=16, hidden_dim=32, queue_size=8, shuffle_bn=False)
            self.seen = []  # (trainer epoch, dataset epoch, first view of the batch)

        def training_step(self, batch, batch_idx):
            dataset = self.trainer.train_dataloader.dataset
            self.seen.append((self.current_epoch, dataset.epoch, batch["views"][0].clone()))
            return self.method(batch)["loss"]

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.method.after_optimizer_step(self.global_step, 10)

        def configure_optimizers(self):
            return torch.optim.SGD(self.method.parameters(), lr=0.01)

    return TinyMoCo()


def _trainer(**kwargs):
    import lightning.pytorch as pl

    common = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False}
    return pl.Trainer(**common, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_lightning_fast_dev_run_seeds_the_dataset_epoch(records):
    pytest.importorskip("lightning")
    from objcrop.crops.lightning import EpochSeedingSampler, ObjectAwareDataModule

    dataset = _spy(records)
    data = ObjectAwareDataModule(dataset, batch_size=4)
    module = _module()
    _trainer(fast_dev_run=2).fit(module, datamodule=data)
    assert dataset.calls == [0] and len(module.seen) == 2
    assert all(trainer_epoch == dataset_epoch == 0 for trainer_epoch, dataset_epoch, _ in module.seen)
    assert isinstance(module.trainer.train_dataloader.sampler, EpochSeedingSampler)


def test_every_epoch_reseeds_the_crops(records):
    pytest.importorskip("lightning")
    from objcrop.crops.lightning import ObjectAwareDataModule

    dataset = _spy(records, seed=3)
    module = _module()
    data = ObjectAwareDataModule(dataset, batch_size=4, shuffle=False)
    _trainer(max_epochs=3, limit_train_batches=1).fit(module, datamodule=data)
    assert dataset.calls == [0, 1, 2]
    assert [(t, d) for t, d, _ in module.seen] == [(0, 0), (1, 1), (2, 2)]
    views = [v for _, _, v in module.seen]
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])  # same images, new crops
    dataset.set_epoch(1)  # the seeded dataset repeats epoch 1 exactly, as in objcrop's own trainer
    first = torch.stack([dataset[i]["views"][0] for i in range(4)])
    torch.testing.assert_close(first, views[1])


@pytest.mark.slow  # two forkserver worker starts
def test_loader_workers_get_each_epoch(records):
    pytest.importorskip("lightning")
    from objcrop.crops.lightning import ObjectAwareDataModule

    data = ObjectAwareDataModule(_dataset(records, seed=3), batch_size=4, workers=1, shuffle=False)
    loader = data.train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "forkserver"  # what the README tells scripts
    batches = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
        batches.append(next(iter(loader))["views"][0])
    reference = _dataset(records, seed=3)
    for epoch, batch in enumerate(batches):
        reference.set_epoch(epoch)
        torch.testing.assert_close(batch, torch.stack([reference[i]["views"][0] for i in range(4)]))
    assert not torch.equal(batches[0], batches[1])


def test_solo_learn_batch_format_and_bad_arguments(records):
    pytest.importorskip("lightning")
    from objcrop.crops.lightning import ObjectAwareDataModule

    data = ObjectAwareDataModule(_dataset(records), batch_size=4, shuffle=False, batch_format="solo")
    indexes, views, targets = next(iter(data.train_dataloader()))
    assert indexes.tolist() == [0, 1, 2, 3] and targets.tolist() == [-1] * 4  # solo-learn ignores -1 labels
    assert [v.shape for v in views] == [(4, 3, PX, PX)] * 2
    with pytest.raises(ValueError, match="batch_format must be one of objcrop, solo"):
        ObjectAwareDataModule(_dataset(records), batch_size=4, batch_format="lightly")
    with pytest.raises(TypeError, match="has no set_epoch"):
        ObjectAwareDataModule(list(range(4)), batch_size=2)


def test_import_objcrop_does_not_import_lightning():
    imports = "import sys, objcrop.crops.dataset, objcrop.ssl.moco, objcrop.evaluate.backbone"
    code = f"{imports}; print('lightning' in sys.modules, 'lightly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
