"""Every formula of post-training as a pure tensor function.

This module is the textbook: tensors in, tensors out (plus dicts of detached
tensors for statistics). It imports only torch, reads no config and calls no
model. Shapes use one legend throughout:

    B  batch (sequences, or preference pairs for DPO / reward models)
    T  tokens (completion positions; prompt and padding are masked out)
    V  vocabulary
    G  group size (completions per prompt, GRPO)

``mask`` is 1 for response tokens and 0 for prompt and padding; a masked mean is
``sum(x * mask) / sum(mask)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "selective_log_softmax",
    "masked_mean",
    "masked_sum",
    "sequence_logps",
    "packed_sequence_logps",
    "dpo_loss",
    "cpo_loss",
    "orpo_loss",
    "log1mexp",
    "reward_model_loss",
    "kto_loss",
    "kl_penalty",
    "bias_corrected_kl",
    "gae",
    "whiten",
    "ppo_policy_loss",
    "value_loss",
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "remax_advantages",
    "normalize_advantages",
    "gspo_log_ratio",
    "policy_token_losses",
    "rloo_sequence_loss",
    "aggregate_loss",
    "entropy_from_logits",
    "chunked_head_logps",
    "explained_variance",
    "generalized_jsd",
    "generalized_jsd_loss",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "apo_zero", "sppo_hard", "nca_pair", "exo_pair")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_plus")
GROUP_SCALES = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("clip", "cispo", "sapo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _rows_per_chunk(vocab: int, budget: int = 1 << 24) -> int:
    """Token positions per chunk so that a float32 chunk of logits holds about ``budget`` values (64 MB)."""
    return max(1, budget // max(1, vocab))


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index], without a full (B, T, V) float32 log-softmax.

    log p(i) = logit_i - logsumexp(logits). The positions of the whole batch
    are flattened and taken in chunks of about 2^24 logits, upcast to float32
    one chunk at a time, so the extra memory is bounded by the chunk, not by
    B·T·V (at V = 152k: 110 positions a chunk), and there is no Python loop
    over sequences.

    Shape: logits (B, T, V), index (B, T) -> (B, T), float32 (float64 input stays float64).
    """
    vocab = logits.shape[-1]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat, flat_index = logits.reshape(-1, vocab), index.reshape(-1, 1)
    step = _rows_per_chunk(vocab)
    parts = []
    for start in range(0, flat.shape[0], step):
        chunk = flat[start:start + step].to(dtype)
        parts.append(chunk.gather(-1, flat_index[start:start + step]).squeeze(-1) - chunk.logsumexp(-1))
    if not parts:
        return logits.new_zeros(index.shape, dtype=dtype)
    return torch.cat(parts).view(index.shape)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) over ``dim`` (all dims when None)."""
    if dim is None:
        return (values * mask).sum()
    return (values * mask).sum(dim)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last position of mask 1 (0 for a row with none): where a sequence reward goes.

    Equal to ``mask.sum(-1) - 1`` for a mask that is one run of ones from column 0 (a single-turn
    completion); a multi-turn trajectory's mask has gaps (tool tokens), and its last model token is later.

    Shape: mask (B, T) -> (B,) long.
    """
    columns = torch.arange(mask.shape[-1], device=mask.device)
    return (columns * (mask > 0)).amax(-1).long()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask) over ``dim``; an empty mask gives 0, not NaN."""
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp_min(1)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, normalization: str = "sum") -> torch.Tensor:
    """Log-probability of each response: sum of token log-probs, or their mean.

    "sum" is log π(y|x) as in DPO (arXiv 2305.18290, Eq. 7). "mean" divides by
    the response length — the length-normalised form of SimPO
    (arXiv 2405.14734, Eq. 4), and the one IPO's target 1/(2β) assumes.

    Shape: token_logps (B, T), mask (B, T) -> (B,).
    """
    _check_choice("logps_normalization", normalization, ("sum", "mean"))
    if normalization == "sum":
        return masked_sum(token_logps, mask, dim=-1)
    return masked_mean(token_logps, mask, dim=-1)


def packed_sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, row_of_token: torch.Tensor, num_rows: int,
                          normalization: str = "sum") -> torch.Tensor:
    """``sequence_logps`` of rows packed one after another into a single sequence (padding-free batches).

    The same sum (or mean) of each row's masked token log-probs, by a segment
    sum: row r collects the positions t with ``row_of_token[t] == r``
    (``index_add``, so no loop over rows and gradients flow to every token).

    Shape: token_logps (1, T) or (T,), mask like it, row_of_token (T,) in [0, R) -> (R,).
    """
    _check_choice("logps_normalization", normalization, ("sum", "mean"))
    masked = (token_logps * mask).reshape(-1)
    sums = masked.new_zeros(num_rows).index_add(0, row_of_token, masked)
    if normalization == "sum":
        return sums
    counts = masked.new_zeros(num_rows).index_add(0, row_of_token, mask.reshape(-1).to(masked.dtype))
    return sums / counts.clamp_min(1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss per pair, and the implicit rewards.

    With the log-ratios c = log π(y_w) - log π_ref(y_w), r = log π(y_l) - log π_ref(y_l), h = c - r,
    σ the sigmoid and ε = label_smoothing:

    - sigmoid:   -(1-ε)·log σ(βh) - ε·log σ(-βh)      DPO, arXiv 2305.18290 Eq. 7;
      ε > 0 is conservative DPO (label noise ε, cDPO note of Mitchell 2023).
    - ipo:       (h - 1/(2β))²                         IPO, arXiv 2310.12036 Eq. 17.
    - hinge:     relu(1 - βh)                          SLiC, arXiv 2305.10425 Eq. 3.
    - robust:    (-(1-ε)·log σ(βh) + ε·log σ(-βh)) / (1-2ε)   robust DPO, arXiv 2403.00409
      (unbiased under labels flipped with probability ε < 1/2).
    - bco_pair:  -log σ(βc) - log σ(-βr)               BCO on pairs, arXiv 2404.04656 (no reward shift δ).
    - apo_zero:  (1 - σ(βc)) + σ(βr)                   APO-zero, arXiv 2408.06266 Eq. 7.
    - sppo_hard: (c - 1/(2β))² + (r + 1/(2β))²         SPPO, arXiv 2405.00675 Eq. 4.7 with the hard
      win probabilities P(y_w) = 1, P(y_l) = 0.
    - nca_pair:  -log σ(βc) - ½·log σ(-βc) - ½·log σ(-βr)   NCA on pairs, arXiv 2402.05369 (K = 2).
    - exo_pair:  KL(q ‖ p) = q_w·(log q_w - log(1-ε)) + q_l·(log q_l - log ε), q_w = σ(βh) = 1 - q_l
      EXO, arXiv 2402.00856 Eq. 16 (K = 2); needs ε > 0 (the paper uses 1e-3).

    These are TRL 1.16 DPOTrainer's formulas (posttrain's sigmoid keeps ε; TRL's moved it to robust and
    exo_pair). ``loss_type`` may name several: the losses are Σ_i w_i·loss_i with ``loss_weights`` w
    (default all 1), as TRL combines its list of loss types (each weighted mean over the batch is the
    mean of this weighted sum).

    Shape: each logps argument (B,) -> (losses (B,), chosen_rewards (B,),
    rejected_rewards (B,)). Rewards β·(log π - log π_ref) are detached.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if not loss_types or len(weights) != len(loss_types):
        raise ValueError(f"loss_weights {weights} must give one weight per loss_type {loss_types}")
    for name in loss_types:
        _check_choice("loss_type", name, DPO_LOSS_TYPES)
    c = policy_chosen_logps - ref_chosen_logps
    r = policy_rejected_logps - ref_rejected_logps
    h = c - r
    losses = torch.zeros_like(h)
    for name, weight in zip(loss_types, weights):
        losses = losses + weight * _dpo_variant(name, c, r, h, beta, label_smoothing)
    return losses, beta * c.detach(), beta * r.detach()


def _dpo_variant(loss_type: str, c: torch.Tensor, r: torch.Tensor, h: torch.Tensor, beta: float,
                 eps: float) -> torch.Tensor:
    """One of ``dpo_loss``'s loss types per pair, from the chosen / rejected log-ratios c, r and h = c - r."""
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if not eps > 0:  # exo_pair: log ε of the target distribution
        raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
    log_qw, log_ql = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
    return log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (log_ql - math.log(eps))


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference-free preference loss per pair (CPO, SimPO), and its rewards β·log π(y).

    With u = log π(y_w) - log π(y_l) (no reference model) and ε = label_smoothing:

    - sigmoid: -(1-ε)·log σ(βu) - ε·log σ(-βu)   CPO, arXiv 2401.08417 Eq. 3 (ε = 0); the NLL term
      of CPO's objective on the chosen responses is added by the recipe (cpo_alpha).
    - hinge:   relu(1 - βu)                        SLiC's hinge on the same u.
    - ipo:     (u - 1/(2β))²                       IPO's square on the same u.
    - simpo:   -(1-ε)·log σ(βu - γ) - ε·log σ(γ - βu), γ = simpo_gamma
      SimPO, arXiv 2405.14734 Eq. 6, where log π(y) is the mean token log-prob (Eq. 4).

    TRL 1.16 CPOTrainer's formulas; the caller passes summed log-probs for sigmoid and hinge and mean
    ones for ipo and simpo, as TRL does.

    Shape: policy_chosen_logps (B,), policy_rejected_logps (B,) -> (losses (B,), chosen_rewards (B,),
    rejected_rewards (B,)); rewards β·log π(y) detached.
    """
    _check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    u = policy_chosen_logps - policy_rejected_logps
    if loss_type in ("sigmoid", "simpo"):
        logits = beta * u - (simpo_gamma if loss_type == "simpo" else 0.0)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * u)
    else:
        losses = (u - 1 / (2 * beta)) ** 2
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation: log(-expm1(x)) near 0, log1p(-exp(x)) below -log 2
    (Mächler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """ORPO's odds-ratio term per pair, λ·(-log σ(log OR)), and its rewards β·log P(y).

    ORPO, arXiv 2403.07691 Eq. 4-7: odds(y) = P(y) / (1 - P(y)) with P(y) the mean token probability
    exp(mean log-prob), log OR = log odds(y_w) - log odds(y_l)
    = (log P_w - log P_l) - (log(1 - P_w) - log(1 - P_l)), and L_OR = -log σ(log OR) weighted by
    λ = beta. The recipe adds the chosen responses' NLL (L_SFT, Eq. 6). TRL 1.16 ORPOTrainer's formula
    (it subtracts λ·log σ(log OR) from the NLL).

    Shape: policy_chosen_logps (B,), policy_rejected_logps (B,) mean token log-probs (< 0) ->
    (losses (B,), chosen_rewards (B,), rejected_rewards (B,), stats); stats (detached, TRL's names):
    log_odds_ratio = mean of log σ(log OR), log_odds_chosen = mean of log OR.
    """
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)  # at least fp32 (bf16 log1mexp is coarse)
    chosen, rejected = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_sigmoid = F.logsigmoid(log_odds)
    stats = {"log_odds_ratio": log_sigmoid.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}
    return -beta * log_sigmoid, beta * chosen.detach(), beta * rejected.detach(), stats


def reward_model_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley-Terry loss of a reward model: mean of -log σ(r_w - r_l - m).

    InstructGPT, arXiv 2203.02155 Eq. 1; the optional margin m is Llama 2's
    (arXiv 2307.09288 Eq. 2).

    Shape: chosen_rewards (B,), rejected_rewards (B,), margin (B,) or None -> ().
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky Optimization loss per unpaired row, and the implicit rewards.

    With r = log π(y|x) - log π_ref(y|x), each row labelled desirable (λ = λ_D) or
    undesirable (λ = λ_U):

    - kto:  desirable λ_D·(1 - σ(β(r - z0))), undesirable λ_U·(1 - σ(β(z0 - r)))
      KTO, arXiv 2402.01306 §4.1 (λ_y - v(x, y), Eq. 7 as TRL cites it). The
      reference point z0 = max(0, kl) is the KL of π to π_ref estimated on
      mismatched pairs (x_i, y_j) of the batch; it is detached (not
      backpropagated, as in the paper).
    - apo_zero_unpaired: desirable λ_D·(1 - σ(βr)), undesirable λ_U·σ(βr)
      (the unpaired APO-zero of arXiv 2408.06266 Eq. 7; no reference point).

    Shape: policy_logps (B,), ref_logps (B,) summed response log-probs, labels
    (B,) bool (True: desirable), kl () the mean log-ratio on the mismatched
    pairs (None: 0) -> (losses (B,), rewards (B,) β·r detached, z0 ()).
    """
    _check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    logratios = policy_logps - ref_logps
    z0 = torch.zeros((), device=logratios.device) if kl is None or loss_type != "kto" else kl.detach().clamp(min=0)
    labels = labels.bool()
    if loss_type == "kto":
        losses = torch.where(labels, 1 - torch.sigmoid(beta * (logratios - z0)), 1 - torch.sigmoid(beta * (z0 - logratios)))
    else:
        losses = torch.where(labels, 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios))
    weights = torch.where(labels, desirable_weight, undesirable_weight).to(losses.dtype)
    return weights * losses, beta * logratios.detach(), z0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π.

    Schulman, "Approximating KL Divergence" (2020): with log r = rlp - lp,
    k1 = -log r (unbiased, high variance, can be negative), k2 = ½(log r)²
    (biased, low variance), k3 = (r - 1) - log r (unbiased, always >= 0; used by
    GRPO, arXiv 2402.03300 Eq. 4). "Unbiased" is about the value: as a loss,
    the gradient of k3 is biased, and that of k2 is the unbiased one of the
    KL (see ``bias_corrected_kl``).

    k3_plus is k3's value with k2's gradient, straight-through
    (k3 - sg[k2] + k2; verl's "k3+"): a non-negative, unbiased value whose
    gradient (lp - rlp)·∇lp is the unbiased one of the KL when π is the
    sampling policy.

    Shape: logprobs (B, T), ref_logprobs (B, T) -> (B, T).
    """
    _check_choice("kl_estimator", kind, KL_ESTIMATORS)
    log_ratio = ref_logprobs - logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    k3 = torch.exp(log_ratio) - log_ratio - 1
    if kind == "k3":
        return k3
    k2 = 0.5 * log_ratio**2
    return k3.detach() + k2 - k2.detach()


def bias_corrected_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 weighted by the importance ratio π/π_old: the same value, the unbiased gradient.

    Differentiating k3 itself (GRPO, arXiv 2402.03300 Eq. 4) gives
    (1 - π_ref/π)·∇log π, whose expectation is not ∇KL(π || π_ref): k3 is
    unbiased as a value, not as a gradient. Multiplying by
    ρ = exp(log π - log π_old) — 1 in value when π_old is π detached — adds
    k3·∇log π, and the sum is (log π - log π_ref)·∇log π, the gradient of k2
    and the unbiased one of the KL (the DeepSeek-V3.2 report, 2025; TRL's
    `use_bias_correction_kl`).

    Shape: logprobs, ref_logprobs, old_logprobs (B, T) -> (B, T).
    """
    return kl_penalty(logprobs, ref_logprobs, "k3") * torch.exp(logprobs - old_logprobs)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over response tokens.

    Schulman et al., arXiv 1506.02438 Eq. 16: δ_t = r_t + γ V_{t+1} - V_t and
    A_t = δ_t + γλ A_{t+1}; returns R_t = A_t + V_t. The value after the last
    response token is 0 (the episode ends). Masked positions contribute
    nothing and get 0. Vectorised over the batch; the recursion runs backwards
    over T (a loop over time, not over sequences or tokens of the batch).

    Shape: rewards, values, mask (B, T) -> (advantages (B, T), returns (B, T)),
    both detached.
    """
    rewards, values, mask = rewards.detach(), values.detach(), mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[..., 0])
    next_advantage = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(T)):
        m = mask[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        adv_t = delta + gamma * lam * next_advantage
        advantages[..., t] = adv_t * m
        # a masked position passes the later value/advantage through unchanged,
        # so padding inside a sequence (left-padded prompts) is skipped over
        next_value = torch.where(m.bool(), values[..., t], next_value)
        next_advantage = torch.where(m.bool(), adv_t, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce=None) -> torch.Tensor:
    """Normalise to unit variance over masked positions (PPO advantage whitening).

    Ziegler et al., arXiv 1909.08593, as in OpenAI lm-human-preferences. With
    shift_mean=False the mean is added back (used for returns / rewards).
    Variance is Bessel-corrected. Masked positions come back as 0. ``reduce``
    (default: none) sums a tensor over the other shards of the batch (the
    ranks of a data-parallel run), so the mean and variance are the whole
    batch's.

    Shape: values (B, T), mask (B, T) -> (B, T).
    """
    total = reduce or (lambda t: t)
    n = total(mask.sum())
    mean = total(masked_sum(values, mask)) / n.clamp_min(1)
    var = total(masked_sum((values - mean) ** 2, mask)) / (n - 1).clamp_min(1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective of PPO, as a loss (masked token mean).

    Schulman et al., arXiv 1707.06347 Eq. 7: L = -min(ρA, clip(ρ, 1-ε, 1+ε_h)A)
    with ρ = exp(lp - lp_old). ε_h = epsilon_high is DAPO's clip-higher
    (arXiv 2503.14476 Eq. 10); None means ε_h = ε.

    Shape: all arguments (B, T) -> (loss (), stats). Stats (detached):
    clip_ratio (fraction of tokens where the clip is active), clip_ratio/low,
    clip_ratio/high, approx_kl (masked mean of k3 = (ρ - 1) - log ρ, the estimate of
    KL(π_old || π) from tokens sampled from π_old; Schulman, "Approximating KL
    Divergence", 2020, and CleanRL's ``approx_kl``).
    """
    per_token, stats = ppo_token_losses(logprobs, old_logprobs, advantages, epsilon, epsilon_high)
    loss = masked_mean(per_token, mask)
    return loss, {k: masked_mean(v, mask) for k, v in stats.items()}


def ppo_token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate -min(ρA, clip(ρ)A), before aggregation.

    See ``ppo_policy_loss``; GRPO aggregates these with ``aggregate_loss``.
    Shape: (B, T) -> ((B, T), stats of (B, T) detached indicator tensors).
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * advantages
    per_token = -torch.min(unclipped, clipped)
    with torch.no_grad():
        # the clip binds only where it lowers the objective: below for A < 0,
        # above for A > 0
        low = ((ratio < 1 - epsilon) & (advantages < 0)).float()
        high = ((ratio > 1 + eps_high) & (advantages > 0)).float()
        stats = {
            "clip_ratio": low + high,
            "clip_ratio/low": low,
            "clip_ratio/high": high,
            # k3 of KL(π_old || π) for tokens drawn from π_old: r = π/π_old = ρ
            "approx_kl": ratio - 1 - log_ratio,
        }
    return per_token, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None = None,
) -> torch.Tensor:
    """Clipped value loss: masked mean of ½·max((V-R)², (V_clip-R)²).

    V_clip = old + clip(V - old, -c, c), the value clipping of OpenAI baselines
    PPO2 (implementation detail 9 of Huang et al., "The 37 Implementation
    Details of PPO", 2022). Without clipping: ½·(V-R)².

    Shape: values, old_values, returns, mask (B, T) -> ().
    """
    losses = (values - returns) ** 2
    if cliprange_value is not None:
        clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        losses = torch.max(losses, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of GRPO: each reward minus its group's mean.

    GRPO, arXiv 2402.03300 §4.1.2: Â = (r - mean(r_g)) / std(r_g). scale
    "batch" divides by the whole batch's std instead (arXiv 2508.08221);
    "none" leaves it unscaled, as Dr. GRPO argues (arXiv 2503.20783 §3.1).
    std is Bessel-corrected (torch.std's default).

    Shape: rewards (N·G,) in groups of G consecutive completions -> (N·G,).
    """
    _check_choice("scale_rewards", scale, GROUP_SCALES)
    if group_size < 2:
        raise ValueError("group_size must be >= 2: a group of one has no baseline")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
        return centred / (std + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    return centred


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages: each reward minus the mean of the other G-1 of its group.

    Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free!") and
    Ahmadian et al., arXiv 2402.14740 §3: A_i = r_i - 1/(G-1) Σ_{j≠i} r_j, which is
    G/(G-1)·(r_i - mean_g). Unscaled, as TRL's RLOOTrainer leaves it (see
    ``normalize_advantages`` for its option).

    Shape: rewards (N·G,) in groups of G consecutive completions -> (N·G,).
    """
    if group_size < 2:
        raise ValueError("group_size must be >= 2: a group of one has no leave-one-out baseline")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int | None = None,
                            kl: torch.Tensor | None = None, kl_coef: float = 0.0, reduce=None) -> torch.Tensor:
    """REINFORCE++ advantages: returns-to-go of the token rewards, whitened over the whole batch.

    REINFORCE++, arXiv 2501.03262: the score r is the reward of the last
    token and -β·KL_t that of every token (γ = 1), so the return at t is
    G_t = r - β Σ_{s≥t} KL_s; the advantages are G_t whitened over all
    response tokens of the global batch (mean 0, std 1; ``whiten`` with
    ``reduce`` summing over ranks), in place of a critic or a group baseline.
    With ``group_size`` it is REINFORCE++-baseline: each score first
    minus its group's mean, then the same global whitening. Without ``kl`` the
    return is r at every token.

    Shape: rewards (B,), mask (B, T), kl (B, T) detached or None -> (B, T), detached.
    """
    rewards = rewards.detach()
    if group_size is not None:
        if rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
        grouped = rewards.view(-1, group_size)
        rewards = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    mask = mask.to(rewards.dtype)
    returns = rewards.unsqueeze(1) * mask
    if kl is not None and kl_coef:
        token_kl = kl.detach() * mask
        # Σ_{s≥t} KL_s: a reversed cumulative sum along T
        returns = returns - kl_coef * token_kl.flip(-1).cumsum(-1).flip(-1) * mask
    return whiten(returns, mask, reduce=reduce)


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """ReMax advantages: each sampled completion's reward minus that of its prompt's greedy completion.

    ReMax, arXiv 2310.10505 (Algorithm 1): A = r(x, y) - r(x, ŷ) with ŷ
    the greedy decoding of the current policy, a baseline that needs no critic
    and no group.

    Shape: rewards (N·G,) in groups of G consecutive completions, greedy_rewards (N,) -> (N·G,).
    """
    if rewards.numel() != greedy_rewards.numel() * group_size:
        raise ValueError(f"{rewards.numel()} rewards for {greedy_rewards.numel()} greedy baselines x {group_size}")
    return rewards - greedy_rewards.repeat_interleave(group_size)


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(A - mean(A)) / (std(A) + eps) over the whole batch: TRL RLOOTrainer's ``normalize_advantages``.

    std is Bessel-corrected (TRL's nanstd); pass the advantages of the global
    batch (every rank's), not one shard's.

    Shape: advantages (B,) -> (B,).
    """
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def gspo_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_{i,t} of GSPO-token: the sequence's length-normalised log-ratio in value, the token's gradient.

    GSPO, arXiv 2507.18071 §4.1: s_i = (π(y_i)/π_old(y_i))^(1/|y_i|) =
    exp(mean_t (log π - log π_old)); §4.3 (GSPO-token):
    s_{i,t} = sg[s_i]·π(y_{i,t})/sg[π(y_{i,t})], so every token of y_i has the
    value s_i (and is clipped with it) while its gradient is s_i·∇log π(y_{i,t}).
    With one advantage per sequence this equals GSPO's (and TRL's
    importance_sampling_level="sequence") loss and gradient under every
    aggregation, and it also takes per-token advantages.

    Shape: logprobs, old_logprobs, mask (B, T) -> (B, T).
    """
    sequence = masked_mean(logprobs - old_logprobs, mask, dim=-1).detach().unsqueeze(-1)
    return sequence + logprobs - logprobs.detach()


def policy_token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss: str = "clip",
    importance_sampling_level: str = "token",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    clip_ratio_c: float | None = None,
    cispo_two_sided: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy-gradient loss of the critic-free loop, before aggregation.

    The ratio ρ is per token (exp(lp - old)) or GSPO's sequence ratio
    (``gspo_log_ratio``). Then, with ε_h = epsilon_high (None: ε):

    - clip:  -min(ρA, clip(ρ, 1-ε, 1+ε_h)A), PPO arXiv 1707.06347 Eq. 7 (see
      ``ppo_token_losses``). ``delta`` bounds ρ ≤ δ in the unclipped term, so a
      negative advantage cannot push an off-policy token without limit
      (two-sided clipping of INTELLECT-2, arXiv 2505.07291; TRL's ``delta``).
      ``clip_ratio_c`` is dual-clip PPO (Ye et al. 2020, arXiv 1912.09729):
      for A < 0 the loss is min(-min(ρA, clip(ρ)A), -c·A).
    - cispo: -sg[min(ρ, ε_h)]·A·log π, CISPO of MiniMax-M1 (arXiv 2506.13585,
      the CISPO objective): the weight is clipped and detached, never the token's gradient;
      here ε_h is the bound ε_max of the ratio itself (TRL's epsilon_high for
      cispo, 5.0 in ScaleRL, arXiv 2510.13786). ``cispo_two_sided`` also
      bounds it below at 1-ε (the paper's ε_low).
    - sapo:  -(4/τ)·σ(τ(ρ-1))·A with τ = τ_pos for A > 0, τ_neg otherwise:
      SAPO's soft gate in place of the hard clip (arXiv 2511.20347;
      TRL's loss_type sapo). At ρ = 1 the gate's slope is 1, so the gradient is
      -A·∇log π, as the clipped loss's is.

    Shape: logprobs, old_logprobs, advantages (B, T) or (B, 1), mask (B, T) ->
    ((B, T), stats of (B, T) detached indicators: clip_ratio, clip_ratio/low,
    clip_ratio/high).
    """
    _check_choice("policy loss", loss, POLICY_LOSSES)
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if importance_sampling_level == "token":
        log_ratio = logprobs - old_logprobs
    else:
        log_ratio = gspo_log_ratio(logprobs, old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    advantages = advantages.expand_as(ratio)
    zero = torch.zeros_like(ratio).detach()
    if loss == "clip":
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * advantages
        unclipped = (torch.clamp(ratio, max=delta) if delta else ratio) * advantages
        per_token = -torch.min(unclipped, clipped)
        if clip_ratio_c:
            per_token = torch.where(advantages < 0, torch.min(per_token, -clip_ratio_c * advantages), per_token)
        with torch.no_grad():
            low = ((ratio < 1 - epsilon) & (advantages < 0)).float()
            high = ((ratio > 1 + eps_high) & (advantages > 0)).float()
            if delta:
                low = low + ((ratio > delta) & (advantages < 0)).float()
            elif clip_ratio_c:
                low = low + ((ratio > clip_ratio_c) & (advantages < 0)).float()
    elif loss == "cispo":
        weight = torch.clamp(ratio, min=1 - epsilon if cispo_two_sided else None, max=eps_high).detach()
        per_token = -weight * advantages * logprobs
        with torch.no_grad():
            high = ((ratio > eps_high) & (advantages > 0)).float()
            low = ((ratio < 1 - epsilon) & (advantages < 0)).float() if cispo_two_sided else zero
    else:
        tau = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg).to(ratio.dtype)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
        low, high = zero, zero  # a soft gate clips nothing
    return per_token, {"clip_ratio": low + high, "clip_ratio/low": low, "clip_ratio/high": high}


def rloo_sequence_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate on whole completions, the policy loss of TRL's RLOOTrainer.

    ρ_i = π(y_i)/π_old(y_i) = exp(Σ_t (lp - old)), the ratio of the sequence's
    probability, and L_i = -min(ρ_i A_i, clip(ρ_i, 1-ε, 1+ε_h) A_i): RLOO
    (arXiv 2402.14740 §3) treats a completion as one action, so at ρ = 1 the
    gradient is -A_i Σ_t ∇log π(y_{i,t}) (a sum over tokens, not a mean).
    The caller averages L_i over completions.

    Shape: logprobs, old_logprobs, mask (B, T), advantages (B,) -> ((B,), stats of (B,) detached indicators).
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(masked_sum(logprobs - old_logprobs, mask, dim=-1))
    losses = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * advantages)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (advantages < 0)).float()
        high = ((ratio > 1 + eps_high) & (advantages > 0)).float()
    return losses, {"clip_ratio": low + high, "clip_ratio/low": low, "clip_ratio/high": high}


def loss_aggregation(loss_type: str) -> tuple[str, str]:
    """GRPO's ``loss_type`` -> (policy loss of ``policy_token_losses``, ``aggregate_loss`` mode).

    grpo, bnpo, dr_grpo and dapo differ only in aggregation; cispo and sapo
    also name their policy loss and aggregate as TRL does (cispo: tokens of the
    whole accumulated batch, as dapo; sapo: per-sequence mean, as grpo).
    """
    if loss_type == "cispo":
        return "cispo", "dapo"
    if loss_type == "sapo":
        return "sapo", "grpo"
    _check_choice("loss_type", loss_type, AGGREGATIONS)
    return "clip", loss_type


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "grpo",
    max_completion_length: int | None = None,
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar, the way each GRPO variant does.

    - grpo:    mean over each sequence's tokens, then over sequences
               (GRPO, arXiv 2402.03300 Eq. 3).
    - bnpo:    token mean over the batch: sum / sum(mask).
    - dr_grpo: sum / (B · max_completion_length), a constant normaliser free of
               length bias (Dr. GRPO, arXiv 2503.20783 Eq. 3).
    - dapo:    sum / number of tokens in the whole accumulated batch, passed as
               ``num_tokens`` (DAPO, arXiv 2503.14476 Eq. 8, token-level loss);
               without it this equals bnpo.

    Shape: per_token (B, T), mask (B, T) -> ().
    """
    _check_choice("loss_type", mode, AGGREGATIONS)
    if mode == "grpo":
        return masked_mean(per_token, mask, dim=-1).mean()
    if mode == "bnpo":
        return masked_mean(per_token, mask)
    if mode == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        return masked_sum(per_token, mask) / (per_token.shape[0] * max_completion_length)
    denominator = mask.sum() if num_tokens is None else num_tokens
    return masked_sum(per_token, mask) / torch.clamp(torch.as_tensor(denominator, dtype=per_token.dtype), min=1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position: -Σ p log p.

    Computed in float32 over chunks of positions, like ``selective_log_softmax``.
    Shape: logits (B, T, V) -> (B, T).
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    step = _rows_per_chunk(vocab)
    parts = []
    for start in range(0, flat.shape[0], step):
        logp = flat[start:start + step].float().log_softmax(-1)
        # p·log p is 0 where p is 0 (masked logits of -inf), not NaN
        parts.append(-torch.where(logp.isfinite(), logp.exp() * logp, 0.0).sum(-1))
    if not parts:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(parts).view(logits.shape[:-1])


# Tokens per chunk of the chunked LM head: 2^25 logits a chunk (128 MB in float32, 220 tokens at V = 151,936),
# the point past which larger chunks bought no more speed, only memory: 512 tokens at V = 151,936, H = 896 took
# 44 / 31 / 27 / 27 s with chunks of 32 / 96 / 220 / 512 tokens (CPU; benchmarks/logprob_memory.py --chunk-sweep)
HEAD_CHUNK_LOGITS = 1 << 25


def head_chunk_tokens(vocab: int) -> int:
    """Default token positions per chunk of ``chunked_head_logps`` for a vocabulary of ``vocab``."""
    return max(1, HEAD_CHUNK_LOGITS // max(1, vocab))


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.dtype]:
    """z = (h W^T + b) / T for one chunk, upcast to ``dtype``; also the dtype the head itself produced."""
    logits = F.linear(hidden, weight, bias)  # under the caller's autocast, as the model's own head runs
    scaled = logits.to(dtype)  # (gradients are off here, so the chunk is scaled in place)
    if temperature != 1.0:
        scaled.div_(temperature)
    return scaled, logits.dtype


class _ChunkedHeadLogps(torch.autograd.Function):
    """Forward and backward of ``chunked_head_logps``; the logits of a chunk live only while it is processed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_tokens, return_entropy, entropy_grad):
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        dtype = torch.promote_types(hidden.dtype, torch.promote_types(weight.dtype, torch.float32))
        n = hidden.shape[0]
        logps = hidden.new_empty(n, dtype=dtype)
        lse = hidden.new_empty(n, dtype=dtype)
        entropy = hidden.new_empty(n, dtype=dtype) if return_entropy else None
        ctx.logits_dtype = dtype
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            z, ctx.logits_dtype = _head_logits(hidden[rows], weight, bias, temperature, dtype)
            lse[rows] = z.logsumexp(-1)
            logps[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
            if return_entropy:  # -Σ p log p; head logits are finite, so there are no 0·(-inf) terms
                logp = z.sub_(lse[rows, None])
                entropy[rows] = -logp.exp().mul_(logp).sum(-1)
        ctx.temperature, ctx.chunk_tokens, ctx.dtype = temperature, chunk_tokens, dtype
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if entropy_grad else None)
        ctx.set_materialize_grads(False)
        if not return_entropy:
            return logps
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logps is None and (grad_entropy is None or entropy is None):
            return None, None, None, None, None, None, None, None
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=ctx.dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=ctx.dtype) if need_bias else None
        device_type, enabled, autocast_dtype = ctx.autocast
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                h = hidden[rows]
                logp = _head_logits(h, weight, bias, ctx.temperature, ctx.dtype)[0].sub_(lse[rows, None])
                # d log p_y / dz = onehot(y) - p and dH/dz = -p (log p + H), so with upstream a (log-probs)
                # and b (entropy): dL/dz = a·onehot(y) - p·(a + b·(log p + H)); two (C, V) buffers, in place
                grad_z = logp.exp()
                a = grad_logps[rows, None].to(ctx.dtype) if grad_logps is not None else None
                if grad_entropy is not None and entropy is not None:
                    coef = logp.add_(entropy[rows, None]).mul_(grad_entropy[rows, None].to(ctx.dtype))
                    grad_z.mul_(coef if a is None else coef.add_(a)).neg_()
                else:
                    grad_z.mul_(-a)
                del logp
                if a is not None:
                    grad_z.scatter_add_(1, targets[rows, None], a)
                if ctx.temperature != 1.0:
                    grad_z.div_(ctx.temperature)
                grad_logits = grad_z.to(ctx.logits_dtype)  # the dtype the head's own backward would see
                if need_hidden:
                    grad_hidden[rows] = (grad_logits @ weight).to(hidden.dtype)
                if need_weight and grad_logits.dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad_logits.t(), h)  # in place: no second (V, H) buffer
                elif need_weight:  # autocast: the bf16 product, summed in float32
                    grad_weight += grad_logits.t() @ h
                if need_bias:
                    grad_bias += grad_logits.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_head_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                       temperature: float = 1.0, chunk_tokens: int | None = None, return_entropy: bool = False,
                       entropy_grad: bool = False):
    """log softmax((h W^T + b) / T)[target] straight from the trunk's hidden states, never holding (B, T, V) logits.

    The LM head is applied to ``chunk_tokens`` positions at a time; the forward
    keeps only each position's logsumexp and target log-prob, and the backward
    recomputes each chunk's logits to form dL/dz = g·(onehot(y) - softmax(z))
    (the log-softmax gradient), then dL/dh = dL/dz·W and dL/dW = Σ dL/dzᵀ·h:
    the fused linear cross-entropy of Liger-Kernel (arXiv 2410.10989) and Cut
    Cross-Entropy (arXiv 2411.09009), with each chunk's logits recomputed in the
    backward instead of its gradient kept from the forward (so the upstream
    gradient may be anything, not only a mean loss known in advance).
    Extra memory is two chunks of logits, not B·T·V values.
    Under autocast the head runs in the autocast dtype in the forward and in the
    backward alike, as the model's own head would; statistics are float32.

    ``return_entropy`` adds the entropy -Σ p log p of softmax(z / T) at each
    position, detached unless ``entropy_grad`` (dH/dz = -p (log p + H)).

    Shape: hidden (..., H), weight (V, H), bias (V,) or None, targets (...) ->
    (...) float32 (float64 inputs stay float64), or (logps, entropy).
    """
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_tokens or head_chunk_tokens(weight.shape[0])
    out = _ChunkedHeadLogps.apply(flat_hidden, weight, bias, targets.reshape(-1), float(temperature), chunk,
                                  return_entropy, entropy_grad)
    if not return_entropy:
        return out.view(shape)
    return out[0].view(shape), out[1].view(shape)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over masked positions: how much of the return the
    critic explains (1 perfect, 0 no better than a constant, < 0 worse).

    The PPO "debug variable" of CleanRL / OpenAI baselines. Shape: (B, T) -> ().
    """
    mean_r = masked_mean(returns, mask)
    var_r = masked_mean((returns - mean_r) ** 2, mask)
    resid = returns - values
    mean_e = masked_mean(resid, mask)
    var_e = masked_mean((resid - mean_e) ** 2, mask)
    return 1 - var_e / var_r.clamp_min(1e-8)


def adaptive_kl_coef(kl_coef: float, current_kl: float, target_kl: float, n_steps: int, horizon: int) -> float:
    """The adaptive KL controller of Ziegler et al., arXiv 1909.08593 §2.2.

    e = clip(KL / KL_target - 1, -0.2, 0.2); β ← β·(1 + e·n / horizon), where
    KL is the mean per-sequence KL of the last batch and n its sample count.
    """
    error = min(max(current_kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def online_dpo_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The judged pair of each prompt's two sampled completions: the higher reward is chosen.

    Online DPO (Guo et al., arXiv 2402.04792, Algorithm 1: two responses from
    the current policy, an annotator's preference, the DPO loss on the pair);
    the annotator here is the reward sources. Rows 2i and 2i+1 are prompt i's
    two completions; a tie chooses the first sampled, as TRL's OnlineDPOTrainer
    (first >= second).

    Shape: rewards (2N,) -> (chosen (N,), rejected (N,)) row indices into the 2N rows.
    """
    first, second = rewards.view(-1, 2).unbind(1)
    first_wins = (first >= second).long()
    rows = 2 * torch.arange(first.shape[0], device=rewards.device)
    return rows + 1 - first_wins, rows + first_wins


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 0,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence between the teacher's and the student's next-token distributions.

    GKD, Agarwal et al. arXiv 2306.13649 Eq. 1 (and TRL's GKDTrainer.generalized_jsd_loss). With
    P = softmax(z_teacher / τ), Q = softmax(z_student / τ) and the mixture M = β·P + (1-β)·Q, per position

        JSD(β)(P || Q) = β·KL(P || M) + (1-β)·KL(Q || M),   KL(A || B) = Σ_v A_v (log A_v - log B_v)

    and at the two ends, as in TRL (where the formula itself would vanish):
    β = 0: KL(P || Q), the forward KL (supervised KD); β = 1: KL(Q || P) =
    Σ_v q_v (log q_v - log p_v), the reverse KL of on-policy distillation
    (mode-seeking; Thinking Machines' and Qwen3's per-token objective).

    ``top_k`` > 0 bounds memory by the teacher's k most likely tokens at each
    position: P is the teacher's distribution restricted to those k tokens and
    renormalised over them, Q is the student's likewise restricted to the same
    k tokens and renormalised, and the divergence above is of these two k-way
    distributions. Tokens outside the teacher's top k carry no loss and no
    gradient; with k = V (or a teacher whose mass lies within its top k) this
    is the full-vocabulary divergence.

    Shape: student_logits (..., V), teacher_logits (..., V) -> (...,), float32 (float64 stays float64).
    Gradient flows into student_logits only (teacher_logits are detached).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student, teacher = student_logits.to(dtype) / temperature, teacher_logits.detach().to(dtype) / temperature
    if top_k:
        teacher, index = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1)  # (..., k)
        student = student.gather(-1, index)
    log_q, log_p = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)

    def kl(log_a, log_b):  # KL(A || B) over the last dimension
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if beta == 0:
        return kl(log_p, log_q)
    if beta == 1:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 0,
) -> torch.Tensor:
    """Mean of ``generalized_jsd`` over the response tokens: Σ_t mask_t·JSD_t / Σ_t mask_t.

    GKD, arXiv 2306.13649 Eq. 1 averaged over the completion's tokens, as TRL's
    `batchmean` over the positions whose label is not -100: prompt and padding
    positions (mask 0) add nothing. Without a mask every position counts.

    Shape: student_logits (B, T, V), teacher_logits (B, T, V), mask (B, T) -> ().
    """
    per_token = generalized_jsd(student_logits, teacher_logits, beta, temperature, top_k)
    if mask is None:
        return per_token.mean()
    return masked_sum(per_token, mask) / mask.sum().clamp_min(1)
