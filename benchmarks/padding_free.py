"""SFT and DPO step time (forward + backward), right-padded batches vs padding-free packed ones.

    .venv/bin/python benchmarks/padding_free.py [--hidden 768 --layers 8 --vocab 32000 --batch 8]
        [--min_length 64 --max_length 512 --repeats 3 --stages sft,dpo]

A random Qwen2 of the given shape (default: hidden 768, 8 layers, vocab 32000,
fp32) runs the recipes' own loss functions (``sft.sft_loss``, ``dpo.dpo_step``
with a live reference) on micro-batches of rows whose token lengths follow a
log-normal spread clipped to [min_length, max_length], as instruction data
does. Each repeat draws a fresh micro-batch and times it padded and packed,
alternating which goes first, so machine load hits both alike. Prints one
JSON object: tokens computed per batch, seconds per mode, and the speed-up
(padded seconds / packed seconds over all repeats).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from posttrain.config import load_config  # noqa: E402
from posttrain.data import Example, PreferenceExample, collate_examples, collate_preferences  # noqa: E402
from posttrain.recipes import dpo, sft  # noqa: E402


def row_length(rng: random.Random, low: int, high: int) -> int:
    """A log-normal length (median at the geometric middle of [low, high], sigma 0.6), clipped to [low, high]."""
    median = math.sqrt(low * high)
    return max(low, min(high, round(rng.lognormvariate(math.log(median), 0.6))))


def random_example(rng: random.Random, vocab: int, length: int, prompt: list[int] | None = None) -> Example:
    """A row of ``length`` tokens: a prompt (given, or 20-50% of the row), then the response."""
    if prompt is None:
        prompt = [rng.randrange(vocab) for _ in range(max(1, int(length * rng.uniform(0.2, 0.5))))]
    response = [rng.randrange(vocab) for _ in range(max(1, length - len(prompt)))]
    return Example(prompt, response)


def sft_batch(rng, args):
    examples = [random_example(rng, args.vocab, row_length(rng, args.min_length, args.max_length))
                for _ in range(args.batch)]
    return lambda padding_free: collate_examples(examples, 0, padding_free=padding_free)


def dpo_batch(rng, args):
    pairs = []
    for _ in range(args.batch):
        chosen = random_example(rng, args.vocab, row_length(rng, args.min_length, args.max_length))
        rejected_length = max(len(chosen.prompt_ids) + 1, row_length(rng, args.min_length, args.max_length))
        pairs.append(PreferenceExample(chosen, random_example(rng, args.vocab, rejected_length, chosen.prompt_ids)))
    return lambda padding_free: collate_preferences(pairs, list(range(len(pairs))), 0, padding_free)


def computed_tokens(batch) -> int:
    """Token positions the model runs over: every padded slot, or only the real tokens when packed."""
    tokens = getattr(batch, "tokens", batch)
    return tokens.input_ids.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8, help="rows per SFT micro-batch, pairs per DPO micro-batch")
    parser.add_argument("--min_length", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="sft,dpo")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         intermediate_size=args.intermediate, max_position_embeddings=max(1024, args.max_length),
                         tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    dpo_cfg = load_config("dpo", None, {"dataset_name": "unused.jsonl"})
    steps = {"sft": (sft_batch, lambda batch: sft.sft_loss(policy, batch)[0]),
             "dpo": (dpo_batch, lambda batch: dpo.dpo_step(dpo_cfg, policy, ref, batch, None)[0])}
    rng = random.Random(args.seed)
    result: dict = {"model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "dtype": "float32",
                              "threads": torch.get_num_threads()},
                    "rows": {"batch": args.batch, "min_length": args.min_length, "max_length": args.max_length,
                             "spread": "log-normal, sigma 0.6"}}
    for stage in args.stages.split(","):
        make, loss_of = steps[stage]
        seconds = {"padded": [], "packed": []}
        tokens = {"padded": 0, "packed": 0}
        for repeat in range(args.repeats):
            collate = make(rng, args)
            order = ("padded", "packed") if repeat % 2 == 0 else ("packed", "padded")
            for mode in order:
                batch = collate(mode == "packed")
                start = time.perf_counter()
                loss_of(batch).backward()
                seconds[mode].append(time.perf_counter() - start)
                policy.zero_grad(set_to_none=True)
                tokens[mode] += computed_tokens(batch)
        result[stage] = {"tokens_per_batch": {m: t / args.repeats for m, t in tokens.items()},
                         "median_s": {m: statistics.median(s) for m, s in seconds.items()},
                         "total_s": {m: sum(s) for m, s in seconds.items()},
                         "speedup": sum(seconds["padded"]) / sum(seconds["packed"])}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
