"""DenseCL mechanics: C5 backbone, dense correspondence, loss combination, queues, training."""

import pytest
import torch
import torchvision

from objcrop.crops.policies import KIND_CODES
from objcrop.ssl.backbones import build_backbone
from objcrop.ssl.densecl import DenseCL, DenseOutput
from objcrop.ssl.losses import dense_correspondence, densecl_dense_loss, info_nce
from tests.conftest import with_a_third_view

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


# ------------------------------------------------------------------ correspondence from the key's features

# A constructed example: 2 samples, 4 locations. Key location j holds the backbone feature of query
# location PERMS[i][j] (scaled: the match is by cosine), and the dense key grid at j is the one-hot of
# that query location. The right match pairs every query location with a key-grid vector equal to its own
# (cosine 1); matching query features with themselves pairs it with another one-hot (cosine 0).
PERMS = torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]])  # no fixed point
TEMPERATURE, QUEUED = 0.2, 3


def _constructed_example() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q_features = torch.randn(2, 5, 4, generator=g)
    scales = torch.tensor([2.0, 0.5, 3.0, 1.5])
    k_features = torch.stack([q_features[i][:, PERMS[i]] * scales for i in range(2)])
    eye = torch.eye(4)
    q_grid = eye.expand(2, 4, 4).clone()  # [N, C, S]: query location s is e_s
    k_grid = torch.stack([eye[:, PERMS[i]] for i in range(2)])  # key location j is e_perm[j]
    queue = torch.full((QUEUED, 4), 0.5)  # every q . negative = 0.5
    return {"q_features": q_features, "k_features": k_features, "q_grid": q_grid, "k_grid": k_grid, "queue": queue}


def _hand_dense_loss(positive: float) -> torch.Tensor:
    """-log softmax of the positive among it and the QUEUED negatives of cosine 0.5, the same at every location."""
    pos, neg = torch.tensor(positive / TEMPERATURE), torch.tensor(0.5 / TEMPERATURE)
    return -(pos - torch.logsumexp(torch.stack([pos, *[neg] * QUEUED]), dim=0))


def test_dense_loss_pairs_each_query_location_with_the_key_location_of_its_feature():
    ex = _constructed_example()
    match = dense_correspondence(ex["q_features"], ex["k_features"])
    assert match.tolist() == [torch.argsort(p).tolist() for p in PERMS]  # [[1, 3, 0, 2], [2, 0, 3, 1]]
    loss = densecl_dense_loss(ex["q_grid"], ex["k_grid"], ex["q_features"], ex["k_features"], ex["queue"], TEMPERATURE)
    torch.testing.assert_close(loss, _hand_dense_loss(1.0))
    # Matching by the query's own features (the identity) would pair orthogonal vectors: another loss.
    wrong = densecl_dense_loss(ex["q_grid"], ex["k_grid"], ex["q_features"], ex["q_features"], ex["queue"], TEMPERATURE)
    torch.testing.assert_close(wrong, _hand_dense_loss(0.0))
    assert _hand_dense_loss(0.0) - _hand_dense_loss(1.0) > 3.0


class _Fixed(torch.nn.Module):
    """An encoder stub: returns the given DenseOutput whatever the views."""

    def __init__(self, output: DenseOutput) -> None:
        super().__init__()
        self.output = output

    def forward(self, views, kinds):
        assert len(views) == 1
        return [self.output]


def test_forward_matches_by_the_key_encoders_backbone_features():
    """DenseCL.forward on stub encoders with the constructed outputs: its dense loss is the hand-computed one."""
    ex = _constructed_example()
    model = _tiny_densecl(dim=4, queue_size=QUEUED, temperature=TEMPERATURE, shuffle_bn=False).eval()
    model.dense_queue.keys.copy_(ex["queue"])
    as_map = {"features": (2, 5, 2, 2), "grid": (2, 4, 2, 2)}  # S = 4 locations as a 2x2 map, row-major
    embedding = torch.eye(4)[:2]
    model.query_encoder = _Fixed(
        DenseOutput(ex["q_features"].view(as_map["features"]), embedding, ex["q_grid"].view(as_map["grid"]))
    )
    model.key_encoder = _Fixed(
        DenseOutput(ex["k_features"].view(as_map["features"]), embedding, ex["k_grid"].view(as_map["grid"]))
    )
    out = model({"views": [torch.zeros(2, 3, PX, PX)] * 2, "kinds": torch.tensor([[OBJ, DIL], [DIL, OBJ]])})
    torch.testing.assert_close(out["loss_dense"], _hand_dense_loss(1.0))


class _PermutedLocations(torch.nn.Module):
    """A backbone whose C5 locations come out in another (fixed) order."""

    def __init__(self, inner: torch.nn.Module, permutation: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.permutation = inner, permutation

    def forward(self, x):
        features = self.inner(x)
        return features.flatten(2)[:, :, self.permutation].view_as(features)


def test_permuting_the_key_maps_locations_leaves_the_dense_loss_unchanged():
    """Real networks: with the key view equal to the query view, shuffling where the key backbone puts each
    location must not change the dense loss, since each query location is matched by feature to where its
    feature went. Matching by the query's own features would pair it with another location's key."""
    torch.manual_seed(0)
    model = _tiny_densecl().eval()  # BatchNorm on running statistics: query and key encoder compute the same
    x = torch.randn(4, 3, 32, 32)  # a 4x4 C5 map: 16 locations
    batch = {"views": [x, x], "kinds": torch.tensor([[OBJ, DIL], [DIL, OBJ]]).repeat(2, 1)}
    plain = model(batch)["loss_dense"]
    # The key grid at the matched location equals the query grid: every positive logit is 1.
    q = model.query_encoder([x], batch["kinds"][:, :1])[0]
    rows = torch.nn.functional.normalize(q.grid, dim=1).flatten(2).transpose(1, 2).reshape(-1, DIM)
    expected = info_nce(rows, rows, model.dense_queue.keys, model.temperature)
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-4)

    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    model.key_encoder.backbone = _PermutedLocations(model.key_encoder.backbone, permutation)
    permuted = model(batch)
    torch.testing.assert_close(permuted["loss_dense"], plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(permuted["loss_global"], model(batch)["loss_global"])  # pooling ignores the order
    assert permuted["loss_dense"] > 0  # a real loss, with a queue of random negatives


def test_defaults_are_densecls():
    """Built with no arguments (a ResNet-50, about 2 s): the settings of the DenseCL paper."""
    model = DenseCL()
    assert (model.arch, model.small_images, model.momentum, model.temperature) == ("resnet50", False, 0.999, 0.2)
    assert model.queue.keys.shape == model.dense_queue.keys.shape == (65536, 128)
    assert (model.dense_queue_mode, model.lambda_, model.shuffle_bn, model.symmetric) == ("pooled", 0.5, True, False)
    assert model.split_bn_groups == 8 and model.has_unused_parameters is False
    head = model.query_encoder.global_head.heads[0]
    assert (head.fc1.in_features, head.fc1.out_features) == (2048, 2048)  # hidden width: the feature dim
    assert len(model.query_encoder.dense_head.heads) == 1 and model.query_encoder.backbone.conv1.kernel_size == (7, 7)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_settings_are_checked_with_exact_messages_and_their_edges_accepted():
    for lambda_ in (0.0, 1.0):
        assert _tiny_densecl(lambda_=lambda_).lambda_ == lambda_
    assert _tiny_densecl(split_bn_groups=1).split_bn_groups == 1
    for settings, message in (
        ({"split_bn_groups": 0}, "split_bn_groups must be >= 1, got 0"),
        ({"dense_queue": "all"}, "dense_queue must be one of ('pooled', 'locations'), got 'all'"),
        ({"lambda_": 1.5}, "lambda_ must lie in [0, 1], got 1.5"),
    ):
        with pytest.raises(ValueError) as err:
            _tiny_densecl(**settings)
        assert str(err.value) == message


def test_constructor_options_reach_the_networks():
    plain = _tiny_densecl(hidden_dim=None)
    assert plain.query_encoder.global_head.heads[0].fc1.out_features == 512  # the feature dim
    assert len(plain.query_encoder.global_head.heads) == len(plain.query_encoder.dense_head.heads) == 1
    assert plain.has_unused_parameters is False and plain.split_bn_groups == 8
    assert plain.dense_queue.keys.shape == plain.queue.keys.shape == (64, DIM)  # dense size defaults to the queue's
    assert _tiny_densecl(dense_queue_size=32).dense_queue.keys.shape == (32, DIM)
    split = _tiny_densecl(separate_heads=True)
    assert len(split.key_encoder.global_head.heads) == len(split.key_encoder.dense_head.heads) == 2
    assert split.has_unused_parameters is True
    synced = _tiny_densecl(sync_bn=True)
    for encoder in (synced.query_encoder, synced.key_encoder):
        norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert synced.split_bn_groups == 1  # SyncBN statistics span the global batch: no emulation
    with pytest.raises(ValueError) as err:
        plain(with_a_third_view(_batch(0)))
    assert str(err.value) == "DenseCL takes two views, got 3"


def test_dense_keys_by_hand():
    grid = torch.randn(2, 3, 2, 2)
    pooled = _tiny_densecl(dense_queue="pooled")._dense_keys(grid)
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(grid.mean(dim=(2, 3)), dim=1))
    locations = _tiny_densecl(dense_queue="locations")._dense_keys(grid)
    rows = [grid[b, :, i, j] / grid[b, :, i, j].norm() for b in range(2) for i in range(2) for j in range(2)]
    torch.testing.assert_close(locations, torch.stack(rows))  # sample by sample, locations row-major


@pytest.mark.parametrize("symmetric", [False, True])
def test_the_global_loss_and_the_queue_by_hand(symmetric):
    """View 1 is the query and view 2 the key (and back, when symmetric); the queue gets the normalised keys."""
    torch.manual_seed(0)
    model = _tiny_densecl(symmetric=symmetric, shuffle_bn=False)
    batch = _batch(0)
    x, kinds = batch["views"], batch["kinds"]
    directions = [(0, 1), (1, 0)] if symmetric else [(0, 1)]
    negatives = model.queue.keys.clone()
    with torch.no_grad():
        model.eval()
        out = model(batch)
        losses, keys = [], []
        for qv, kv in directions:
            q = torch.nn.functional.normalize(model.query_encoder([x[qv]], kinds[:, [qv]])[0].embedding, dim=1)
            k = torch.nn.functional.normalize(model.key_encoder([x[kv]], kinds[:, [kv]])[0].embedding, dim=1)
            losses.append(info_nce(q, k, negatives, model.temperature))
            keys.append(k)
    torch.testing.assert_close(out["loss_global"], torch.stack(losses).mean())
    with torch.no_grad():
        model.train()
        model.key_encoder.eval()  # the keys of the hand computation above
        model(batch)
    torch.testing.assert_close(model.queue.keys[: len(directions) * BATCH], torch.cat(keys))
