"""MoCo-v2 mechanics: queue, momentum encoder, kind-routed heads, the reference step, shuffle-BN under gloo."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from objcrop.crops.policies import KIND_CODES
from objcrop.ssl.densecl import DenseCL
from objcrop.ssl.distributed import batch_shuffle, batch_unshuffle, concat_all_gather, split_bn_forward
from objcrop.ssl.heads import KindRoutedHead, MLPHead, views_and_kinds
from objcrop.ssl.moco import KeyQueue, MoCoV2
from objcrop.ssl.reference import reference_moco_v2_step
from tests.conftest import with_a_third_view

torch.set_num_threads(1)

OBJ, DIL, SHI, SCENE = (KIND_CODES[k] for k in ("object", "dilated", "shifted", "scene"))
BATCH, DIM, QUEUE = 8, 16, 64


def _tiny_moco(**kwargs) -> MoCoV2:
    # The standard stem on 32 px images keeps a ResNet-18 step cheap; the small-image stem is
    # exercised by the DenseCL tests.
    settings = {"dim": DIM, "hidden_dim": 32, "queue_size": QUEUE}
    return MoCoV2("resnet18", **(settings | kwargs))


def _batch(seed: int = 0, size: int = BATCH) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(size, 3, 32, 32, generator=g) for _ in range(2)]
    # obj-scene pairs in random order, as the policy swaps them.
    kinds = torch.tensor([[OBJ, SCENE], [SCENE, OBJ]]).repeat(size // 2, 1)
    return {"views": views, "kinds": kinds}


def test_queue_pointer_wraps_and_holds_latest_keys():
    queue = KeyQueue(size=10, dim=4)
    batches = [torch.full((3, 4), float(i)) for i in range(1, 5)]  # 12 keys into 10 slots
    for keys in batches:
        queue.enqueue(keys)
    assert queue.ptr.item() == 2
    latest = torch.cat(batches)[-10:, 0]
    fifo = torch.roll(queue.keys, -int(queue.ptr), dims=0)[:, 0]  # oldest first
    torch.testing.assert_close(fifo, latest)
    queue.enqueue(torch.arange(25.0).unsqueeze(1).expand(25, 4))  # more keys than slots: keep the last 10
    assert sorted(queue.keys[:, 0].tolist()) == list(range(15, 25))


def test_momentum_update_follows_the_formula_and_key_encoder_gets_no_grad():
    model = _tiny_moco(momentum=0.9)
    with torch.no_grad():
        for p in model.query_encoder.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.key_encoder.parameters()]
    query = [p.clone() for p in model.query_encoder.parameters()]
    model.after_optimizer_step(step=0, total_steps=10)
    for k_new, k_old, q in zip(model.key_encoder.parameters(), before_k, query, strict=True):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q, rtol=0, atol=1e-6)

    model({"views": _batch()["views"]})["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.key_encoder.parameters())
    assert all(p.grad is not None for p in model.query_encoder.backbone.parameters())


def test_queue_is_filled_in_training_only_and_saved_for_resume():
    model = _tiny_moco(symmetric=True)
    model.eval()
    model(_batch(0))
    assert model.queue.ptr.item() == 0
    model.train()
    out = model(_batch(0))
    assert model.queue.ptr.item() == 2 * BATCH  # both key batches of the symmetric loss
    assert set(out) == {"loss", "acc1", "pos_sim", "neg_sim"}

    state = model.state_dict()
    assert {"queue.keys", "queue.ptr"} <= set(state)
    resumed = _tiny_moco(symmetric=True)
    resumed.load_state_dict(state)
    losses = []
    for net in (resumed, model):
        torch.manual_seed(7)  # the same single-process shuffle-BN permutation
        losses.append(net(_batch(1))["loss"])
    torch.testing.assert_close(*losses)
    torch.testing.assert_close(resumed.queue.keys, model.queue.keys)


@pytest.mark.parametrize("evaluate_all", [True, False])
def test_routed_head_sends_each_kind_to_its_head(evaluate_all):
    torch.manual_seed(0)
    head = KindRoutedHead(lambda: nn.Linear(4, 3), separate=True, evaluate_all=evaluate_all)
    assert len(head.heads) == 2
    x = torch.randn(6, 4)
    kinds = torch.tensor([OBJ, SCENE, DIL, OBJ, SHI, SCENE])
    out = head(x, kinds)
    expected = torch.stack([head.heads[0 if k == OBJ else 1](x[i]) for i, k in enumerate(kinds.tolist())])
    torch.testing.assert_close(out, expected)

    out[kinds == OBJ].sum().backward()
    torch.testing.assert_close(head.heads[0].weight.grad, x[kinds == OBJ].sum(0).expand(3, 4))
    assert not head.heads[1].weight.grad.any()  # head 1 ran, but on no sample of this loss


def test_routing_choice_and_validation():
    assert KindRoutedHead(lambda: nn.Linear(4, 3)).evaluate_all
    assert not KindRoutedHead(lambda: MLPHead(4, 8, 3, batch_norm=True)).evaluate_all
    shared = KindRoutedHead(lambda: nn.Linear(4, 3), separate=False)
    assert len(shared.heads) == 1
    x, kinds = torch.randn(5, 4), torch.tensor([OBJ, SCENE, DIL, OBJ, SHI])
    torch.testing.assert_close(shared(x, kinds), shared.heads[0](x))
    with pytest.raises(ValueError, match="kinds_to_head"):
        KindRoutedHead(lambda: nn.Linear(4, 3), kinds_to_head={"object": 0})
    with pytest.raises(ValueError, match="kinds must have shape"):
        KindRoutedHead(lambda: nn.Linear(4, 3))(x, kinds[:3])


def test_batch_routing_and_validation():
    batch = _batch()
    views, kinds = views_and_kinds((batch["views"][0], batch["views"][1]))
    assert kinds.shape == (BATCH, 2) and bool((kinds == SCENE).all())
    with pytest.raises(ValueError, match="kinds must have shape"):
        views_and_kinds({"views": batch["views"], "kinds": batch["kinds"][:, :1]})


def test_separate_heads_get_gradients_only_from_their_views_and_view_order_does_not_matter():
    torch.manual_seed(0)
    model = _tiny_moco(separate_heads=True, symmetric=True)
    batch = _batch()
    model.eval()  # keep the queue fixed between the two calls; BatchNorm uses running stats
    loss = model(batch)["loss"]
    swapped = {"views": batch["views"][::-1], "kinds": batch["kinds"].flip(1)}
    torch.testing.assert_close(model(swapped)["loss"], loss)

    model.train()
    all_scene = {"views": batch["views"], "kinds": torch.full((BATCH, 2), SCENE)}
    model(all_scene)["loss"].backward()
    object_head, context_head = model.query_encoder.head.heads
    assert all(not p.grad.any() for p in object_head.parameters())
    assert all(p.grad.abs().sum() > 0 for p in context_head.parameters())


def test_step_matches_reference_pseudocode():
    torch.manual_seed(0)
    # The pseudocode is one GPU's share of a shuffled batch: its keys are normalised over the whole
    # (local) batch, so the single-process split is off here (it has a test of its own below).
    model = _tiny_moco(momentum=0.99, split_bn_groups=1)
    reference = copy.deepcopy(model)
    f_q = nn.Sequential(reference.query_encoder.backbone, reference.query_encoder.head.heads[0])
    f_k = nn.Sequential(reference.key_encoder.backbone, reference.key_encoder.head.heads[0])
    ref_queue = reference.queue.keys.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(f_q.parameters(), lr=0.5, momentum=0.9)
    for step in range(3):
        batch = _batch(step)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step(step, 3)
        x_q, x_k = batch["views"]
        ref_loss, ref_queue = reference_moco_v2_step(f_q, f_k, ref_queue, x_q, x_k, ref_opt, 0.99, 0.2)
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
    fifo = torch.roll(model.queue.keys, -int(model.queue.ptr), dims=0)
    torch.testing.assert_close(fifo, ref_queue, rtol=1e-4, atol=1e-5)
    for p, ref_p in zip(model.key_encoder.parameters(), f_k.parameters(), strict=True):
        torch.testing.assert_close(p, ref_p, rtol=1e-4, atol=1e-5)


def _train_on_pool(model: MoCoV2, x1: torch.Tensor, x2: torch.Tensor, steps: int) -> list[float]:
    """SGD steps cycling through the fixed batches ``x1[i], x2[i]``; returns the losses."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = model((x1[step % len(x1)], x2[step % len(x2)]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step(step, steps)
        losses.append(loss.item())
    return losses


def test_a_few_epochs_on_a_small_pool_reduce_the_loss():
    # Four fixed batches of noisy view pairs; the queue spans two batches, so it never holds
    # keys of the batch being trained on (with a single fixed batch it would be full of copies
    # of the positives, and the loss could not fall).
    torch.manual_seed(0)
    model = _tiny_moco(queue_size=2 * BATCH, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(4, BATCH, 3, 32, 32, generator=g)
    x1, x2 = (pool + 0.3 * torch.randn(pool.shape, generator=g) for _ in range(2))
    scene = torch.full((BATCH, 1), SCENE)
    for i in (2, 3):  # start from a queue of real keys, as in the steady state
        model.dequeue_and_enqueue(model.encode_keys([x2[i]], scene)[0])
    losses = _train_on_pool(model, x1, x2, steps=12)
    first_epoch, last_epoch = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last_epoch < first_epoch - 0.3, losses


def test_queue_size_zero_uses_the_other_keys_of_the_batch_as_negatives():
    torch.manual_seed(0)
    model = _tiny_moco(queue_size=0, symmetric=True)
    assert model.queue is None and not any(k.startswith("queue") for k in model.state_dict())
    batch = _batch()
    model.eval()  # BatchNorm on running statistics: the manual computation below sees the same embeddings
    out = model(batch)
    views, kinds = views_and_kinds(batch)
    losses = []
    for qi, ki in ((0, 1), (1, 0)):
        q = nn.functional.normalize(model.query_encoder([views[qi]], kinds[:, [qi]])[0], dim=1)
        k = nn.functional.normalize(model.key_encoder([views[ki]], kinds[:, [ki]])[0], dim=1)
        losses.append(nn.functional.cross_entropy(q @ k.t() / model.temperature, torch.arange(BATCH)))
    torch.testing.assert_close(out["loss"], torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    assert 0.0 <= out["acc1"].item() <= 1.0 and out["pos_sim"].item() <= 1.0


def test_in_batch_negatives_learn_on_a_small_pool():
    torch.manual_seed(0)
    model = _tiny_moco(queue_size=0, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(2, BATCH, 3, 32, 32, generator=g)
    x1, x2 = (pool + 0.3 * torch.randn(pool.shape, generator=g) for _ in range(2))
    losses = _train_on_pool(model, x1, x2, steps=8)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses
    with pytest.raises(ValueError, match="queue_size"):
        _tiny_moco(queue_size=-1)


def test_sync_bn_option_converts_both_encoders():
    model = _tiny_moco(sync_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.key_encoder.modules())
    assert torch.isfinite(model(_batch())["loss"])  # one process: SyncBatchNorm acts as BatchNorm


def _distributed_worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Shuffle: a permutation of the global batch shared by all tensors; unshuffle undoes it.
        torch.manual_seed(123)
        ids = torch.arange(BATCH) + rank * BATCH
        (shuffled, scaled), idx_unshuffle = batch_shuffle([ids, 10 * ids])
        assert torch.equal(scaled, 10 * shuffled)
        everything = concat_all_gather(shuffled)
        assert sorted(everything.tolist()) == list(range(world * BATCH))
        assert not torch.equal(everything, torch.arange(world * BATCH))
        (restored,) = batch_unshuffle([shuffled], idx_unshuffle)
        assert torch.equal(restored, ids)

        # Same weights on every rank, different data.
        torch.manual_seed(0)
        model = _tiny_moco()
        batch = _batch(seed=rank)
        views, kinds = views_and_kinds(batch)
        model.key_encoder.eval()  # per-sample outputs: shuffling must not change any key
        shuffled_keys = model.encode_keys(views, kinds)
        plain = nn.functional.normalize(model.key_encoder(views, kinds)[0], dim=1)
        torch.testing.assert_close(shuffled_keys[0], plain)
        # Train mode: each key is normalised with the statistics of the sub-batch it was dealt to.
        model.key_encoder.train()
        for method, key_views, key_kinds in ((model, [views[1]], kinds[:, [1]]), *_densecl_keys_case(rank)):
            _check_keys_use_their_shuffled_sub_batch(method, key_views, key_kinds, rank, world)

        model.train()
        model(batch)
        assert model.queue.ptr.item() == world * BATCH
        queues = concat_all_gather(model.queue.keys.unsqueeze(0))
        assert torch.equal(queues[0], queues[1])

        model.dequeue_and_enqueue(torch.full((BATCH, DIM), float(rank)))
        newest = torch.roll(model.queue.keys, -int(model.queue.ptr), dims=0)[-world * BATCH :, 0]
        assert newest.tolist() == [float(r) for r in range(world) for _ in range(BATCH)]

        # In-batch negatives span the global batch: the ranks' mean loss is the one-process loss
        # over the concatenated batch (eval mode, so BatchNorm does not depend on the split).
        torch.manual_seed(0)
        in_batch = _tiny_moco(queue_size=0).eval()
        mine = in_batch(batch)["loss"].detach()
        mean = concat_all_gather(mine.reshape(1)).mean()
        whole = [_batch(seed=r) for r in range(world)]
        joined = {"views": [torch.cat([b["views"][i] for b in whole]) for i in range(2)]}
        joined["kinds"] = torch.cat([b["kinds"] for b in whole])
        q = nn.functional.normalize(in_batch.query_encoder([joined["views"][0]], joined["kinds"][:, [0]])[0], dim=1)
        k = nn.functional.normalize(in_batch.key_encoder([joined["views"][1]], joined["kinds"][:, [1]])[0], dim=1)
        expected = nn.functional.cross_entropy(q @ k.t() / in_batch.temperature, torch.arange(world * BATCH))
        torch.testing.assert_close(mean, expected.detach(), rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


def _densecl_keys_case(rank: int) -> list:
    """A tiny DenseCL (same weights on every rank) in train mode, and this rank's key views and kinds."""
    torch.manual_seed(0)
    model = DenseCL("resnet18", dim=DIM, hidden_dim=32, queue_size=QUEUE, small_images=True).train()
    g = torch.Generator().manual_seed(100 + rank)
    return [(model, [torch.randn(BATCH, 3, 16, 16, generator=g)], torch.full((BATCH, 1), SCENE))]


def _first_tensor(output) -> torch.Tensor:
    """MoCo's key embedding, or the DenseCL output's first field (its backbone map)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _check_keys_use_their_shuffled_sub_batch(model, views: list, kinds: torch.Tensor, rank: int, world: int) -> None:
    """``model.encode_keys`` on this rank equals the key encoder run on the sub-batch of the global batch
    that the shuffle dealt each sample to (rank 0's permutation), and differs from this rank's own batch."""
    torch.manual_seed(11)  # the same draw on every rank; rank 0's is broadcast
    keys = model.encode_keys(views, kinds)
    torch.manual_seed(11)
    permutation = torch.randperm(world * BATCH)
    all_views, all_kinds = [concat_all_gather(v) for v in views], concat_all_gather(kinds)
    expected = [None] * len(views)
    for r in range(world):
        members = permutation.view(world, -1)[r]
        outputs = model.key_encoder([v[members] for v in all_views], all_kinds[members])
        for i, out in enumerate(outputs):
            full = (
                expected[i] if expected[i] is not None else torch.zeros((world * BATCH, *_first_tensor(out).shape[1:]))
            )
            full[members] = _first_tensor(out)
            expected[i] = full
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    own = model.key_encoder(views, kinds)
    for got, want, alone in zip(keys, expected, own, strict=True):
        got, want, alone = _first_tensor(got), want[mine], _first_tensor(alone)
        if isinstance(model, MoCoV2):
            want, alone = nn.functional.normalize(want, dim=1), nn.functional.normalize(alone, dim=1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, alone, atol=1e-3)  # not the statistics of this rank's own batch


def test_shuffle_bn_and_queue_across_two_gloo_processes(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


# ------------------------------------------------------------------ single-process shuffle-BN


def test_split_bn_forward_normalises_each_key_with_its_own_groups_statistics():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()

    def encode(views, kinds):
        return [encoder(v).mean(dim=(2, 3)) for v in views]

    x = torch.randn(12, 3, 5, 5)
    kinds = torch.zeros(12, 1, dtype=torch.long)
    torch.manual_seed(1)
    keys = split_bn_forward(encode, [x], kinds, groups=3, min_group_size=2)[0]
    torch.manual_seed(1)
    groups = torch.chunk(torch.randperm(12), 3)  # the permutation split_bn_forward drew
    for members in groups:
        alone = encode([x[members]], kinds[members])[0]  # a batch of just this group
        torch.testing.assert_close(keys[members], alone)
    # A key changes when a member of its own group changes, and not when another group's does.
    first, other = groups[0], groups[1]
    changed = x.clone()
    changed[other[0]] += 5.0
    torch.manual_seed(1)
    keys_other = split_bn_forward(encode, [changed], kinds, groups=3, min_group_size=2)[0]
    torch.testing.assert_close(keys_other[first], keys[first])
    changed = x.clone()
    changed[first[1]] += 5.0
    torch.manual_seed(1)
    keys_same = split_bn_forward(encode, [changed], kinds, groups=3, min_group_size=2)[0]
    # Groups never fall below min_group_size: 12 samples in groups of at least 8 are encoded whole.
    torch.testing.assert_close(split_bn_forward(encode, [x], kinds, groups=3)[0], encode([x], kinds)[0])
    assert not torch.allclose(keys_same[first[0]], keys[first[0]])
    # And the whole-batch statistics of a plain forward differ from every group's.
    assert not torch.allclose(encode([x], kinds)[0], keys)


def test_one_process_moco_with_a_queue_splits_the_key_batch_in_train_mode():
    torch.manual_seed(0)
    model = _tiny_moco(split_bn_groups=2).train()
    batch = _batch(0, size=2 * BATCH)  # two groups of the minimum size 8
    views, kinds = views_and_kinds(batch)
    torch.manual_seed(3)
    keys = model.encode_keys([views[1]], kinds[:, [1]])[0]
    whole = torch.nn.functional.normalize(model.key_encoder([views[1]], kinds[:, [1]])[0], dim=1)
    assert not torch.allclose(keys, whole, atol=1e-4)  # the leak-free keys differ from whole-batch BN
    torch.manual_seed(3)
    halves = torch.chunk(torch.randperm(2 * BATCH), 2)
    for members in halves:
        alone = model.key_encoder([views[1][members]], kinds[members][:, [1]])[0]
        torch.testing.assert_close(keys[members], torch.nn.functional.normalize(alone, dim=1))
    # No emulation without a queue (in-batch negatives share the statistics), or with groups=1.
    for settings in ({"queue_size": 0, "split_bn_groups": 2}, {"split_bn_groups": 1}):
        plain = _tiny_moco(**settings).train()
        plain.load_state_dict(model.state_dict(), strict=False)
        out = plain.encode_keys([views[1]], kinds[:, [1]])[0]
        ref = torch.nn.functional.normalize(plain.key_encoder([views[1]], kinds[:, [1]])[0], dim=1)
        torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="split_bn_groups"):
        _tiny_moco(split_bn_groups=0)


# ------------------------------------------------------------------ separate heads


def test_separate_heads_start_from_identical_weights_unless_asked_otherwise():
    torch.manual_seed(0)
    same = KindRoutedHead(lambda: MLPHead(8, 16, 4), separate=True)
    for a, b in zip(same.heads[0].parameters(), same.heads[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    apart = KindRoutedHead(lambda: MLPHead(8, 16, 4), separate=True, identical_init=False)
    assert not torch.equal(apart.heads[0].fc1.weight, apart.heads[1].fc1.weight)


def _hand_in_batch_loss(model: MoCoV2, batch: dict, mask: bool) -> torch.Tensor:
    views, kinds = views_and_kinds(batch)
    q = nn.functional.normalize(model.query_encoder([views[0]], kinds[:, [0]])[0], dim=1)
    k = nn.functional.normalize(model.key_encoder([views[1]], kinds[:, [1]])[0], dim=1)
    heads = model.key_encoder.head.head_index(kinds[:, 1])
    losses = []
    for i in range(q.shape[0]):
        keep = heads == heads[i] if mask else torch.ones_like(heads, dtype=torch.bool)
        logits = (q[i] @ k[keep].t()) / model.temperature
        target = int(keep[: i + 1].sum()) - 1  # where key i lands among the kept keys
        losses.append(-torch.log_softmax(logits, dim=0)[target])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("negatives", ["positive-head", "all"])
def test_in_batch_negatives_with_separate_heads_come_from_the_positives_head(negatives):
    torch.manual_seed(0)
    model = _tiny_moco(queue_size=0, separate_heads=True, negatives=negatives)
    model.train()
    batch = _batch(0)
    with torch.no_grad():
        loss = model(batch)["loss"]
        expected = _hand_in_batch_loss(model, batch, mask=negatives == "positive-head")
        other = _hand_in_batch_loss(model, batch, mask=negatives != "positive-head")
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(loss, other, atol=1e-3)


def test_the_queue_remembers_each_keys_head_and_masks_the_other_heads_keys():
    torch.manual_seed(0)
    model = _tiny_moco(separate_heads=True).train()
    assert model.queue.heads is not None and (model.queue.heads == -1).all()
    batch = _batch(0)
    model(batch)
    views, kinds = views_and_kinds(batch)
    filled = model.queue.heads[:BATCH]
    torch.testing.assert_close(filled, model.key_encoder.head.head_index(kinds[:, 1]))
    assert set(filled.tolist()) == {0, 1}
    # A query whose positive came from head 0 sees no queued key of head 1: its logits there are masked.
    with torch.no_grad():
        out = model(_batch(1))
    assert torch.isfinite(out["loss"]) and -1 <= out["neg_sim"] <= 1
    assert "queue.heads" in model.state_dict()
    assert "queue.heads" not in _tiny_moco().state_dict()  # a shared head keeps the old checkpoint layout
    with pytest.raises(ValueError, match="negatives"):
        _tiny_moco(negatives="some")


# ------------------------------------------------------------------ defaults, options, statistics


def test_defaults_are_moco_v2s():
    """Built with no arguments (a ResNet-50, about 2 s): the settings of the MoCo-v2 paper."""
    model = MoCoV2()
    assert (model.arch, model.small_images, model.momentum, model.temperature) == ("resnet50", False, 0.999, 0.2)
    assert model.queue.keys.shape == (65536, 128) and model.queue.heads is None
    assert model.query_encoder.head.heads[0].fc1.out_features == 2048  # hidden width: the feature dim
    assert len(model.query_encoder.head.heads) == 1 and model.query_encoder.backbone.conv1.kernel_size == (7, 7)
    assert (model.shuffle_bn, model.symmetric, model.split_bn_groups, model.mask_by_head) == (True, False, 8, False)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert KeyQueue(4, 2).heads is None  # track_heads defaults to off


def test_the_queue_starts_with_unit_random_keys_and_checks_its_size():
    torch.manual_seed(0)
    queue = KeyQueue(5, 3)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(5))
    assert queue.heads is None and queue.keys.unique(dim=0).shape[0] == 5
    assert KeyQueue(1, 3).keys.shape == (1, 3)  # one key is a queue
    tracked = KeyQueue(4, 2, track_heads=True)
    assert tracked.heads.dtype == torch.long and tracked.heads.tolist() == [-1] * 4
    with pytest.raises(ValueError) as err:
        KeyQueue(0, 3)
    assert str(err.value) == "queue size must be positive, got 0"


def test_constructor_options_reach_the_networks():
    small = _tiny_moco(small_images=True, hidden_dim=None, queue_size=1)
    conv1 = small.query_encoder.backbone.conv1
    assert (conv1.kernel_size, conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(small.key_encoder.backbone.maxpool, nn.Identity)
    assert small.query_encoder.head.heads[0].fc1.out_features == 512  # hidden_dim None: the feature dim
    assert small.queue is not None and small.queue.keys.shape == (1, DIM)
    plain = _tiny_moco()
    assert plain.query_encoder.backbone.conv1.kernel_size == (7, 7)
    assert plain.query_encoder.head.heads[0].fc1.out_features == 32
    assert plain.has_unused_parameters is False and _tiny_moco(separate_heads=True).has_unused_parameters is True
    with pytest.raises(ValueError) as err:
        _tiny_moco(negatives="some")
    assert str(err.value) == "negatives must be one of positive-head, all, got 'some'"
    with pytest.raises(ValueError) as err:
        plain(with_a_third_view(_batch(0)))
    assert str(err.value) == "MoCo-v2 takes two views, got 3"


def _encoded(model: MoCoV2, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    views, kinds = views_and_kinds(batch)
    q = nn.functional.normalize(model.query_encoder([views[0]], kinds[:, [0]])[0], dim=1)
    k = nn.functional.normalize(model.key_encoder([views[1]], kinds[:, [1]])[0], dim=1)
    return q, k, model.key_encoder.head.head_index(kinds[:, 1])


@pytest.mark.parametrize("separate_heads", [False, True])
def test_in_batch_statistics_by_hand(separate_heads):
    torch.manual_seed(0)
    model = _tiny_moco(queue_size=0, separate_heads=separate_heads).eval()
    batch = _batch(0)
    with torch.no_grad():
        out = model(batch)
        q, k, heads = _encoded(model, batch)
    logits = q @ k.t()
    valid = heads[None, :] == heads[:, None] if separate_heads else torch.ones_like(logits, dtype=torch.bool)
    off_diagonal = valid & ~torch.eye(BATCH, dtype=torch.bool)
    masked = logits.masked_fill(~valid, -1e4)
    assert set(out) == {"loss", "acc1", "pos_sim", "neg_sim"}
    torch.testing.assert_close(out["pos_sim"], logits.diagonal().mean())
    torch.testing.assert_close(out["neg_sim"], logits[off_diagonal].mean())
    torch.testing.assert_close(out["acc1"], (masked.argmax(dim=1) == torch.arange(BATCH)).float().mean())


def test_queue_statistics_by_hand():
    torch.manual_seed(0)
    model = _tiny_moco().eval()
    batch = _batch(0)
    with torch.no_grad():
        out = model(batch)
        q, k, _ = _encoded(model, batch)
    positives, negatives = (q * k).sum(dim=1), q @ model.queue.keys.t()
    assert set(out) == {"loss", "acc1", "pos_sim", "neg_sim"}
    torch.testing.assert_close(out["pos_sim"], positives.mean())
    torch.testing.assert_close(out["neg_sim"], negatives.mean())
    torch.testing.assert_close(out["acc1"], (positives > negatives.max(dim=1).values).float().mean())


def test_queued_keys_of_the_other_head_are_masked_and_the_initial_ones_are_not():
    torch.manual_seed(0)
    model = _tiny_moco(separate_heads=True).eval()
    model.queue.heads.copy_(torch.tensor([-1, 0, 1]).repeat(QUEUE // 3 + 1)[:QUEUE])
    batch = _batch(0)
    with torch.no_grad():
        out = model(batch)
        q, k, heads = _encoded(model, batch)
    queued = model.queue.heads
    losses, negatives = [], []
    for i in range(BATCH):
        keep = (queued == heads[i]) | (queued == -1)
        logits = torch.cat([(q[i] * k[i]).sum().reshape(1), q[i] @ model.queue.keys[keep].t()])
        losses.append(-torch.log_softmax(logits / model.temperature, dim=0)[0])
        negatives.append(logits[1:])
    assert set(heads.tolist()) == {0, 1}
    torch.testing.assert_close(out["loss"], torch.stack(losses).mean())
    torch.testing.assert_close(out["neg_sim"], torch.cat(negatives).mean())


@pytest.mark.parametrize("rank", [0, 1])
def test_in_batch_positives_sit_at_this_ranks_place_in_the_gathered_keys(monkeypatch, rank):
    """One process playing rank ``rank`` of 2: the gathered keys are [rank 0's, rank 1's], so query i's positive
    is key ``rank * B + i``, and the other rank's keys are negatives."""
    import objcrop.ssl.moco as moco

    torch.manual_seed(0)
    model = _tiny_moco(queue_size=0)
    q, k = (nn.functional.normalize(torch.randn(BATCH, DIM), dim=1) for _ in range(2))
    other = nn.functional.normalize(torch.randn(BATCH, DIM), dim=1)
    heads = torch.zeros(BATCH, dtype=torch.long)
    monkeypatch.setattr(moco, "world_size", lambda: 2)
    monkeypatch.setattr(moco.dist, "get_rank", lambda: rank)

    def gather(t: torch.Tensor) -> torch.Tensor:  # keys: the other rank's are `other`; heads: all 0
        theirs = other if t.dtype.is_floating_point else t
        return torch.cat([t, theirs] if rank == 0 else [theirs, t])

    monkeypatch.setattr(moco, "concat_all_gather", gather)
    out = model._in_batch_loss([q], [k], [heads])
    gathered = torch.cat([k, other] if rank == 0 else [other, k])
    logits = q @ gathered.t()
    labels = torch.arange(BATCH) + rank * BATCH
    torch.testing.assert_close(out["loss"], nn.functional.cross_entropy(logits / model.temperature, labels))
    torch.testing.assert_close(out["pos_sim"], logits[torch.arange(BATCH), labels].mean())
    negatives = torch.ones_like(logits, dtype=torch.bool)
    negatives[torch.arange(BATCH), labels] = False
    torch.testing.assert_close(out["neg_sim"], logits[negatives].mean())
    torch.testing.assert_close(out["acc1"], (logits.argmax(dim=1) == labels).float().mean())
