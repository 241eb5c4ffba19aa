"""The shared classification loss reproduces both former helpers on a fixed example."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from objcrop.evaluate.losses import classification_loss

LOGITS = torch.tensor([[2.0, -1.0, 0.0], [-0.5, 3.0, 1.0]])
MULTI = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
SINGLE = torch.tensor([0, 1])


def _bce_by_hand() -> np.ndarray:
    z, y = LOGITS.double().numpy(), MULTI.double().numpy()
    return -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))  # [2, 3]


def test_sum_over_classes_equals_the_former_linear_probe_loss():
    expected = _bce_by_hand().sum() / 2  # summed over the 3 classes, averaged over the 2 images
    loss = classification_loss("multi", LOGITS, MULTI, class_reduction="sum")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # The former objcrop.evaluate.linear._loss, bit for bit.
    former = F.binary_cross_entropy_with_logits(LOGITS, MULTI, reduction="sum") / len(MULTI)
    assert torch.equal(loss, former)


def test_mean_over_classes_equals_the_former_supervised_loss_and_is_the_sum_over_the_class_count():
    loss = classification_loss("multi", LOGITS, MULTI, class_reduction="mean")
    assert loss.item() == pytest.approx(_bce_by_hand().mean(), rel=1e-6)
    assert torch.equal(loss, F.binary_cross_entropy_with_logits(LOGITS, MULTI))  # the former supervised._loss
    assert loss.item() * 3 == pytest.approx(classification_loss("multi", LOGITS, MULTI).item(), rel=1e-6)


def test_single_label_is_cross_entropy_whatever_the_class_reduction():
    z = LOGITS.double().numpy()
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    expected = -(log_softmax[0, 0] + log_softmax[1, 1]) / 2
    for reduction in ("sum", "mean"):
        assert classification_loss("single", LOGITS, SINGLE, reduction).item() == pytest.approx(expected, rel=1e-6)


def test_gradients_flow_and_bad_names_are_refused():
    logits = LOGITS.clone().requires_grad_()
    classification_loss("multi", logits, MULTI).backward()
    # d/dz of the summed BCE over the batch size: (sigmoid(z) - y) / 2.
    expected = (torch.sigmoid(LOGITS) - MULTI) / 2
    torch.testing.assert_close(logits.grad, expected)
    with pytest.raises(ValueError, match="unknown task"):
        classification_loss("top5", LOGITS, MULTI)
    with pytest.raises(ValueError, match="class_reduction"):
        classification_loss("multi", LOGITS, MULTI, class_reduction="max")
