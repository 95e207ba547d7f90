"""Supervised fine-tuning: next-token NLL on the completion / assistant tokens.

    posttrain sft --dataset_name data/arith/sft.jsonl --output_dir runs/sft
    posttrain sft --config configs/sft_tiny.yaml

The loss is the mean over response tokens of the whole micro-batch (every
token weighs the same, as in TRL's SFTTrainer), not a mean of per-sequence
means. As in TRL, ``completion_only_loss: false`` trains the prompt tokens of prompt/completion rows too, and
``assistant_only_loss: false`` every turn of `messages` rows.
"""

from __future__ import annotations

from posttrain.data import collate_examples, sft_examples, sft_response_only, train_rows
from posttrain.evaluation import sft_evaluation
from posttrain.losses import masked_mean
from posttrain.models import load_causal_lm, load_options, load_tokenizer, prepare_for_training, prepare_model, token_logps
from posttrain.training import finish, fit, setup_run


def corpus_of(rows) -> list[str]:
    """Every string in the rows: what the embedded tiny tokenizer is trained on."""
    texts = []
    for row in rows:
        for value in row.data.values():
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                messages = [m for m in value if isinstance(m, dict)]
                texts += [str(m.get("content", "")) for m in messages] + [str(m.get("role", "")) for m in messages]
    return texts


def sft_loss(model, batch):
    """Mean NLL of the response tokens. Returns (loss, stats)."""
    # (B, L-1), packed (1, N-1); the LM head runs on the loss's tokens only
    logps = token_logps(model, batch.input_ids, batch.attention_mask, position_ids=batch.position_ids, score_mask=batch.loss_mask)
    loss = -masked_mean(logps, batch.loss_mask)
    return loss, {"num_tokens": batch.loss_mask.sum()}


def main(cfg) -> None:
    # 1. run set-up, data rows, model (the embedded `tiny` is built from the rows' text)
    setup_run(cfg)
    rows = train_rows(cfg)
    model_path = prepare_model(cfg.model_name_or_path, cfg, lambda: corpus_of(rows))
    tokenizer = load_tokenizer(model_path, chat_template_path=cfg.chat_template_path, eos_token=cfg.eos_token)
    model = prepare_for_training(load_causal_lm(model_path, allow_pickle=cfg.allow_pickle, **load_options(cfg)), cfg)

    # 2. tokenise once; batches are collated on the fly with dynamic padding (or packed: padding_free)
    examples = sft_examples(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.dataset_text_field)
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
    response_only = sft_response_only(rows[0], cfg.completion_only_loss, cfg.assistant_only_loss, warn=True)

    def make_batch(indices):
        return collate_examples([examples[i] for i in indices], tokenizer.pad_token_id, response_only, cfg.padding_free)

    evaluate = sft_evaluation(cfg, model, tokenizer, lambda batch: sft_loss(model, batch))  # held-out loss, accuracy

    # 3. train
    # the loss is a token mean, so accumulated micro-batches weigh by their response tokens
    record = fit(cfg, model, lengths, make_batch, lambda batch: sft_loss(model, batch), evaluate, desc="sft",
                 batch_weight=lambda batch: float(batch.loss_mask.sum()))

    # 4. save the model in Hugging Face format, plots and summary
    finish(cfg, model, tokenizer, record, "SFT", {"model_copies": {"policy": 1}})
