"""Direct Preference Optimization (and IPO, hinge, ...) on preference pairs; also posttrain cpo and orpo.

    posttrain dpo --model_name_or_path runs/sft --dataset_name data/arith/preference.jsonl
    posttrain cpo --model_name_or_path runs/sft --dataset_name data/arith/preference.jsonl [--loss_type simpo]
    posttrain orpo --model_name_or_path runs/sft --dataset_name data/arith/preference.jsonl

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

posttrain cpo (CPO, Xu et al. arXiv 2401.08417; SimPO, Meng et al. arXiv 2405.14734,
as loss_type simpo) and posttrain orpo (ORPO, Hong et al. arXiv 2403.07691) are
this loop with a reference-free loss (cpo_step, orpo_step): no reference model is
loaded. Their NLL of the chosen responses is each response's mean token NLL
averaged over pairs, as rpo_alpha's; TRL's CPO / ORPO trainers take one token mean
over the micro-batch's chosen tokens (the same when the responses are equally long),
which would make the loss depend on how a batch is split into micro-batches and
ranks. TRL's ORPO also counts the prompt tokens in that NLL; posttrain's counts the
response, as everywhere (completion-only).
"""

from __future__ import annotations

import torch

from posttrain.data import collate_preferences, preference_examples, train_rows
from posttrain.distributed import device
from posttrain.evaluation import pair_evaluation
from posttrain.losses import cpo_loss, dpo_loss, orpo_loss
from posttrain.modelcard import stage_of
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
        chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.loss_weights or None)
    loss = losses.mean()
    stats = {}
    if cfg.rpo_alpha:
        nll = chosen_nll(batch, logps, chosen.shape[0])
        loss = loss + cfg.rpo_alpha * nll
        stats["nll_loss"] = nll.detach()
    stats.update(pair_stats(chosen, rejected, chosen_rewards, rejected_rewards))
    return loss, stats


def chosen_nll(batch, logps: torch.Tensor, pairs: int) -> torch.Tensor:
    """The chosen responses' mean token NLL, averaged over pairs (the first ``pairs`` rows are the chosen ones)."""
    return -batch.tokens.sequence_logps(logps, "mean")[:pairs].mean()


def pair_stats(chosen, rejected, chosen_rewards, rejected_rewards) -> dict:
    """TRL's names of a preference batch's figures, from its (B,) log-probs and rewards."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    }


def cpo_step(cfg, policy, batch):
    """posttrain cpo: the reference-free loss of loss_type plus cpo_alpha x the chosen responses' NLL."""
    normalization = "mean" if cfg.loss_type in ("ipo", "simpo") else "sum"  # as TRL's CPOTrainer scores them
    chosen, rejected, logps = pair_logps(policy, batch, normalization)
    losses, chosen_rewards, rejected_rewards = cpo_loss(chosen, rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing,
                                                        cfg.simpo_gamma)
    nll = chosen_nll(batch, logps, chosen.shape[0])
    loss = losses.mean() + cfg.cpo_alpha * nll
    return loss, {"nll_loss": nll.detach(), **pair_stats(chosen, rejected, chosen_rewards, rejected_rewards)}


def orpo_step(cfg, policy, batch):
    """posttrain orpo: the chosen responses' NLL plus beta (λ) x the odds-ratio term, on mean token log-probs."""
    chosen, rejected, _ = pair_logps(policy, batch, "mean")
    losses, chosen_rewards, rejected_rewards, odds = orpo_loss(chosen, rejected, cfg.beta)
    nll = -chosen.mean()  # mean token log-probs: the chosen responses' NLL, as chosen_nll
    loss = nll + losses.mean()
    return loss, {"nll_loss": nll.detach(), **odds, **pair_stats(chosen, rejected, chosen_rewards, rejected_rewards)}


TITLES = {"dpo": "DPO", "cpo": "CPO", "orpo": "ORPO"}


def main(cfg) -> None:
    # 1. run set-up, policy and reference (cpo and orpo have none: their losses are reference-free)
    stage = stage_of(cfg)
    setup_run(cfg)
    rows = train_rows(cfg)
    tokenizer, policy, ref = load_policy_and_reference(cfg, need_reference=stage == "dpo")
    # the stage's loss and stats of one micro-batch, given its reference table (precompute_ref_log_probs) or None
    step = {"dpo": lambda batch, table: dpo_step(cfg, policy, ref, batch, table),
            "cpo": lambda batch, table: cpo_step(cfg, policy, batch),
            "orpo": lambda batch, table: orpo_step(cfg, policy, batch)}[stage]

    # 2. tokenise the pairs
    pairs = preference_examples(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length)
    lengths = [max(len(p.chosen.prompt_ids) + len(p.chosen.completion_ids),
                   len(p.rejected.prompt_ids) + len(p.rejected.completion_ids)) for p in pairs]

    def make_batch(indices):
        return collate_preferences([pairs[i] for i in indices], indices, tokenizer.pad_token_id, cfg.padding_free)

    # held-out pairs: the stage's loss, rewards/accuracies and rewards/margins (their reference scored now, when precomputed)
    evaluate = pair_evaluation(cfg, policy, tokenizer, step,
                               lambda held_out, batch_of: precompute_reference(cfg, policy, ref, held_out, batch_of))

    # 3. optionally score every pair with the reference once, then free it
    ref_table = None
    if getattr(cfg, "precompute_ref_log_probs", False):
        ref_table = precompute_reference(cfg, policy, ref, pairs, make_batch)
        ref = None

    # 4. train
    record = fit(cfg, policy, lengths, make_batch, lambda batch: step(batch, ref_table), evaluate, desc=stage)

    # 5. save
    finish(cfg, policy, tokenizer, record, TITLES[stage], {"model_copies": {"policy": 1, "reference": int(ref is not None)}})
