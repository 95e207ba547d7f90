"""Median optimizer-step time of SFT and DPO on the embedded tiny model, fp32 vs bf16 autocast.

    .venv/bin/python benchmarks/step_time.py [--steps 30] [--batch 64]

Prints one JSON object. Both settings run in this one process, alternating, so
the ratio is measured under the same machine load; absolute times are not
comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from posttrain.data import collate_examples, collate_preferences, preference_examples, read_rows, sft_examples  # noqa: E402
from posttrain.losses import dpo_loss, masked_mean, sequence_logps  # noqa: E402
from posttrain.models import build_tiny_model, load_causal_lm, load_tokenizer, token_logps  # noqa: E402
from posttrain.tasks import arith  # noqa: E402
from posttrain.training import autocast  # noqa: E402


def sft_step(model, batch):
    return -masked_mean(token_logps(model, batch.input_ids, batch.attention_mask), batch.loss_mask)


def dpo_step(model, ref, batch):
    tokens = batch.tokens
    seq = sequence_logps(token_logps(model, tokens.input_ids, tokens.attention_mask), tokens.loss_mask)
    with torch.no_grad():
        ref_seq = sequence_logps(token_logps(ref, tokens.input_ids, tokens.attention_mask), tokens.loss_mask)
    half = seq.shape[0] // 2
    return dpo_loss(seq[:half], seq[half:], ref_seq[:half], ref_seq[half:])[0].mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = arith.write_datasets(tmp, num_sft=args.batch, num_preference=args.batch, num_prompts=8, num_eval=8)
        corpus = [line for p in paths.values() for line in p.read_text().splitlines()]
        model_dir = build_tiny_model(corpus, f"{tmp}/tiny")
        tokenizer = load_tokenizer(str(model_dir))
        model, ref = load_causal_lm(str(model_dir)), load_causal_lm(str(model_dir), trainable=False)
        sft_batch = collate_examples(sft_examples(read_rows(str(paths["sft"])), tokenizer, 16, 8), tokenizer.pad_token_id)
        pairs = preference_examples(read_rows(str(paths["preference"])), tokenizer, 16, 8)
        dpo_batch = collate_preferences(pairs, list(range(len(pairs))), tokenizer.pad_token_id)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        work = {"sft": lambda: sft_step(model, sft_batch), "dpo": lambda: dpo_step(model, ref, dpo_batch)}
        times = {f"{w}_{p}": [] for w in work for p in ("fp32", "bf16")}
        for step in range(args.steps + 3):
            for name, fn in work.items():
                for precision in ("fp32", "bf16"):
                    start = time.perf_counter()
                    with autocast(precision == "bf16"):
                        loss = fn()
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    if step >= 3:  # warm-up steps are not timed
                        times[f"{name}_{precision}"].append(time.perf_counter() - start)
    medians = {k: round(statistics.median(v) * 1000, 2) for k, v in times.items()}
    print(json.dumps({
        "threads": torch.get_num_threads(), "batch": args.batch, "steps": args.steps,
        "median_step_ms": medians,
        "bf16_speedup": {w: round(medians[f"{w}_fp32"] / medians[f"{w}_bf16"], 2) for w in work},
    }, indent=1))


if __name__ == "__main__":
    main()
