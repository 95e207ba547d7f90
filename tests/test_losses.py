"""Unit tests of posttrain.losses against hand-computed numbers (DESIGN.md §4).

Every expected value has its arithmetic in a comment; tensors are tiny on purpose.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain import losses as L


def t(*rows):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32)


# ----------------------------------------------------------------------------- dpo_loss
# pc=[-1,-2], pr=[-2,-1], rc=rr=[-1.5,-1.5] -> h = (pc-pr)-(rc-rr) = [1, -1]; beta=0.5 -> beta*h = [0.5, -0.5]
DPO_ARGS = ([-1.0, -2.0], [-2.0, -1.0], [-1.5, -1.5], [-1.5, -1.5])


def _dpo(**kw):
    return L.dpo_loss(*(torch.tensor(a) for a in DPO_ARGS), beta=0.5, **kw)


def test_dpo_sigmoid():
    losses, _, _ = _dpo(loss_type="sigmoid")
    # -log sig(0.5) = log(1+e^-0.5) = 0.474077; -log sig(-0.5) = log(1+e^0.5) = 0.974077
    assert_close(losses, t(0.474077, 0.974077))


def test_dpo_ipo():
    losses, _, _ = _dpo(loss_type="ipo")
    # 1/(2*0.5) = 1 -> (h-1)^2 = [(1-1)^2, (-1-1)^2] = [0, 4]
    assert_close(losses, t(0.0, 4.0))


def test_dpo_hinge():
    losses, _, _ = _dpo(loss_type="hinge")
    # relu(1 - beta*h) = [relu(0.5), relu(1.5)] = [0.5, 1.5]
    assert_close(losses, t(0.5, 1.5))


def test_dpo_label_smoothing():
    losses, _, _ = _dpo(loss_type="sigmoid", label_smoothing=0.1)
    # pair 0: 0.9*0.474077 + 0.1*0.974077 = 0.426669 + 0.097408 = 0.524077
    # pair 1: 0.9*0.974077 + 0.1*0.474077 = 0.876669 + 0.047408 = 0.924077
    assert_close(losses, t(0.524077, 0.924077))


def test_dpo_rewards_detached_and_values():
    pc = torch.tensor(DPO_ARGS[0], requires_grad=True)
    pr = torch.tensor(DPO_ARGS[1], requires_grad=True)
    _, cr, rr = L.dpo_loss(pc, pr, torch.tensor(DPO_ARGS[2]), torch.tensor(DPO_ARGS[3]), beta=0.5)
    # chosen 0.5*(pc-rc) = 0.5*[0.5,-0.5]; rejected 0.5*(pr-rr) = 0.5*[-0.5,0.5]
    assert_close(cr, t(0.25, -0.25))
    assert_close(rr, t(-0.25, 0.25))
    assert not cr.requires_grad and not rr.requires_grad


def test_dpo_gradient_on_chosen():
    pc = torch.tensor(DPO_ARGS[0], requires_grad=True)
    losses, _, _ = L.dpo_loss(pc, *(torch.tensor(a) for a in DPO_ARGS[1:]), beta=0.5)
    losses.sum().backward()
    # d/dpc -log sig(beta*h) = -beta*sig(-beta*h): [-0.5*sig(-0.5), -0.5*sig(0.5)] = [-0.188770, -0.311230]
    assert_close(pc.grad, t(-0.188770, -0.311230))
    assert (pc.grad < 0).all()  # raising the chosen log-prob lowers the loss
    # and numerically: a step up in pc lowers the loss
    with torch.no_grad():
        higher, _, _ = L.dpo_loss(pc + 0.1, *(torch.tensor(a) for a in DPO_ARGS[1:]), beta=0.5)
    assert (higher < losses.detach()).all()


def test_dpo_unknown_loss_type():
    with pytest.raises(ValueError, match="sigmoid.*ipo.*hinge"):
        _dpo(loss_type="kto")


# ----------------------------------------------------------------------------- reward_model_loss
def test_reward_model_loss():
    # diff = [2-1, 0-1] = [1, -1]: -log sig(1) = 0.313262, -log sig(-1) = 1.313262 -> mean 0.813262
    assert_close(L.reward_model_loss(t(2.0, 0.0), t(1.0, 1.0)), torch.tensor(0.813262))


def test_reward_model_loss_margin():
    # diff - m = [1-1, -1-0] = [0, -1]: log 2 = 0.693147, 1.313262 -> mean 1.003205
    loss = L.reward_model_loss(t(2.0, 0.0), t(1.0, 1.0), margin=t(1.0, 0.0))
    assert_close(loss, torch.tensor(1.003205))


# ----------------------------------------------------------------------------- kl_penalty
LP, RLP = t([-1.0, -2.0]), t([-1.5, -1.0])  # lp - rlp = [0.5, -1.0]


def test_kl_k1_k2_k3():
    assert_close(L.kl_penalty(LP, RLP, "k1"), t(0.5, -1.0))  # lp - rlp
    assert_close(L.kl_penalty(LP, RLP, "k2"), t(0.125, 0.5))  # 0.5*0.25, 0.5*1
    # x = rlp - lp = [-0.5, 1]: e^-0.5 + 0.5 - 1 = 0.106531; e^1 - 1 - 1 = 0.718282
    assert_close(L.kl_penalty(LP, RLP, "k3"), t(0.106531, 0.718282))


def test_kl_k3_nonnegative_random():
    g = torch.Generator().manual_seed(0)
    lp, rlp = torch.randn(8, 64, generator=g) * 3, torch.randn(8, 64, generator=g) * 3
    assert (L.kl_penalty(lp, rlp, "k3") >= 0).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        L.kl_penalty(LP, RLP, "k4")


# ----------------------------------------------------------------------------- gae
def test_gae_hand_three_steps():
    # gamma=0.9, lam=0.8 (gamma*lam = 0.72); r=[0,0,1], V=[0.5,1,2], V after the end = 0
    # d2 = 1 + 0.9*0 - 2 = -1.0;  d1 = 0 + 0.9*2 - 1 = 0.8;  d0 = 0 + 0.9*1 - 0.5 = 0.4
    # A2 = -1.0;  A1 = 0.8 + 0.72*(-1) = 0.08;  A0 = 0.4 + 0.72*0.08 = 0.4576
    # returns = A + V = [0.9576, 1.08, 1.0]; the 4th position is padding (garbage r, V) -> 0
    rewards, values = t([[0.0, 0.0, 1.0, 7.0]]), t([[0.5, 1.0, 2.0, 5.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, t([[0.4576, 0.08, -1.0, 0.0]]))
    assert_close(ret, t([[0.9576, 1.08, 1.0, 0.0]]))


def _gae_reference(rewards, values, mask, gamma, lam):
    """Slow loop: plain GAE over each sequence's unmasked positions, in order."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [i for i in range(rewards.shape[1]) if mask[b, i] > 0]
        next_v, next_a = 0.0, 0.0
        for i in reversed(idx):
            delta = rewards[b, i].item() + gamma * next_v - values[b, i].item()
            next_a = delta + gamma * lam * next_a
            next_v = values[b, i].item()
            adv[b, i] = next_a
    return adv


def test_gae_matches_reference_loop_right_and_left_padding():
    g = torch.Generator().manual_seed(1)
    B, T = 6, 9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.zeros(B, T)
    for b, n in enumerate([9, 5, 1, 7, 3, 0]):  # right padding, variable lengths (one empty)
        mask[b, :n] = 1
    left = torch.zeros(2, T)
    left[0, 3:] = 1  # left padding: zeros at the start
    left[1, 2:6] = 1  # zeros on both sides
    rewards = torch.cat([rewards, torch.randn(2, T, generator=g)])
    values = torch.cat([values, torch.randn(2, T, generator=g)])
    mask = torch.cat([mask, left])
    adv, ret = L.gae(rewards, values, mask, gamma=0.97, lam=0.9)
    assert_close(adv, _gae_reference(rewards, values, mask, 0.97, 0.9))
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    assert_close(ret[mask == 1], (adv + values)[mask == 1])
    assert not adv.requires_grad and not ret.requires_grad


# ----------------------------------------------------------------------------- whiten
def test_whiten_hand():
    # masked [1,2,3]: mean 2, Bessel var (1+0+1)/2 = 1 -> [-1, 0, 1]; padding (100) -> 0
    x, m = t([[1.0, 2.0, 3.0, 100.0]]), t([[1.0, 1.0, 1.0, 0.0]])
    assert_close(L.whiten(x, m), t([[-1.0, 0.0, 1.0, 0.0]]))
    # [2,4,6]: mean 4, var (4+0+4)/2 = 4, std 2 -> [-1,0,1]; shift_mean=False adds 4 back -> [3,4,5]
    x = t([[2.0, 4.0, 6.0, 100.0]])
    assert_close(L.whiten(x, m, shift_mean=False), t([[3.0, 4.0, 5.0, 0.0]]))


def test_whiten_random_moments():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, generator=g) * 5 + 3
    m = (torch.rand(4, 10, generator=g) > 0.3).float()
    w = L.whiten(x, m)
    sel = w[m == 1]
    assert_close(sel.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert_close(sel.var(), torch.tensor(1.0), atol=1e-4, rtol=0)  # Bessel-corrected
    assert (w[m == 0] == 0).all()
    kept = L.whiten(x, m, shift_mean=False)
    assert_close(kept[m == 1].mean(), x[m == 1].mean(), atol=1e-5, rtol=0)
    assert_close(kept[m == 1].var(), torch.tensor(1.0), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- ppo_policy_loss
# log ratios [0.5, -0.5, 0.1, 0.5] -> rho = [1.648721, 0.606531, 1.105171, 1.648721]; A = [2, -1, 1, -1]
PPO_LR, PPO_A = t([[0.5, -0.5], [0.1, 0.5]]), t([[2.0, -1.0], [1.0, -1.0]])


def test_ppo_token_losses_and_clip():
    lp = PPO_LR.clone().requires_grad_(True)
    loss, stats = L.ppo_policy_loss(lp, torch.zeros(2, 2), PPO_A, torch.ones(2, 2), epsilon=0.2)
    # t0 A>0: -min(1.6487*2 = 3.2974, 1.2*2 = 2.4) = -2.4            (upper clip binds)
    # t1 A<0: -min(0.6065*-1 = -0.6065, 0.8*-1 = -0.8) = 0.8          (lower clip binds)
    # t2 A>0: ratio 1.1052 inside [0.8, 1.2] -> -1.105171
    # t3 A<0: -min(-1.6487, 1.2*-1 = -1.2) = 1.648721                 (clip would help: not binding)
    per_token, _ = L.ppo_token_losses(PPO_LR, torch.zeros(2, 2), PPO_A, epsilon=0.2)
    assert_close(per_token, t([[-2.4, 0.8], [-1.105171, 1.648721]]))
    # mean = (-2.4 + 0.8 - 1.105171 + 1.648721) / 4 = -1.05645 / 4 = -0.264113
    assert_close(loss, torch.tensor(-0.264113))
    assert_close(stats["clip_ratio"], torch.tensor(0.5))  # t0 and t1 of 4
    assert_close(stats["clip_ratio/low"], torch.tensor(0.25))  # t1
    assert_close(stats["clip_ratio/high"], torch.tensor(0.25))  # t0
    # approx_kl = k3 of KL(old || new) from samples of old = (rho - 1) - lr:
    # 0.148721, 0.106531, 0.005171, 0.148721 -> mean 0.102286 (e^-lr - 1 + lr, the KL the other way, gave 0.091655)
    assert_close(stats["approx_kl"], torch.tensor(0.102286), atol=1e-5, rtol=0)
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # d/dlp of -rho*A/4 where unclipped; 0 where the clip binds (t0, t1)
    # t2: -1.105171*1/4 = -0.276293; t3: -1.648721*(-1)/4 = 0.412180
    assert_close(lp.grad, t([[0.0, 0.0], [-0.276293, 0.412180]]))


def test_ppo_approx_kl_is_k3_of_old_vs_new():
    # one token, lr = log pi - log pi_old = 1: k3 = (e - 1) - 1 = 0.718282; the reversed form
    # e^-1 - 1 + 1 = 0.367879 estimates KL(new || old), which samples from old do not
    _, stats = L.ppo_policy_loss(t([[1.0]]), t([[0.0]]), t([[1.0]]), t([[1.0]]))
    assert_close(stats["approx_kl"], torch.tensor(math.e - 2))
    # it is the kl_penalty k3 estimator with old as the sampling policy and new as the other one
    lp, old = t([[0.3, -1.2, 0.7]]), t([[-0.4, 0.2, 0.7]])
    _, stats = L.ppo_token_losses(lp, old, torch.ones(1, 3))
    assert_close(stats["approx_kl"], L.kl_penalty(old, lp, "k3"))


def test_ppo_epsilon_high_moves_only_upper_bound():
    old, ones = torch.zeros(2, 2), torch.ones(2, 2)
    # eps_high=0.28: t0 -> -min(3.2974, 1.28*2 = 2.56) = -2.56; t1 still 0.8 (lower bound 1-0.2 unchanged)
    per_token, _ = L.ppo_token_losses(PPO_LR, old, PPO_A, epsilon=0.2, epsilon_high=0.28)
    assert_close(per_token, t([[-2.56, 0.8], [-1.105171, 1.648721]]))
    # eps_high=0.7: 1.6487 < 1.7 so t0 is unclipped: -3.297443; only the low clip remains
    loss, stats = L.ppo_policy_loss(PPO_LR, old, PPO_A, ones, epsilon=0.2, epsilon_high=0.7)
    # (-3.297443 + 0.8 - 1.105171 + 1.648721) / 4 = -1.953893 / 4 = -0.488473
    assert_close(loss, torch.tensor(-0.488473))
    assert_close(stats["clip_ratio/high"], torch.tensor(0.0))
    assert_close(stats["clip_ratio/low"], torch.tensor(0.25))


def test_ppo_mask_excludes_tokens():
    mask = t([[1.0, 0.0], [1.0, 0.0]])
    loss, stats = L.ppo_policy_loss(PPO_LR, torch.zeros(2, 2), PPO_A, mask)
    # (-2.4 - 1.105171) / 2 = -1.752586; clip only on t0 -> 1/2
    assert_close(loss, torch.tensor(-1.752586))
    assert_close(stats["clip_ratio"], torch.tensor(0.5))


# ----------------------------------------------------------------------------- value_loss
V, V_OLD, R = t([[1.0, 2.0]]), t([[0.0, 2.5]]), t([[0.5, 0.0]])


def test_value_loss_unclipped():
    # (V-R)^2 = [0.25, 4] -> 0.5 * mean = 0.5 * 2.125 = 1.0625
    assert_close(L.value_loss(V, V_OLD, R, torch.ones(1, 2)), torch.tensor(1.0625))


def test_value_loss_clipped():
    # V_clip = old + clip(V-old, +-0.2) = [0+0.2, 2.5-0.2] = [0.2, 2.3]; (V_clip-R)^2 = [0.09, 5.29]
    # max with [0.25, 4] = [0.25, 5.29] -> 0.5 * 2.77 = 1.385
    assert_close(L.value_loss(V, V_OLD, R, torch.ones(1, 2), cliprange_value=0.2), torch.tensor(1.385))
    # masking out the 2nd token: 0.5 * 0.25 = 0.125
    assert_close(L.value_loss(V, V_OLD, R, t([[1.0, 0.0]]), cliprange_value=0.2), torch.tensor(0.125))


# ----------------------------------------------------------------------------- group_advantages
REWARDS = t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of 3


def test_group_advantages_group():
    # group 1: mean 2, Bessel std sqrt((1+0+1)/2) = 1 -> [-1,0,1]/(1+1e-4)
    # (population std would be sqrt(2/3) = 0.8165 and give +-1.2247)
    # group 2: all equal -> 0/(0+1e-4) = 0
    out = L.group_advantages(REWARDS, 3, "group")
    assert_close(out, t(-1.0, 0.0, 1.0, 0.0, 0.0, 0.0) / 1.0001)


def test_group_advantages_batch_and_none():
    # batch mean 3.5; squared devs 6.25+2.25+0.25+3*2.25 = 15.5; /5 = 3.1; std = 1.760682
    out = L.group_advantages(REWARDS, 3, "batch")
    assert_close(out, t(-1.0, 0.0, 1.0, 0.0, 0.0, 0.0) / (1.760682 + 1e-4))
    assert_close(L.group_advantages(REWARDS, 3, "none"), t(-1.0, 0.0, 1.0, 0.0, 0.0, 0.0))


def test_group_advantages_errors():
    with pytest.raises(ValueError):
        L.group_advantages(REWARDS, 4)  # 6 rewards do not split into groups of 4
    with pytest.raises(ValueError, match="group, batch, none"):
        L.group_advantages(REWARDS, 3, "median")


# ----------------------------------------------------------------------------- aggregate_loss
# lengths 1 and 3: sequence 0 = [4], sequence 1 = [1, 2, 3]; 9s are padding
AGG_X, AGG_M = t([[4.0, 9.0, 9.0], [1.0, 2.0, 3.0]]), t([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


def test_aggregate_loss_modes_differ_with_unequal_lengths():
    # grpo: per-sequence means 4 and 2 -> mean 3
    assert_close(L.aggregate_loss(AGG_X, AGG_M, "grpo"), torch.tensor(3.0))
    # bnpo: token sum 4+6 = 10 over 4 tokens = 2.5
    assert_close(L.aggregate_loss(AGG_X, AGG_M, "bnpo"), torch.tensor(2.5))
    # dr_grpo: 10 / (B=2 * max_len=4) = 1.25
    assert_close(L.aggregate_loss(AGG_X, AGG_M, "dr_grpo", max_completion_length=4), torch.tensor(1.25))
    # dapo: 10 / num_tokens (accumulated batch of 5 tokens) = 2.0; without num_tokens = bnpo = 2.5
    assert_close(L.aggregate_loss(AGG_X, AGG_M, "dapo", num_tokens=5), torch.tensor(2.0))
    assert_close(L.aggregate_loss(AGG_X, AGG_M, "dapo", num_tokens=torch.tensor(8.0)), torch.tensor(1.25))
    assert_close(L.aggregate_loss(AGG_X, AGG_M, "dapo"), torch.tensor(2.5))


def test_aggregate_loss_errors():
    with pytest.raises(ValueError, match="max_completion_length"):
        L.aggregate_loss(AGG_X, AGG_M, "dr_grpo")
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        L.aggregate_loss(AGG_X, AGG_M, "sum")


# ----------------------------------------------------------------------------- selective_log_softmax
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_selective_log_softmax(dtype, tol):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 3, 5, generator=g) * 4).to(dtype)
    index = torch.randint(0, 5, (2, 3), generator=g)
    out = L.selective_log_softmax(logits, index)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    # reference on the full float32 log-softmax (of the bf16-rounded logits for bf16)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert_close(out, ref, atol=tol, rtol=0)
    # and the same as a log-softmax in the input dtype, within that dtype's precision
    ref_native = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1).float()
    assert_close(out, ref_native, atol=tol * 10 if dtype == torch.bfloat16 else tol, rtol=2e-2)


def test_selective_log_softmax_hand():
    # logits [0, ln 3]: log p = [ln 1/4, ln 3/4] = [-1.386294, -0.287682]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    assert_close(L.selective_log_softmax(logits, torch.tensor([[0, 1]])), t([[-1.386294, -0.287682]]))


# ----------------------------------------------------------------------------- masked helpers, sequence_logps
def test_masked_sum_and_mean():
    x, m = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), t([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert_close(L.masked_sum(x, m), torch.tensor(9.0))  # 1+2+6
    assert_close(L.masked_sum(x, m, dim=-1), t(3.0, 6.0))
    assert_close(L.masked_mean(x, m), torch.tensor(3.0))  # 9/3
    assert_close(L.masked_mean(x, m, dim=-1), t(1.5, 6.0))  # 3/2, 6/1


def test_masked_mean_empty_mask_is_zero():
    x = t([[1.0, 2.0], [3.0, 4.0]])
    assert_close(L.masked_mean(x, torch.zeros(2, 2)), torch.tensor(0.0))
    # one empty row: [0/1 clamp -> 0, (3+4)/2 = 3.5]
    assert_close(L.masked_mean(x, t([[0.0, 0.0], [1.0, 1.0]]), dim=-1), t(0.0, 3.5))


def test_sequence_logps():
    lp, m = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]]), t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert_close(L.sequence_logps(lp, m, "sum"), t(-6.0, -1.0))  # -1-2-3; -0.5-0.5
    assert_close(L.sequence_logps(lp, m, "mean"), t(-2.0, -0.5))  # -6/3; -1/2
    with pytest.raises(ValueError, match="sum, mean"):
        L.sequence_logps(lp, m, "max")


# ----------------------------------------------------------------------------- entropy, explained_variance
def test_entropy_from_logits():
    V = 7
    out = L.entropy_from_logits(torch.zeros(2, 3, V))  # uniform over V -> log V = 1.945910
    assert_close(out, torch.full((2, 3), math.log(V)))
    # p = [1/4, 3/4]: H = 0.25*ln4 + 0.75*ln(4/3) = 0.346574 + 0.215762 = 0.562335
    two = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.bfloat16)
    assert_close(L.entropy_from_logits(two), t([[0.562335]]), atol=5e-3, rtol=0)
    assert L.entropy_from_logits(two).dtype == torch.float32


def test_explained_variance():
    R, m = t([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4)
    assert_close(L.explained_variance(R, R, m), torch.tensor(1.0))  # perfect critic
    assert_close(L.explained_variance(torch.full((1, 4), 2.5), R, m), torch.tensor(0.0), atol=1e-6, rtol=0)
    # resid [0,0,0,1]: var = 0.75/4 = 0.1875; Var(R) = 5/4 = 1.25 -> 1 - 0.15 = 0.85
    assert_close(L.explained_variance(t([[1.0, 2.0, 3.0, 3.0]]), R, m), torch.tensor(0.85))
    # a masked-out position with a wild value is ignored
    R5, m5 = t([[1.0, 2.0, 3.0, 4.0, 50.0]]), t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert_close(L.explained_variance(t([[1.0, 2.0, 3.0, 3.0, -50.0]]), R5, m5), torch.tensor(0.85))


def test_bias_corrected_kl_has_k3_value_and_k2_gradient():
    # log r = rlp - lp; at one iteration old = lp.detach(), so the weight exp(lp - old) is 1 in value
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    rlp = torch.tensor([[-1.5, -1.0, -0.5]])
    corrected = L.bias_corrected_kl(lp, rlp, lp.detach())
    assert_close(corrected, L.kl_penalty(lp, rlp, "k3"))
    (grad_corrected,) = torch.autograd.grad(corrected.sum(), lp)
    (grad_k2,) = torch.autograd.grad(L.kl_penalty(lp, rlp, "k2").sum(), lp)
    (grad_k3,) = torch.autograd.grad(L.kl_penalty(lp, rlp, "k3").sum(), lp)
    # k2's gradient is lp - rlp = [0.5, -1, 0]; plain k3's is 1 - exp(rlp - lp) = [1 - e^-0.5, 1 - e, 0]
    assert_close(grad_corrected, grad_k2)
    assert_close(grad_k2, torch.tensor([[0.5, -1.0, 0.0]]))
    assert_close(grad_k3, torch.tensor([[1 - math.exp(-0.5), 1 - math.e, 0.0]]))
    # with a stale old policy the value is k3 weighted by the importance ratio
    old = torch.tensor([[-1.0, -2.5, -0.5]])
    assert_close(L.bias_corrected_kl(lp, rlp, old), L.kl_penalty(lp, rlp, "k3") * torch.exp(lp - old))


def _per_row_reference(logits, index):
    # the slow reference: one sequence at a time, in float32
    return torch.stack([row.float().gather(-1, idx.unsqueeze(-1)).squeeze(-1) - row.float().logsumexp(-1)
                        for row, idx in zip(logits, index)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_over_several_chunks_equals_the_per_row_loop(dtype):
    torch.manual_seed(0)
    V = 40_000  # 419 positions a chunk: the 600 positions below span two chunks, cut inside a sequence
    logits = (torch.randn(2, 300, V) * 3).to(dtype).requires_grad_()
    index = torch.randint(0, V, (2, 300))
    assert L._rows_per_chunk(V) < 600
    out, ref = L.selective_log_softmax(logits, index), _per_row_reference(logits, index)
    assert_close(out, ref, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    assert_close(grad, ref_grad, rtol=0, atol=0)


def test_entropy_over_several_chunks_equals_the_per_row_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 300, 40_000)
    expected = torch.stack([-(row.softmax(-1) * row.log_softmax(-1)).sum(-1) for row in logits])
    assert_close(L.entropy_from_logits(logits), expected, rtol=0, atol=1e-5)


def test_online_dpo_pairs_choose_the_higher_reward_and_the_first_on_a_tie():
    # prompt i's completions are rows 2i, 2i+1: second higher, first higher, a tie, a tie of missing-EOS penalties
    rewards = torch.tensor([0.0, 1.0, 2.5, -1.0, 0.3, 0.3, -1.0, -1.0])
    chosen, rejected = L.online_dpo_pairs(rewards)
    assert chosen.tolist() == [1, 2, 4, 6] and rejected.tolist() == [0, 3, 5, 7]
    assert (rewards[chosen] >= rewards[rejected]).all()
    # TRL's rule on its own layout (first half vs second half, chosen where first >= second) on the same pairs
    first, second = rewards[0::2], rewards[1::2]
    trl_chosen_is_first = first >= second
    assert ((chosen % 2 == 0) == trl_chosen_is_first).all()
