"""Kahneman-Tversky Optimization (KTO) on rows labelled desirable or undesirable.

    posttrain kto --model_name_or_path runs/sft --dataset_name data/arith/preference.jsonl

Ethayarajh et al., arXiv 2402.01306, with TRL 1.16 KTOTrainer's semantics. Rows
are {"prompt", "completion", "label"}, or preference pairs unpaired (chosen:
desirable, rejected: undesirable). Each row's loss compares its log-ratio
r = log π/π_ref with the reference point z0, the KL of π to π_ref estimated on
mismatched pairs: every prompt of the global micro-batch with the response of
the row before it (the first with the last's), as TRL pairs them. z0 is their
mean log-ratio over every rank's rows, detached and clamped at 0
(losses.kto_loss). loss_type apo_zero_unpaired needs no z0 and skips those pairs.

Departures from TRL: the pairs are built over the micro-batch actually drawn
(TRL fixes them over consecutive rows of its sequential sampler), so posttrain
can shuffle; z0 is the row-weighted mean over ranks, the mean of TRL's
per-rank means when ranks hold equal shares. The reference is not precomputed
(z0's pairs change with the batches).
"""

from __future__ import annotations

import sys

import torch

from posttrain import distributed
from posttrain.data import collate_unpaired, mismatched_examples, train_rows, unpaired_examples
from posttrain.errors import UserError
from posttrain.losses import kto_loss
from posttrain.models import load_policy_and_reference, reference_mode, token_logps
from posttrain.training import finish, fit, setup_run


def response_logps(model, tokens) -> torch.Tensor:
    """(B,) summed log-probs of each row's response tokens."""
    logps = token_logps(model, tokens.input_ids, tokens.attention_mask, position_ids=tokens.position_ids,
                        score_mask=tokens.loss_mask)  # the head runs on response tokens only
    return tokens.sequence_logps(logps)


def kto_step(cfg, policy, ref, batch):
    """Loss and TRL-named stats of one micro-batch (this rank's share of the global one)."""
    with torch.no_grad():  # first, so that DDP sees the one forward with gradients just before its backward
        with reference_mode(policy, ref) as ref_model:
            ref_logps = response_logps(ref_model, batch.tokens)
            ref_kl_logps = None if batch.kl_tokens is None else response_logps(ref_model, batch.kl_tokens)
        kl = None
        if batch.kl_tokens is not None:
            # z0's estimate: the mean log-ratio of the mismatched pairs over every rank's rows
            kl_logratio = (response_logps(policy, batch.kl_tokens) - ref_kl_logps).float()
            total = distributed.all_sum(torch.stack([kl_logratio.sum(), torch.tensor(float(len(batch)), device=kl_logratio.device)]))
            kl = total[0] / total[1]
    policy_logps = response_logps(policy, batch.tokens)
    losses, rewards, z0 = kto_loss(policy_logps, ref_logps, batch.label, kl, cfg.beta, cfg.loss_type,
                                   cfg.desirable_weight, cfg.undesirable_weight)

    # TRL's figures per micro-batch: sums over every rank's desirable (chosen) and undesirable (rejected) rows
    chosen, logps = batch.label.float(), policy_logps.detach().float()
    sums = distributed.all_sum(torch.stack([chosen.sum(), (1 - chosen).sum(), (rewards * chosen).sum(),
                                            (rewards * (1 - chosen)).sum(), (logps * chosen).sum(),
                                            (logps * (1 - chosen)).sum()]).detach()).tolist()
    n_chosen, n_rejected = sums[0], sums[1]
    stats = {"kl": z0}
    if n_chosen:
        stats.update({"rewards/chosen": sums[2] / n_chosen, "logps/chosen": sums[4] / n_chosen})
    if n_rejected:
        stats.update({"rewards/rejected": sums[3] / n_rejected, "logps/rejected": sums[5] / n_rejected})
    if n_chosen and n_rejected:
        stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return losses.mean(), stats


def warn_unbalanced(cfg, examples) -> None:
    """TRL's advice when desirable and undesirable rows differ in number: λ_D·n_D / (λ_U·n_U) in [1, 4/3] (KTO Eq. 8)."""
    n_d = max(sum(e.label for e in examples), 1)
    n_u = max(len(examples) - n_d, 1)
    ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
    if n_d != n_u and not 1 <= ratio <= 4 / 3 and distributed.is_main():
        low, high = n_u * cfg.undesirable_weight / n_d, 4 / 3 * n_u * cfg.undesirable_weight / n_d
        print(f"posttrain: warning: {n_d} desirable and {n_u} undesirable rows with desirable_weight "
              f"{cfg.desirable_weight} and undesirable_weight {cfg.undesirable_weight}; KTO suggests desirable_weight "
              f"in [{low:.2f}, {high:.2f}] (λ_D·n_D / (λ_U·n_U) in [1, 4/3])", file=sys.stderr)


def main(cfg) -> None:
    # 1. run set-up, policy and reference
    setup_run(cfg)
    rows = train_rows(cfg)
    needs_kl = cfg.loss_type == "kto"
    if needs_kl and cfg.per_device_train_batch_size * distributed.world_size() < 2:
        raise UserError("field 'per_device_train_batch_size': KTO's reference point needs at least 2 rows per "
                        "micro-batch over all ranks (with one, its mismatched pair is the row itself)")
    tokenizer, policy, ref = load_policy_and_reference(cfg)

    # 2. tokenise the rows (pairs unpaired)
    examples = unpaired_examples(rows, tokenizer, cfg.max_length, cfg.max_prompt_length)
    warn_unbalanced(cfg, examples)
    lengths = [len(e.example.prompt_ids) + len(e.example.completion_ids) for e in examples]

    def make_batch(indices):
        # every rank pairs the whole global micro-batch, then keeps its share: N ranks see the pairs of one process
        batch = [examples[i] for i in indices]
        mismatched = mismatched_examples([e.example for e in batch], cfg.max_length) if needs_kl else None
        mine = distributed.rank_share(list(range(len(batch))))
        mismatched = None if mismatched is None else [mismatched[p] for p in mine]
        return collate_unpaired([batch[p] for p in mine], mismatched, tokenizer.pad_token_id, cfg.padding_free)

    # 3. train
    record = fit(cfg, policy, lengths, make_batch, lambda batch: kto_step(cfg, policy, ref, batch), desc="kto",
                 shares_itself=True)

    # 4. save
    finish(cfg, policy, tokenizer, record, "KTO", {"model_copies": {"policy": 1, "reference": int(ref is not None)}})
