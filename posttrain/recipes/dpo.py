"""Direct Preference Optimization (and IPO, hinge) on preference pairs.

    posttrain dpo --model_name_or_path runs/sft --dataset_name data/arith/preference.jsonl

Rafailov et al., arXiv 2305.18290. Chosen and rejected rows go through the
policy in one batched forward (2B rows), so both sides get gradients (the
chosen side is never scored under no_grad). The reference is the
starting policy unless ``ref_model_name_or_path`` says otherwise; with LoRA it
is the base model with adapters off; with ``precompute_ref_log_probs`` it is
run once over the data and then freed.

Departures from the paper, all opt-in: ``logps_normalization: mean`` (per-token
average log-probs; the default for IPO, whose target assumes them), ``label_smoothing``
(conservative DPO), ``rpo_alpha`` (adds the chosen response's length-normalised
NLL, Pang et al. arXiv 2404.19733 Eq. 5, a guard against chosen log-probs falling).
"""

from __future__ import annotations

import torch

from posttrain.data import collate_preferences, preference_examples, train_rows
from posttrain.distributed import device
from posttrain.evaluation import pair_evaluation
from posttrain.losses import dpo_loss
from posttrain.models import load_policy_and_reference, reference_mode, token_logps
from posttrain.training import autocast, finish, fit, setup_run


def pair_logps(model, batch, normalization: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs from one forward over 2B rows.

    Returns (chosen (B,), rejected (B,), token log-probs (2B, L-1), or (1, N-1) when packed).
    """
    tokens = batch.tokens
    logps = token_logps(model, tokens.input_ids, tokens.attention_mask, position_ids=tokens.position_ids,
                        score_mask=tokens.loss_mask)  # the head runs on response tokens only
    seq = tokens.sequence_logps(logps, normalization)  # (2B,)
    half = seq.shape[0] // 2
    return seq[:half], seq[half:], logps


@torch.no_grad()
def precompute_reference(cfg, policy, ref, pairs, make_batch) -> torch.Tensor:
    """(N, 2) reference log-probs of every pair (chosen, rejected), in one pass."""
    out = torch.zeros(len(pairs), 2, device=device())
    size = cfg.per_device_train_batch_size * 2
    with reference_mode(policy, ref) as model:
        model.eval()
        for start in range(0, len(pairs), size):
            batch = make_batch(list(range(start, min(start + size, len(pairs))))).to(device())
            with autocast(cfg.bf16):
                chosen, rejected, _ = pair_logps(model, batch, cfg.logps_normalization)
            out[batch.index] = torch.stack([chosen, rejected], 1).float()
    policy.train()
    return out


def dpo_step(cfg, policy, ref, batch, ref_table: torch.Tensor | None):
    """Loss and TRL-named stats of one micro-batch of pairs."""
    chosen, rejected, logps = pair_logps(policy, batch, cfg.logps_normalization)
    if ref_table is not None:
        ref_chosen, ref_rejected = ref_table[batch.index, 0], ref_table[batch.index, 1]
    else:
        with torch.no_grad(), reference_mode(policy, ref) as ref_model:
            ref_chosen, ref_rejected, _ = pair_logps(ref_model, batch, cfg.logps_normalization)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    loss = losses.mean()
    stats = {}
    if cfg.rpo_alpha:
        nll = -batch.tokens.sequence_logps(logps, "mean")[:chosen.shape[0]].mean()  # chosen rows' mean token NLL
        loss = loss + cfg.rpo_alpha * nll
        stats["nll_loss"] = nll.detach()
    stats.update({
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    })
    return loss, stats


def main(cfg) -> None:
    # 1. run set-up, policy and reference
    setup_run(cfg)
    rows = train_rows(cfg)
    tokenizer, policy, ref = load_policy_and_reference(cfg)

    # 2. tokenise the pairs
    pairs = preference_examples(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length)
    lengths = [max(len(p.chosen.prompt_ids) + len(p.chosen.completion_ids),
                   len(p.rejected.prompt_ids) + len(p.rejected.completion_ids)) for p in pairs]

    def make_batch(indices):
        return collate_preferences([pairs[i] for i in indices], indices, tokenizer.pad_token_id, cfg.padding_free)

    # held-out pairs: dpo_step's loss, rewards/accuracies and rewards/margins (their reference scored now, when precomputed)
    evaluate = pair_evaluation(cfg, policy, tokenizer, lambda batch, table: dpo_step(cfg, policy, ref, batch, table),
                               lambda held_out, batch_of: precompute_reference(cfg, policy, ref, held_out, batch_of))

    # 3. optionally score every pair with the reference once, then free it
    ref_table = None
    if cfg.precompute_ref_log_probs:
        ref_table = precompute_reference(cfg, policy, ref, pairs, make_batch)
        ref = None

    # 4. train
    record = fit(cfg, policy, lengths, make_batch, lambda batch: dpo_step(cfg, policy, ref, batch, ref_table), evaluate, desc="dpo")

    # 5. save
    finish(cfg, policy, tokenizer, record, "DPO", {"model_copies": {"policy": 1, "reference": int(ref is not None)}})
