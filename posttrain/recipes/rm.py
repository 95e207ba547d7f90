"""Reward model: a transformer trunk with a scalar head, trained on preference pairs.

    posttrain rm --model_name_or_path runs/sft --dataset_name data/arith/preference.jsonl

Bradley-Terry loss -log σ(r(x, y_w) - r(x, y_l) - m) (InstructGPT, arXiv
2203.02155 Eq. 1; the per-pair margin m is Llama 2's). The score is read at the
last non-padding token. ``center_rewards_coefficient`` adds
c·mean((r_w + r_l)²) (Eisenstein et al., arXiv 2312.09244) so rewards stay near
0. The model is saved as AutoModelForSequenceClassification (num_labels=1),
with a pad token distinct from EOS so that transformers' own forward, which
pools at the last non-pad token, reads the score where training read it.
"""

from __future__ import annotations

import random

import torch

from posttrain.data import collate_preferences, preference_examples, read_rows
from posttrain.distributed import device
from posttrain.errors import UserError
from posttrain.losses import reward_model_loss
from posttrain.models import (
    disable_dropout,
    load_options,
    load_scalar_model,
    load_tokenizer,
    prepare_for_training,
    sequence_scores,
)
from posttrain.training import autocast, finish, fit, setup_run

PAD_TOKEN = "<|pad|>"  # added only when the tokenizer's pad would otherwise be its EOS


def use_distinct_pad(model, tokenizer) -> None:
    """Give the tokenizer a pad that is not EOS and write its id into the model's config.

    transformers' sequence-classification forward pools at the last token that
    is not ``config.pad_token_id``; posttrain reads the last attended token. With
    pad == eos the saved model would skip each row's final EOS and score the
    token before it. A dedicated pad (with an embedding row grown for it when the
    vocabulary has no spare slot) makes both read the same position.
    """
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def pair_scores(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen (B,) and rejected (B,) from one forward over 2B rows."""
    tokens = batch.tokens
    scores = sequence_scores(model, tokens.input_ids, tokens.attention_mask)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def rm_step(cfg, model, batch):
    chosen, rejected = pair_scores(model, batch)
    margin = batch.margin if bool((batch.margin != 0).any()) else None
    loss = reward_model_loss(chosen, rejected, margin)
    if cfg.center_rewards_coefficient:
        loss = loss + cfg.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    return loss, {
        "accuracy": (chosen > rejected).float().mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
    }


@torch.no_grad()
def pair_accuracy(cfg, model, pairs, make_batch) -> float:
    """Fraction of held-out pairs whose chosen response scores higher."""
    was_training = model.training
    model.eval()
    correct = 0
    size = cfg.per_device_train_batch_size * 2
    for start in range(0, len(pairs), size):
        with autocast(cfg.bf16):
            batch = make_batch(list(range(start, min(start + size, len(pairs))))).to(device())
            chosen, rejected = pair_scores(model, batch)
        correct += int((chosen > rejected).sum())
    model.train(was_training)
    return correct / max(1, len(pairs))


def split_pairs(cfg, rows):
    """(train rows, eval rows): eval_dataset_name, else a seeded eval_split of the rows."""
    if cfg.eval_dataset_name:
        return rows, read_rows(cfg.eval_dataset_name, "eval_dataset_name")
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = int(len(rows) * cfg.eval_split)
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def main(cfg) -> None:
    # 1. run set-up; the trunk comes from the policy folder, the scalar head starts at 0
    setup_run(cfg)
    train_rows, eval_rows = split_pairs(cfg, read_rows(cfg.dataset_name))
    tokenizer = load_tokenizer(cfg.model_name_or_path, chat_template_path=cfg.chat_template_path, eos_token=cfg.eos_token)
    model = load_scalar_model(cfg.model_name_or_path, "model_name_or_path", allow_pickle=cfg.allow_pickle,
                              **load_options(cfg))
    if cfg.disable_dropout:  # chosen and rejected are scored by the same deterministic function
        disable_dropout(model)
    use_distinct_pad(model, tokenizer)
    if cfg.use_peft:  # never silently train every weight when adapters were asked for
        raise UserError("use_peft: LoRA is not offered for reward models yet (the scalar head needs the full trunk); "
                        "drop --use_peft")
    model = prepare_for_training(model, cfg)  # checkpointing, then DDP / FSDP2 under torchrun

    # 2. tokenise the pairs
    train = preference_examples(train_rows, tokenizer, cfg.max_length, cfg.max_prompt_length)
    held_out = preference_examples(eval_rows, tokenizer, cfg.max_length, cfg.max_prompt_length) if eval_rows else []
    lengths = [len(p.chosen.prompt_ids) + max(len(p.chosen.completion_ids), len(p.rejected.completion_ids)) for p in train]

    def batch_of(pairs):
        return lambda idx: collate_preferences([pairs[i] for i in idx], idx, tokenizer.pad_token_id)

    evaluate = (lambda: {"eval/pair_accuracy": pair_accuracy(cfg, model, held_out, batch_of(held_out))}) if held_out else None

    # 3. train
    record = fit(cfg, model, lengths, batch_of(train), lambda batch: rm_step(cfg, model, batch), evaluate, desc="rm")

    # 4. save (AutoModelForSequenceClassification loads it) with the held-out accuracy
    accuracy = pair_accuracy(cfg, model, held_out, batch_of(held_out)) if held_out else None
    finish(cfg, model, tokenizer, record, "Reward model",
           {"report": {"pair_accuracy": accuracy, "eval_pairs": len(held_out)}, "model_copies": {"reward_model": 1}})
