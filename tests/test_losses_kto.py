"""kto_loss against hand-computed values of KTO's formula (arXiv 2402.01306 §4.1, TRL 1.16 KTOTrainer's)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain import losses as L

# four rows: log-ratios r = policy - ref = [1, -1, 0, -0.5]; rows 0 and 2 desirable, 1 and 3 undesirable
POLICY = [-1.0, -2.0, -3.0, -1.5]
REF = [-2.0, -1.0, -3.0, -1.0]
LABELS = [True, False, True, False]


def rows():
    return torch.tensor(POLICY, requires_grad=True), torch.tensor(REF), torch.tensor(LABELS)


def test_kto_hand_values_weights_and_gradient():
    policy, ref, labels = rows()
    kl = torch.tensor(0.4, requires_grad=True)
    losses, rewards, z0 = L.kto_loss(policy, ref, labels, kl, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    # z0 = max(0, 0.4) = 0.4
    # row 0 desirable:   1 - σ(0.5·(1 - 0.4))  = 1 - σ(0.3)  = 1 - 0.574443 = 0.425557
    # row 1 undesirable: 1.5·(1 - σ(0.5·(0.4 + 1)))  = 1.5·(1 - σ(0.7))  = 1.5·0.331812 = 0.497718
    # row 2 desirable:   1 - σ(0.5·(0 - 0.4))  = 1 - σ(-0.2) = 0.549834
    # row 3 undesirable: 1.5·(1 - σ(0.5·(0.4 + 0.5))) = 1.5·(1 - σ(0.45)) = 1.5·0.389361 = 0.584041
    assert_close(losses, torch.tensor([0.425557, 0.497718, 0.549834, 0.584041]), atol=1e-6, rtol=0)
    assert_close(rewards, torch.tensor([0.5, -0.5, 0.0, -0.25]))  # β·r
    assert not rewards.requires_grad and float(z0) == pytest.approx(0.4)
    # TRL's loss: the mean of cat(λ_D·chosen losses, λ_U·rejected losses) = (0.425557 + 0.549834 + 0.497718 + 0.584041) / 4
    assert float(losses.detach().mean()) == pytest.approx(2.057150 / 4, abs=1e-6)
    losses.sum().backward()
    # d/dr [1 - σ(β(r - z0))] = -β·σ(0.3)·(1 - σ(0.3)) = -0.5·0.244458 = -0.122229
    # d/dr [1.5·(1 - σ(β(z0 - r)))] = 1.5·β·σ(0.7)·(1 - σ(0.7)) = 0.75·0.221713 = 0.166285
    assert policy.grad[0] == pytest.approx(-0.122229, abs=1e-6) and policy.grad[1] == pytest.approx(0.166285, abs=1e-6)
    assert kl.grad is None  # z0 is detached: the reference point is not backpropagated


def test_kto_reference_point_is_clamped_at_zero():
    policy, ref, labels = rows()
    losses, _, z0 = L.kto_loss(policy, ref, labels, torch.tensor(-0.3), beta=0.5)
    # z0 = max(0, -0.3) = 0: row 0 is 1 - σ(0.5·1) = 1 - 0.622459 = 0.377541
    assert float(z0) == 0.0 and float(losses[0]) == pytest.approx(0.377541, abs=1e-6)


def test_apo_zero_unpaired_hand_values():
    policy, ref, labels = rows()
    losses, _, z0 = L.kto_loss(policy, ref, labels, None, beta=0.5, loss_type="apo_zero_unpaired", undesirable_weight=1.5)
    # desirable 1 - σ(βr), undesirable λ_U·σ(βr):
    # 1 - σ(0.5) = 0.377541; 1.5·σ(-0.5) = 1.5·0.377541 = 0.566311; 1 - σ(0) = 0.5; 1.5·σ(-0.25) = 1.5·0.437823 = 0.656735
    assert_close(losses, torch.tensor([0.377541, 0.566311, 0.5, 0.656735]), atol=1e-6, rtol=0)
    assert float(z0) == 0.0


def test_kto_unknown_loss_type():
    policy, ref, labels = rows()
    with pytest.raises(ValueError, match="kto, apo_zero_unpaired"):
        L.kto_loss(policy, ref, labels, None, loss_type="sigmoid")
