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

from posttrain.data import collate_preferences, eval_rows, preference_examples, train_rows
from posttrain.evaluation import pair_evaluation
from posttrain.losses import reward_model_loss
from posttrain.models import (
    disable_dropout,
    load_options,
    load_scalar_model,
    load_tokenizer,
    prepare_for_training,
    token_values,
)
from posttrain.training import finish, fit, setup_run

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
    """Scores of chosen (B,) and rejected (B,) from one forward over 2B rows, each read at its last token."""
    tokens = batch.tokens
    values = token_values(model, tokens.input_ids, tokens.attention_mask, position_ids=tokens.position_ids)
    scores = tokens.at_last_token(values)  # (2B,)
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


def split_pairs(cfg, rows):
    """(train rows, eval rows): eval_dataset_name or dataset_name's test split, else a seeded eval_split of the rows."""
    held_out = eval_rows(cfg, always=True)
    if held_out is not None:
        return rows, held_out
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = int(len(rows) * cfg.eval_split)
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def main(cfg) -> None:
    # 1. run set-up; the trunk comes from the policy folder, the scalar head starts at 0
    setup_run(cfg)
    train, held_out = split_pairs(cfg, train_rows(cfg))
    tokenizer = load_tokenizer(cfg.model_name_or_path, chat_template_path=cfg.chat_template_path, eos_token=cfg.eos_token)
    model = load_scalar_model(cfg.model_name_or_path, "model_name_or_path", allow_pickle=cfg.allow_pickle,
                              **load_options(cfg))
    if cfg.disable_dropout:  # chosen and rejected are scored by the same deterministic function
        disable_dropout(model)
    use_distinct_pad(model, tokenizer)
    model = prepare_for_training(model, cfg)  # checkpointing, LoRA (adapters + score head), DDP / FSDP2 under torchrun

    # 2. tokenise the pairs
    train = preference_examples(train, tokenizer, cfg.max_length, cfg.max_prompt_length)
    lengths = [len(p.chosen.prompt_ids) + max(len(p.chosen.completion_ids), len(p.rejected.completion_ids)) for p in train]

    def make_batch(idx):
        return collate_preferences([train[i] for i in idx], idx, tokenizer.pad_token_id, cfg.padding_free)

    # held-out pairs: rm_step's loss and stats, its accuracy named eval/pair_accuracy
    evaluate = pair_evaluation(cfg, model, tokenizer, lambda batch, _: rm_step(cfg, model, batch),
                               rename={"accuracy": "pair_accuracy"}, rows=held_out)

    # 3. train
    record = fit(cfg, model, lengths, make_batch, lambda batch: rm_step(cfg, model, batch), evaluate, desc="rm")

    # 4. save (AutoModelForSequenceClassification loads it) with the held-out accuracy
    accuracy = evaluate()["eval/pair_accuracy"] if evaluate else None
    finish(cfg, model, tokenizer, record, "Reward model",
           {"report": {"pair_accuracy": accuracy, "eval_pairs": len(held_out)}, "model_copies": {"reward_model": 1}})
