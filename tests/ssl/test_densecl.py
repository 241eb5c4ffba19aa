"""DenseCL mechanics: C5 backbone, dense correspondence, loss combination, queues, training."""

import pytest
import torch
import torchvision

from objcrop.crops.policies import KIND_CODES
from objcrop.ssl.backbones import build_backbone
from objcrop.ssl.densecl import DenseCL
from objcrop.ssl.losses import dense_correspondence

torch.set_num_threads(1)

OBJ, DIL = KIND_CODES["object"], KIND_CODES["dilated"]
BATCH, DIM, PX = 8, 16, 16  # small-image stem: 16 px -> a 2x2 C5 map


def _tiny_densecl(**kwargs) -> DenseCL:
    settings = {"dim": DIM, "hidden_dim": 32, "queue_size": 64, "small_images": True}
    return DenseCL("resnet18", **(settings | kwargs))


def _views(seed: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return [x + 0.3 * torch.randn(shape, generator=g) for _ in range(2)]


def _batch(seed: int = 0) -> dict:
    kinds = torch.tensor([[OBJ, DIL], [DIL, OBJ]]).repeat(BATCH // 2, 1)
    return {"views": _views(seed, (BATCH, 3, PX, PX)), "kinds": kinds}


def test_backbone_outputs_and_torchvision_names():
    small_map, dim = build_backbone("resnet18", small_images=True, feature_map=True)
    assert dim == 512
    assert small_map(torch.randn(2, 3, 16, 16)).shape == (2, 512, 2, 2)
    pooled, _ = build_backbone("resnet18")
    assert pooled(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(pooled.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")


def test_correspondence_finds_the_matching_location():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 2, 3, generator=g)
    perms = [torch.tensor([4, 0, 5, 2, 1, 3]), torch.tensor([1, 2, 3, 4, 5, 0])]
    scales = torch.tensor([0.5, 3.0, 1.0, 7.0, 0.1, 2.0])  # cosine similarity ignores the norm
    k = torch.stack([q[i].flatten(1)[:, perm] * scales for i, perm in enumerate(perms)])  # [2, 8, 6]
    match = dense_correspondence(q, k)
    for i, perm in enumerate(perms):
        # key location j holds query location perm[j], so query location s matches argsort(perm)[s]
        assert match[i].tolist() == torch.argsort(perm).tolist()

    coarse = q[:, :, :, :1]  # a key map of another size: 2 locations
    assert dense_correspondence(q, coarse).shape == (2, 6)


def test_loss_combines_global_and_dense_with_lambda():
    torch.manual_seed(0)
    model = _tiny_densecl(lambda_=0.3)
    model.eval()
    out = model(_batch())
    assert set(out) == {"loss", "loss_global", "loss_dense", "acc1"}
    expected = 0.7 * out["loss_global"] + 0.3 * out["loss_dense"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    model.lambda_ = 0.0
    torch.testing.assert_close(model(_batch())["loss"].detach(), out["loss_global"])
    with pytest.raises(ValueError, match="lambda_"):
        _tiny_densecl(lambda_=1.5)


@pytest.mark.parametrize(("mode", "per_sample"), [("pooled", 1), ("locations", 4)])
def test_queues_receive_normalised_keys(mode, per_sample):
    model = _tiny_densecl(dense_queue=mode, dense_queue_size=256, symmetric=True)
    model(_batch())
    assert model.queue.ptr.item() == 2 * BATCH
    assert model.dense_queue.ptr.item() == 2 * BATCH * per_sample
    newest = model.dense_queue.keys[: 2 * BATCH * per_sample]
    torch.testing.assert_close(newest.norm(dim=1), torch.ones(len(newest)))


def test_gradients_reach_both_query_heads_only():
    model = _tiny_densecl(separate_heads=True)
    assert len(model.query_encoder.global_head.heads) == 2 and len(model.query_encoder.dense_head.heads) == 2
    model(_batch())["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.key_encoder.parameters())
    for head in (model.query_encoder.global_head, model.query_encoder.dense_head):
        assert all(p.grad is not None for p in head.parameters())


def test_a_few_epochs_on_a_small_pool_reduce_the_loss():
    # As for MoCo: the queues span two of the four batches, so they never hold copies of the
    # positives being trained on.
    torch.manual_seed(0)
    model = _tiny_densecl(queue_size=2 * BATCH, momentum=0.9)
    x1, x2 = _views(0, (4, BATCH, 3, PX, PX))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    for step in range(12):
        loss = model((x1[step % 4], x2[step % 4]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step(step, 12)
        losses.append(loss.item())
    first_epoch, last_epoch = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last_epoch < first_epoch - 0.3, losses


def test_one_process_densecl_splits_the_key_batch_into_groups():
    torch.manual_seed(0)
    model = _tiny_densecl(split_bn_groups=2).train()
    views = _views(0, (16, 3, PX, PX))
    kinds = torch.tensor([[OBJ, DIL], [DIL, OBJ]]).repeat(8, 1)
    torch.manual_seed(5)
    out = model.encode_keys([views[1]], kinds[:, [1]])[0]
    torch.manual_seed(5)
    for members in torch.chunk(torch.randperm(16), 2):
        alone = model.key_encoder([views[1][members]], kinds[members][:, [1]])[0]
        for got, want in zip(out, alone, strict=True):  # global, dense and backbone-grid outputs
            torch.testing.assert_close(got[members], want)
    whole = model.key_encoder([views[1]], kinds[:, [1]])[0]
    assert not torch.allclose(out[0], whole[0], atol=1e-4)
