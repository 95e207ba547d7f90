"""On-policy distillation and Generalized Knowledge Distillation (GKD) from a frozen teacher.

    posttrain distill --model_name_or_path tiny --tiny_hidden_size 64 --teacher_model_name_or_path runs/sft \
        --dataset_name data/arith/sft.jsonl

Agarwal et al., arXiv 2306.13649 (GKD), with TRL GKDTrainer's fields and defaults. The
data are SFT rows (prompt/completion or messages). Each micro-batch:

  1. completions  with probability lmbda the student samples a completion for each prompt
                  (on-policy); otherwise the dataset's completions, or with seq_kd ones the
                  teacher samples (sequence-level KD)
  2. scores       student and teacher (no gradient) give their next-token logits at every
                  completion token
  3. loss         the generalised JSD of the two distributions (losses.generalized_jsd_loss:
                  beta 0 forward KL, 1 reverse KL), averaged over the completion tokens of
                  the whole optimizer step

lmbda 1 with beta 1 is on-policy distillation proper: the per-token reverse KL to the teacher on
the student's own samples. lmbda 0 with beta 0 is supervised KD on the dataset.

Departures from TRL, all deliberate: the coin is flipped once per global micro-batch from the
run's seeded Python RNG, so every rank (and a resumed run) flips the same coins, where TRL flips
per process; an on-policy micro-batch's loss is averaged over its sampled tokens (TRL's
num_items_in_batch counts the dataset completion's tokens). No task reward is mixed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from posttrain.data import PackedBatch, TokenBatch, collate_examples, sft_examples, sft_response_only, train_rows
from posttrain.errors import UserError
from posttrain.evaluation import sft_evaluation
from posttrain.losses import generalized_jsd_loss
from posttrain.models import (
    disable_dropout,
    load_causal_lm,
    load_frozen_model,
    load_options,
    load_tokenizer,
    position_ids_from_mask,
    prepare_for_training,
    prepare_model,
    unwrap_peft,
)
from posttrain.recipes.sft import corpus_of, sft_loss
from posttrain.rollout import build_engine, sampling_stream
from posttrain.training import autocast, finish, fit, setup_run


@dataclass
class Completions:
    """A micro-batch of prompt + completion rows and where its completions came from."""

    tokens: TokenBatch | PackedBatch  # loss_mask (B, L-1): 1 where position t predicts a completion token
    source: str  # dataset | student | teacher

    def to(self, device) -> Completions:
        return Completions(self.tokens.to(device), self.source)

    def __len__(self) -> int:
        return len(self.tokens)


def load_teacher(cfg, tokenizer, student):
    """The frozen teacher; refused unless it shares the student's tokenizer and vocabulary width."""
    field = "teacher_model_name_or_path"
    theirs = load_tokenizer(cfg.teacher_model_name_or_path, field)
    teacher = load_frozen_model(cfg, cfg.teacher_model_name_or_path, field)
    widths = [unwrap_peft(m).config.vocab_size for m in (student, teacher)]
    if theirs.get_vocab() != tokenizer.get_vocab() or widths[0] != widths[1]:
        raise UserError(f"field {field!r}: {cfg.teacher_model_name_or_path!r} does not share the student's tokenizer "
                        f"({cfg.model_name_or_path}; vocabulary widths {widths[1]} and {widths[0]}); distillation "
                        "compares next-token distributions over one shared vocabulary")
    return teacher


@torch.no_grad()
def sampled_completions(cfg, engine, prompt_ids: list[list[int]], key: int) -> TokenBatch:
    """Step 1: one completion per prompt from ``engine`` (student or teacher), laid out for scoring."""
    with sampling_stream(cfg.seed, key), autocast(cfg.bf16):
        gen = engine.generate(prompt_ids)
    prompt_width = gen.input_ids.shape[1] - gen.completion_mask.shape[1]
    # position t predicts token t+1: the completion's tokens are predicted from position prompt_width - 1 on
    prompt_part = gen.completion_mask.new_zeros(gen.completion_mask.shape[0], prompt_width - 1)
    return TokenBatch(gen.input_ids, gen.attention_mask, torch.cat([prompt_part, gen.completion_mask], dim=1))


def completion_logits(model, tokens) -> torch.Tensor:
    """Step 2: (N, V) next-token logits at the N positions loss_mask marks."""
    position_ids = tokens.position_ids if tokens.position_ids is not None else position_ids_from_mask(tokens.attention_mask)
    out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[:, :-1][tokens.loss_mask.bool()]


def distill_loss(cfg, student, teacher, batch: Completions):
    """Steps 2-3 on one micro-batch: the generalised JSD averaged over its completion tokens, and stats."""
    student_logits = completion_logits(student, batch.tokens)
    with torch.no_grad():
        teacher_logits = completion_logits(teacher, batch.tokens)
    ones = student_logits.new_ones(student_logits.shape[0])  # positions were selected already; guards an empty batch
    loss = generalized_jsd_loss(student_logits, teacher_logits, ones, cfg.beta, top_k=cfg.teacher_top_k)
    stats = {"num_tokens": batch.tokens.loss_mask.sum(), "on_policy": loss.new_tensor(float(batch.source == "student"))}
    return loss, stats


def main(cfg) -> None:
    # 1. set-up: SFT rows, the student (the embedded `tiny` is built from the rows' text), the frozen teacher
    setup_run(cfg)
    rows = train_rows(cfg)
    model_path = prepare_model(cfg.model_name_or_path, cfg, lambda: corpus_of(rows))
    tokenizer = load_tokenizer(model_path, chat_template_path=cfg.chat_template_path, eos_token=cfg.eos_token)
    student = load_causal_lm(model_path, allow_pickle=cfg.allow_pickle, **load_options(cfg))
    if cfg.disable_dropout:
        disable_dropout(student)
    student = prepare_for_training(student, cfg)
    teacher = load_teacher(cfg, tokenizer, student)

    # 2. tokenise once; the sampling engines share the models' weights
    examples = sft_examples(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.dataset_text_field)
    if (cfg.lmbda > 0 or cfg.seq_kd) and not all(e.prompt_ids for e in examples):
        raise UserError(f"dataset_name: {cfg.dataset_name}: sampled completions need a prompt in every row (prompt/"
                        "completion or messages rows); plain-text rows train only with lmbda 0 and seq_kd false")
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
    response_only = sft_response_only(rows[0], cfg.completion_only_loss, cfg.assistant_only_loss, warn=True)
    students = build_engine(cfg, student, tokenizer)
    teachers = build_engine(cfg, teacher, tokenizer) if cfg.seq_kd else None

    def make_batch(indices):
        # one coin (and sampling key) per global micro-batch, drawn alike on every rank from the seeded,
        # checkpointed Python RNG, so the same batches are on-policy on any number of ranks and after a resume
        coin, key = random.random(), random.getrandbits(32)
        chosen = [examples[i] for i in indices]
        if coin <= cfg.lmbda:  # TRL: random.random() <= lmbda
            return Completions(sampled_completions(cfg, students, [e.prompt_ids for e in chosen], key), "student")
        if cfg.seq_kd:
            return Completions(sampled_completions(cfg, teachers, [e.prompt_ids for e in chosen], key), "teacher")
        return Completions(collate_examples(chosen, tokenizer.pad_token_id, response_only, cfg.padding_free), "dataset")

    # held-out: the student's NLL of held-out completions and greedy accuracy on rows with an `answer`
    evaluate = sft_evaluation(cfg, student, tokenizer, lambda batch: sft_loss(student, batch))

    # 3. train: the loss is a token mean, so accumulated micro-batches weigh by their completion tokens
    record = fit(cfg, student, lengths, make_batch, lambda batch: distill_loss(cfg, student, teacher, batch), evaluate,
                 desc="distill", batch_weight=lambda batch: float(batch.tokens.loss_mask.sum()))

    # 4. save the student
    finish(cfg, student, tokenizer, record, "Distill", {"model_copies": {"policy": 1, "teacher": 1}})
