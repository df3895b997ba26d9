"""The SALL loss and its switches: which head learns from which image."""

import numpy as np
import torch

from sall.losses import head_loss, sall_loss, soft_labels


def test_soft_labels_soften_with_temperature():
    z = torch.tensor([[4.0, 1.0, 0.0, -1.0]])
    p1, p8 = soft_labels(z, 1.0), soft_labels(z, 8.0)
    assert torch.allclose(p1.sum(1), torch.ones(1)) and torch.allclose(p8.sum(1), torch.ones(1))
    assert p8.max() < p1.max()
    assert p8.var() < p1.var()


def test_head_loss_matches_cross_entropy_for_hard_labels():
    z = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    onehot = torch.nn.functional.one_hot(y, 5).float()
    for T in (1.0, 3.0):
        ref = torch.nn.functional.cross_entropy(z / T, y)
        assert torch.allclose(head_loss(z, onehot, torch.ones(6, dtype=torch.bool), T), ref, atol=1e-6)


def test_masked_rows_put_no_gradient_into_a_head():
    """With sa_labels off, task-A images have no target for head B: head B gets no gradient."""
    torch.manual_seed(0)
    feats = torch.randn(4, 8)
    head_a, head_b = torch.nn.Linear(8, 5), torch.nn.Linear(8, 4)
    logits = {"dr": head_a(feats), "amd": head_b(feats)}
    targets = {"dr": torch.eye(5)[[0, 1, 2, 3]], "amd": torch.full((4, 4), 0.25)}
    masks = {"dr": torch.ones(4, dtype=torch.bool), "amd": torch.zeros(4, dtype=torch.bool)}
    total, parts = sall_loss(logits, targets, masks, 3.0)
    total.backward()
    assert head_b.weight.grad is None or torch.count_nonzero(head_b.weight.grad) == 0
    assert torch.count_nonzero(head_a.weight.grad) > 0
    assert parts["amd"] == 0.0


def test_soft_targets_do_train_the_other_head():
    torch.manual_seed(0)
    feats = torch.randn(4, 8)
    head_b = torch.nn.Linear(8, 4)
    soft = soft_labels(torch.randn(4, 4), 3.0)
    loss = head_loss(head_b(feats), soft, torch.ones(4, dtype=torch.bool), 3.0)
    loss.backward()
    assert torch.count_nonzero(head_b.weight.grad) > 0
    # the loss is minimised (up to the entropy of the target) when the student's softened output
    # equals the soft label
    z = torch.log(soft) * 3.0
    best = head_loss(z, soft, torch.ones(4, dtype=torch.bool), 3.0)
    entropy = -(soft * soft.log()).sum(1).mean()
    assert np.isclose(float(best), float(entropy), atol=1e-5)


def test_total_is_sum_over_heads():
    z = {"dr": torch.randn(3, 5), "amd": torch.randn(3, 4)}
    t = {"dr": torch.eye(5)[[0, 1, 2]], "amd": torch.eye(4)[[0, 1, 2]]}
    m = {"dr": torch.tensor([True, True, False]), "amd": torch.tensor([False, True, True])}
    total, parts = sall_loss(z, t, m, 2.0)
    assert np.isclose(float(total), parts["dr"] + parts["amd"], atol=1e-6)
    assert np.isclose(
        parts["dr"], float(head_loss(z["dr"][:2], t["dr"][:2], torch.ones(2, dtype=torch.bool), 2.0)), atol=1e-6
    )
