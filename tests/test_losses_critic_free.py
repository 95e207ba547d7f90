"""Critic-free advantage estimators, policy losses and KL estimators (posttrain.losses), by hand and against TRL.

Each function is checked on tiny tensors against values worked out in the
comments, its gradient by torch.autograd, and, where TRL 1.16 has the method,
against TRL's own expression (GRPOTrainer._compute_loss, RLOOTrainer's
advantages and loss), written out inline here from its source.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import (
    aggregate_loss,
    gspo_log_ratio,
    kl_penalty,
    loss_aggregation,
    masked_sum,
    normalize_advantages,
    policy_token_losses,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    rloo_sequence_loss,
    whiten,
)

close = dict(rtol=1e-5, atol=1e-6)


def leaf(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, x)[0]


# ------------------------------------------------------------------ advantage estimators


def test_rloo_advantages_by_hand_and_as_trl():
    # group (1, 2, 6): leave-one-out means (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> A = (-3, -1.5, 4.5);
    # group (0, 0, 3): means 1.5, 1.5, 0 -> A = (-1.5, -1.5, 3)
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    a = rloo_advantages(r, 3)
    torch.testing.assert_close(a, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    # TRL RLOOTrainer: baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1); advantages = r - baselines
    grouped = r.view(-1, 3)
    trl = r - ((grouped.sum(1, keepdim=True) - grouped) / (3 - 1)).view(-1)
    torch.testing.assert_close(a, trl)
    # = G/(G-1)·(r - group mean)
    torch.testing.assert_close(a, 1.5 * (grouped - grouped.mean(1, keepdim=True)).view(-1))
    with pytest.raises(ValueError, match="leave-one-out"):
        rloo_advantages(r, 1)


def test_normalize_advantages_is_trl_rloo_normalize():
    a = torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    # TRL: (advantages - nanmean) / (nanstd + 1e-4), nanstd Bessel-corrected
    mean = a.mean()
    std = math.sqrt(((a - mean) ** 2).sum().item() / (a.numel() - 1))
    torch.testing.assert_close(normalize_advantages(a), (a - mean) / (std + 1e-4))


def test_reinforce_pp_whitens_returns_over_all_tokens():
    r = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # no KL: every token's return is its sequence's score: 1, 1 | 3, 3, 3; mean 11/5 = 2.2,
    # Bessel variance (2·1.44 + 3·0.64) / 4 = 1.2
    a = reinforce_pp_advantages(r, mask)
    expected = (torch.tensor([[1.0, 1.0, 2.2], [3.0, 3.0, 3.0]]) - 2.2) / math.sqrt(1.2 + 1e-8) * mask
    torch.testing.assert_close(a, expected)
    # with KL 0.5·Σ_{s≥t} KL_s: row 0 -> 1 - 0.5·0.3 = 0.85, 1 - 0.5·0.2 = 0.9 (the masked 9 is ignored);
    # row 1 -> 3 - 0.5·0.8 = 2.6, 3 - 0.5·0.5 = 2.75, 3 - 0.5·0.5 = 2.75
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.0, 0.5]])
    returns = torch.tensor([[0.85, 0.9, 0.0], [2.6, 2.75, 2.75]])
    torch.testing.assert_close(reinforce_pp_advantages(r, mask, kl=kl, kl_coef=0.5), whiten(returns, mask))
    values = returns[mask.bool()]
    got = reinforce_pp_advantages(r, mask, kl=kl, kl_coef=0.5)[mask.bool()]
    torch.testing.assert_close(got, (values - values.mean()) / values.std(), **close)


def test_reinforce_pp_baseline_subtracts_the_group_mean_first():
    # groups (1, 3) and (0, 4): centred -1, 1 | -2, 2, then whitened over the 4·2 tokens
    r = torch.tensor([1.0, 3.0, 0.0, 4.0])
    mask = torch.ones(4, 2)
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0]).unsqueeze(1).expand(4, 2)
    torch.testing.assert_close(reinforce_pp_advantages(r, mask, group_size=2), whiten(centred, mask))
    # a shift of a whole group changes nothing with the baseline (it does without)
    shifted = r + torch.tensor([5.0, 5.0, 0.0, 0.0])
    torch.testing.assert_close(reinforce_pp_advantages(shifted, mask, group_size=2),
                               reinforce_pp_advantages(r, mask, group_size=2))
    assert not torch.allclose(reinforce_pp_advantages(shifted, mask), reinforce_pp_advantages(r, mask))


def test_remax_subtracts_the_greedy_reward_of_each_prompt():
    # prompt 0: greedy 0.5, samples 1, 0 -> 0.5, -0.5; prompt 1: greedy 1, samples 1, 1 -> 0, 0
    a = remax_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.5, 1.0]), 2)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    with pytest.raises(ValueError):
        remax_advantages(torch.ones(4), torch.ones(3), 2)


# ------------------------------------------------------------------ KL estimators


def test_k3_plus_has_k3_value_and_k2_gradient():
    # π = 0.5, π_ref = 0.25: log r = log 0.5; k3 = 0.5 - log 0.5 - 1 = 0.19315; dk2/dlp = lp - rlp = log 2
    lp = leaf([[math.log(0.5)]])
    rlp = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    k3p = kl_penalty(lp, rlp, "k3_plus")
    assert k3p.item() == pytest.approx(0.5 - math.log(0.5) - 1)
    torch.testing.assert_close(k3p, kl_penalty(lp, rlp, "k3"))
    assert grad_of(k3p.sum(), lp).item() == pytest.approx(math.log(2))
    assert grad_of(kl_penalty(lp, rlp, "k2").sum(), lp).item() == pytest.approx(math.log(2))
    # k3's own gradient is 1 - π_ref/π = 0.5
    assert grad_of(kl_penalty(lp, rlp, "k3").sum(), lp).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k3_plus"):
        kl_penalty(lp, rlp, "k4")


# ------------------------------------------------------------------ policy losses against TRL's GRPOTrainer


def trl_grpo_per_token_loss(lp, old, adv, mask, level="token", loss_type="grpo", eps=0.2, eps_high=None, delta=None,
                            tau_pos=1.0, tau_neg=1.05):
    """TRL 1.16 GRPOTrainer._compute_loss, from log_ratio to per_token_loss (beta 0), written out."""
    eps_high = eps if eps_high is None else eps_high
    log_ratio = lp - old
    if level == "token":
        log_iw = log_ratio
    else:
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_iw)
    if loss_type == "cispo":
        return -torch.clamp(coef_1, max=eps_high).detach() * adv * lp
    if loss_type == "sapo":
        t = torch.where(adv > 0, tau_pos, tau_neg)
        return -torch.sigmoid(t * (coef_1 - 1)) * 4 / t * adv
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * adv, coef_2 * adv)


def trl_aggregate(per_token, mask, loss_type, max_completion_length=3):
    """TRL's reduction per loss_type (one process, no accumulation): grpo/sapo, bnpo, dr_grpo, dapo/cispo."""
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    return (per_token * mask).sum() / mask.sum()


def ours(lp, old, adv, mask, loss_type, level="token", **kw):
    policy_loss, mode = loss_aggregation(loss_type)
    per_token, _ = policy_token_losses(lp, old, adv, mask, policy_loss, level, **kw)
    return aggregate_loss(per_token, mask, mode, max_completion_length=3)


OLD = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0], [-0.7, -0.4, -1.5]]
# log-ratios (row 0) 0.1, 0.3, pad | (row 1) 0.5, -0.4, 0.2 | (row 2) -1.0, 0.05, 0.6 (pad)
NEW = [[-0.9, -1.7, -3.0], [0.2, -1.6, -1.8], [-1.7, -0.35, -0.9]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("advantage", [1.5, -0.8])
def test_clipped_loss_equals_trl_value_and_gradient(loss_type, level, advantage):
    old, mask = torch.tensor(OLD, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)
    adv = torch.tensor([[advantage], [-advantage], [advantage]], dtype=torch.float64)
    lp_a, lp_b = leaf(NEW), leaf(NEW)
    mine = ours(lp_a, old, adv, mask, loss_type, level)
    theirs = trl_aggregate(trl_grpo_per_token_loss(lp_b, old, adv, mask, level), mask, loss_type)
    torch.testing.assert_close(mine, theirs, **close)
    torch.testing.assert_close(grad_of(mine, lp_a), grad_of(theirs, lp_b), **close)


def test_gspo_ratio_by_hand():
    # row 0: log-ratios 0.1, 0.3 -> mean 0.2: both tokens carry s = e^0.2 in value; d log s_t / d lp_t = 1
    old, mask = torch.tensor(OLD[:1], dtype=torch.float64), torch.tensor(MASK[:1], dtype=torch.float64)
    lp = leaf(NEW[:1])
    log_s = gspo_log_ratio(lp, old, mask)
    torch.testing.assert_close(log_s[0, :2], torch.tensor([0.2, 0.2], dtype=torch.float64), **close)
    assert grad_of(log_s[0, 1], lp).tolist() == [[0.0, 1.0, 0.0]]
    # A = 1, clip 0.2: s = 1.2214 > 1.2 is clipped for a positive advantage: loss -1.2, no gradient
    per_token, stats = policy_token_losses(lp, old, torch.ones(1, 1, dtype=torch.float64), mask, "clip", "sequence")
    torch.testing.assert_close(per_token[0, :2], torch.tensor([-1.2, -1.2], dtype=torch.float64))
    assert stats["clip_ratio/high"][0, :2].tolist() == [1.0, 1.0]
    assert torch.count_nonzero(grad_of(masked_sum(per_token, mask), lp)) == 0
    # with per-token log-ratios instead, token 0 (e^0.1 = 1.105) is inside the clip and keeps its gradient e^0.1
    per_token, _ = policy_token_losses(lp, old, torch.ones(1, 1, dtype=torch.float64), mask, "clip", "token")
    assert grad_of(masked_sum(per_token, mask), lp)[0, 0].item() == pytest.approx(-math.exp(0.1))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_equals_trl_and_its_hand_values(level):
    old, mask = torch.tensor(OLD, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)
    adv = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    lp_a, lp_b = leaf(NEW), leaf(NEW)
    mine = ours(lp_a, old, adv, mask, "cispo", level, epsilon_high=1.5)
    theirs = trl_aggregate(trl_grpo_per_token_loss(lp_b, old, adv, mask, level, "cispo", eps_high=1.5), mask, "cispo")
    torch.testing.assert_close(mine, theirs, **close)
    torch.testing.assert_close(grad_of(mine, lp_a), grad_of(theirs, lp_b), **close)


def test_cispo_weight_is_clipped_and_detached():
    # ratio e^0.5 = 1.649 > ε_max 1.5 -> weight 1.5: loss -1.5·A·lp, d/dlp = -1.5·A (the token keeps its gradient)
    lp, old = leaf([[-1.0]]), torch.tensor([[-1.5]], dtype=torch.float64)
    a = torch.tensor([[2.0]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.float64)
    per_token, stats = policy_token_losses(lp, old, a, mask, "cispo", epsilon_high=1.5)
    assert per_token.item() == pytest.approx(-1.5 * 2.0 * -1.0)
    assert grad_of(per_token.sum(), lp).item() == pytest.approx(-3.0)
    assert stats["clip_ratio/high"].item() == 1.0
    # two-sided: ratio e^-1 = 0.368 < 1 - 0.2 -> weight 0.8 (upper-only keeps 0.368), A = -1 -> d/dlp = 0.8
    lp, old = leaf([[-2.0]]), torch.tensor([[-1.0]], dtype=torch.float64)
    a = -torch.ones(1, 1, dtype=torch.float64)
    upper_only, _ = policy_token_losses(lp, old, a, mask, "cispo", epsilon_high=1.5)
    assert grad_of(upper_only.sum(), lp).item() == pytest.approx(math.exp(-1))
    two_sided, stats = policy_token_losses(lp, old, a, mask, "cispo", epsilon_high=1.5, cispo_two_sided=True)
    assert grad_of(two_sided.sum(), lp).item() == pytest.approx(0.8)
    assert stats["clip_ratio/low"].item() == 1.0


def test_sapo_equals_trl_and_its_hand_values():
    old, mask = torch.tensor(OLD, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)
    adv = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    lp_a, lp_b = leaf(NEW), leaf(NEW)
    mine = ours(lp_a, old, adv, mask, "sapo")
    theirs = trl_aggregate(trl_grpo_per_token_loss(lp_b, old, adv, mask, "token", "sapo"), mask, "sapo")
    torch.testing.assert_close(mine, theirs, **close)
    torch.testing.assert_close(grad_of(mine, lp_a), grad_of(theirs, lp_b), **close)
    # on-policy (ρ = 1): value -(4/τ)·σ(0)·A = -2A/τ, gradient -A·4·σ'(0) = -A, for either temperature
    lp = leaf([[-1.0, -1.0]])
    a = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    per_token, _ = policy_token_losses(lp, lp.detach(), a, torch.ones(1, 2), "sapo")
    torch.testing.assert_close(per_token.detach(), torch.tensor([[-4.0, 2 / 1.05]], dtype=torch.float64))
    torch.testing.assert_close(grad_of(per_token.sum(), lp), torch.tensor([[-2.0, 1.0]], dtype=torch.float64))


def test_delta_bounds_the_ratio_of_negative_advantages_as_trl():
    # A = -1, ρ = e = 2.718: plain clip -> -min(-2.718, -1.2) = 2.718 with gradient 2.718;
    # delta 2 -> -min(-2, -1.2) = 2, no gradient
    lp, old = leaf([[0.0]]), torch.tensor([[-1.0]], dtype=torch.float64)
    a, mask = -torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    plain, _ = policy_token_losses(lp, old, a, mask)
    assert plain.item() == pytest.approx(math.e)
    assert grad_of(plain.sum(), lp).item() == pytest.approx(math.e)
    bounded, _ = policy_token_losses(lp, old, a, mask, delta=2.0)
    assert bounded.item() == pytest.approx(2.0)
    assert grad_of(bounded.sum(), lp).item() == 0.0
    # and TRL's two-sided clipping on the shared tensors
    old_t, mask_t = torch.tensor(OLD, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)
    adv = torch.tensor([[-1.0], [-2.0], [1.0]], dtype=torch.float64)
    lp_a, lp_b = leaf(NEW), leaf(NEW)
    mine = ours(lp_a, old_t, adv, mask_t, "grpo", delta=1.3)
    theirs = trl_aggregate(trl_grpo_per_token_loss(lp_b, old_t, adv, mask_t, delta=1.3), mask_t, "grpo")
    torch.testing.assert_close(mine, theirs, **close)
    torch.testing.assert_close(grad_of(mine, lp_a), grad_of(theirs, lp_b), **close)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    a, mask = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    # ρ = e (2.718 < c = 3): loss 2.718, gradient 2.718; ρ = e^1.5 = 4.48 > 3: loss capped at -c·A = 3, no gradient
    lp, old = leaf([[0.0, 0.0]]), torch.tensor([[-1.0, -1.5]], dtype=torch.float64)
    per_token, stats = policy_token_losses(lp, old, a, mask, clip_ratio_c=3.0)
    torch.testing.assert_close(per_token.detach(), torch.tensor([[math.e, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(grad_of(per_token.sum(), lp), torch.tensor([[math.e, 0.0]], dtype=torch.float64))
    assert stats["clip_ratio/low"].tolist() == [[0.0, 1.0]]
    # for A < 0 dual-clip and two-sided clipping at the same bound agree; for A > 0 dual-clip changes nothing
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    ones = torch.ones(4, 5)
    neg, pos = -torch.rand(4, 5, generator=g), torch.rand(4, 5, generator=g)
    torch.testing.assert_close(policy_token_losses(new, old, neg, ones, clip_ratio_c=3.0)[0],
                               policy_token_losses(new, old, neg, ones, delta=3.0)[0])
    torch.testing.assert_close(policy_token_losses(new, old, pos, ones, clip_ratio_c=3.0)[0],
                               policy_token_losses(new, old, pos, ones)[0])


# ------------------------------------------------------------------ RLOO's sequence loss against TRL's RLOOTrainer


def test_rloo_sequence_loss_by_hand_and_as_trl():
    # one completion, log-ratios 0.1 and 0.05: ρ = e^0.15 = 1.1618 (inside 1 ± 0.2), A = 1:
    # loss -1.1618, and each token's gradient -ρ·A = -1.1618 (a sum over tokens, not a mean)
    lp, old = leaf([[-0.9, -1.95, 0.0]]), torch.tensor([[-1.0, -2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    losses, _ = rloo_sequence_loss(lp, old, torch.tensor([1.0], dtype=torch.float64), mask)
    assert losses.item() == pytest.approx(-math.exp(0.15))
    torch.testing.assert_close(grad_of(losses.sum(), lp), torch.tensor([[-math.exp(0.15)] * 2 + [0.0]], dtype=torch.float64))
    # TRL: logps = (per_token_logps * mask).sum(1); coef_1 = exp(logps - old_logps); -min(c1·A, clamp(c1)·A).mean()
    old_t, mask_t = torch.tensor(OLD, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)
    adv = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    lp_a, lp_b = leaf(NEW), leaf(NEW)
    mine = rloo_sequence_loss(lp_a, old_t, adv, mask_t, 0.2, 0.28)[0].mean()
    coef_1 = torch.exp((lp_b * mask_t).sum(1) - (old_t * mask_t).sum(1))
    theirs = -torch.min(coef_1 * adv, torch.clamp(coef_1, 1 - 0.2, 1 + 0.28) * adv).mean()
    torch.testing.assert_close(mine, theirs, **close)
    torch.testing.assert_close(grad_of(mine, lp_a), grad_of(theirs, lp_b), **close)


def test_loss_aggregation_names_each_loss_type():
    assert loss_aggregation("cispo") == ("cispo", "dapo")
    assert loss_aggregation("sapo") == ("sapo", "grpo")
    assert loss_aggregation("dr_grpo") == ("clip", "dr_grpo")
    with pytest.raises(ValueError, match="valid"):
        loss_aggregation("gspo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_token_losses(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
                            importance_sampling_level="group")
