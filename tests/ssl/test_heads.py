"""objcrop.ssl.heads on its own: the heads' layers, routing by kind (both routings), validation, the encoder and
the batch reader. The method tests use these; here each behaviour is pinned where a wrong version would pass them."""

import pytest
import torch
import torch.nn as nn

from objcrop.crops.policies import KIND_CODES, VIEW_KINDS
from objcrop.ssl.heads import DEFAULT_KIND_TO_HEAD, ConvMLPHead, KindRoutedHead, MLPHead, ViewEncoder, views_and_kinds

torch.set_num_threads(1)
OBJECT, DILATED, SHIFTED, SCENE = (KIND_CODES[k] for k in ("object", "dilated", "shifted", "scene"))


def _layers(module: nn.Module) -> list[tuple[str, str, tuple]]:
    """(name, type, shape) of each child: weights' shapes, a BatchNorm's features, () otherwise."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            shape = (child.num_features,)
        elif hasattr(child, "weight"):
            shape = tuple(child.weight.shape) + (("bias",) if child.bias is not None else ())
        else:
            shape = ()
        out.append((name, type(child).__name__, shape))
    return out


def test_mlp_head_is_linear_relu_linear_with_biases():
    head = MLPHead(6, 5, 3)
    assert _layers(head) == [("fc1", "Linear", (5, 6, "bias")), ("relu", "ReLU", ()), ("fc2", "Linear", (3, 5, "bias"))]
    assert head(torch.randn(4, 6)).shape == (4, 3)


def test_mlp_head_with_batch_norm_normalises_the_hidden_layer():
    head = MLPHead(6, 5, 3, batch_norm=True)
    assert _layers(head) == [
        ("fc1", "Linear", (5, 6, "bias")),
        ("bn1", "BatchNorm1d", (5,)),
        ("relu", "ReLU", ()),
        ("fc2", "Linear", (3, 5, "bias")),
    ]
    head.train()
    hidden = head.bn1(head.fc1(torch.randn(16, 6)))
    torch.testing.assert_close(hidden.mean(0), torch.zeros(5), atol=1e-5, rtol=0)


def test_mlp_head_computes_fc2_of_relu_of_fc1():
    torch.manual_seed(0)
    head = MLPHead(6, 5, 3)
    x = torch.randn(4, 6)
    expected = head.fc2.weight @ torch.relu(head.fc1.weight @ x.T + head.fc1.bias[:, None]) + head.fc2.bias[:, None]
    torch.testing.assert_close(head(x), expected.T)


def test_conv_mlp_head_applies_the_same_mlp_at_every_location():
    torch.manual_seed(0)
    head = ConvMLPHead(6, 5, 3)
    assert _layers(head) == [
        ("conv1", "Conv2d", (5, 6, 1, 1, "bias")),
        ("relu", "ReLU", ()),
        ("conv2", "Conv2d", (3, 5, 1, 1, "bias")),
    ]
    x = torch.randn(2, 6, 4, 3)
    mlp = MLPHead(6, 5, 3)
    mlp.fc1.weight.data, mlp.fc1.bias.data = head.conv1.weight[:, :, 0, 0], head.conv1.bias
    mlp.fc2.weight.data, mlp.fc2.bias.data = head.conv2.weight[:, :, 0, 0], head.conv2.bias
    per_location = mlp(x.permute(0, 2, 3, 1).reshape(-1, 6)).reshape(2, 4, 3, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(head(x), per_location)


def test_default_routing_sends_objects_to_head_0_and_every_context_kind_to_head_1():
    assert DEFAULT_KIND_TO_HEAD == {"object": 0, "dilated": 1, "shifted": 1, "scene": 1}
    routed = KindRoutedHead(lambda: nn.Linear(3, 2))
    assert len(routed.heads) == 2
    assert routed.head_index(torch.tensor([OBJECT, DILATED, SHIFTED, SCENE])).tolist() == [0, 1, 1, 1]
    assert routed.route.dtype == torch.long and "route" not in routed.state_dict()  # not saved: rebuilt from the table


def test_a_custom_table_gives_its_heads_and_one_shared_head_when_not_separate():
    table = {"object": 0, "dilated": 1, "shifted": 2, "scene": 2}
    assert len(KindRoutedHead(lambda: nn.Linear(3, 2), kinds_to_head=table).heads) == 3
    shared = KindRoutedHead(lambda: nn.Linear(3, 2), separate=False, kinds_to_head=table)
    assert len(shared.heads) == 1
    assert shared.head_index(torch.arange(len(VIEW_KINDS))).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"object": 0, "dilated": 1, "shifted": 1}, "kinds_to_head must map exactly the kinds"),
        ({**DEFAULT_KIND_TO_HEAD, "other": 1}, "kinds_to_head must map exactly the kinds"),
        ({"object": 0, "dilated": 2, "shifted": 2, "scene": 2}, "head indices must be 0..n-1 without gaps"),
        ({"object": 1, "dilated": 1, "shifted": 1, "scene": 1}, "head indices must be 0..n-1 without gaps"),
    ],
)
def test_a_bad_table_is_refused(table, message):
    with pytest.raises(ValueError, match=message):
        KindRoutedHead(lambda: nn.Linear(3, 2), kinds_to_head=table)


def test_heads_start_identical_by_default_and_independent_when_asked():
    torch.manual_seed(0)
    same = KindRoutedHead(lambda: nn.Linear(3, 2))
    for a, b in zip(same.heads[0].parameters(), same.heads[1].parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # equal values, not shared tensors
    apart = KindRoutedHead(lambda: nn.Linear(3, 2), identical_init=False)
    assert not torch.equal(apart.heads[0].weight, apart.heads[1].weight)


def test_the_routing_is_evaluate_all_exactly_when_no_head_has_batch_norm():
    assert KindRoutedHead(lambda: MLPHead(3, 4, 2)).evaluate_all is True
    assert KindRoutedHead(lambda: MLPHead(3, 4, 2, batch_norm=True)).evaluate_all is False
    assert KindRoutedHead(lambda: MLPHead(3, 4, 2), evaluate_all=False).evaluate_all is False


def _two_heads(evaluate_all: bool) -> KindRoutedHead:
    torch.manual_seed(0)
    return KindRoutedHead(lambda: nn.Linear(3, 2), evaluate_all=evaluate_all, identical_init=False)


@pytest.mark.parametrize("evaluate_all", [True, False])
def test_each_sample_gets_its_own_heads_output_in_input_order(evaluate_all):
    routed = _two_heads(evaluate_all)
    x = torch.randn(5, 3)
    kinds = torch.tensor([SCENE, OBJECT, DILATED, OBJECT, SHIFTED])
    expected = torch.stack([routed.heads[0 if k == OBJECT else 1](x[i]) for i, k in enumerate(kinds.tolist())])
    torch.testing.assert_close(routed(x, kinds), expected)


@pytest.mark.parametrize("evaluate_all", [True, False])
def test_a_head_gets_gradient_only_from_its_samples(evaluate_all):
    routed = _two_heads(evaluate_all)
    routed(torch.randn(4, 3), torch.tensor([OBJECT, OBJECT, OBJECT, OBJECT])).sum().backward()
    assert routed.heads[0].weight.grad.abs().sum() > 0
    assert routed.heads[1].weight.grad is None or not routed.heads[1].weight.grad.any()


def test_a_split_batch_norm_head_sees_only_its_own_samples():
    torch.manual_seed(0)
    routed = KindRoutedHead(lambda: nn.BatchNorm1d(2, affine=False, momentum=1.0)).train()
    x = torch.tensor([[0.0, 0.0], [2.0, 4.0], [10.0, 10.0], [14.0, 18.0]])
    routed(x, torch.tensor([OBJECT, OBJECT, SCENE, SCENE]))
    torch.testing.assert_close(routed.heads[0].running_mean, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(routed.heads[1].running_mean, torch.tensor([12.0, 14.0]))


def test_split_routing_with_every_sample_of_one_kind_and_an_empty_batch():
    routed = _two_heads(False)
    x = torch.randn(3, 3)
    torch.testing.assert_close(routed(x, torch.full((3,), SCENE)), routed.heads[1](x))
    assert routed(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).shape == (0, 2)


def test_one_head_ignores_the_kinds_and_more_heads_check_their_shape():
    torch.manual_seed(0)
    shared = KindRoutedHead(lambda: nn.Linear(3, 2), separate=False)
    x = torch.randn(4, 3)
    torch.testing.assert_close(shared(x, torch.zeros(7, dtype=torch.long)), shared.heads[0](x))
    with pytest.raises(ValueError, match=r"kinds must have shape \[4\], got \[3\]"):
        _two_heads(True)(x, torch.zeros(3, dtype=torch.long))


def test_view_encoder_runs_the_backbone_per_view_and_routes_column_v_to_view_v():
    torch.manual_seed(0)
    calls = []

    class Backbone(nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return x.flatten(1)

    head = KindRoutedHead(lambda: nn.Linear(3, 2), identical_init=False)
    encoder = ViewEncoder(Backbone(), head)
    v1, v2 = torch.randn(2, 3, 1, 1), torch.randn(2, 3, 1, 1)
    kinds = torch.tensor([[OBJECT, DILATED], [SCENE, OBJECT]])
    q1, q2 = encoder([v1, v2], kinds)
    assert calls == [2, 2]  # one backbone call per view
    torch.testing.assert_close(q1, torch.stack([head.heads[0](v1[0, :, 0, 0]), head.heads[1](v1[1, :, 0, 0])]))
    torch.testing.assert_close(q2, torch.stack([head.heads[1](v2[0, :, 0, 0]), head.heads[0](v2[1, :, 0, 0])]))


def test_views_and_kinds_reads_both_batch_formats_and_defaults_to_scene():
    x1, x2 = torch.zeros(3, 3, 4, 4), torch.zeros(3, 3, 2, 2)
    kinds = torch.tensor([[0, 1], [1, 0], [0, 3]], dtype=torch.int32)
    views, read = views_and_kinds({"views": [x1, x2], "kinds": kinds})
    assert len(views) == 2 and views[1] is x2 and read.dtype == torch.long and torch.equal(read, kinds.long())
    views, read = views_and_kinds((x1, x2, kinds))
    assert views[0] is x1 and torch.equal(read, kinds.long())
    for batch in ((x1, x2), {"views": (x1, x2)}):
        _, read = views_and_kinds(batch)
        assert read.shape == (3, 2) and read.dtype == torch.long and (read == SCENE).all()


def test_views_and_kinds_refuses_mismatched_shapes():
    x1 = torch.zeros(3, 3, 4, 4)
    with pytest.raises(ValueError, match=r"views have different batch sizes: \[3, 2\]"):
        views_and_kinds((x1, torch.zeros(2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"kinds must have shape \[3, 2\], got \[3\]"):
        views_and_kinds((x1, x1, torch.zeros(3, dtype=torch.long)))
