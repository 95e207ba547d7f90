"""Where the time of a PPO and a GRPO step goes, and how fast rollouts are sampled.

    .venv/bin/python benchmarks/rollout.py [--shapes tiny medium] [--steps 2]

For each shape (a random Qwen2 built here: `tiny` hidden 256 x 4 layers,
vocab 2048; `medium` hidden 768 x 8 layers, vocab 32000) it prints, in one
JSON object:

- ``generation_share``: the fraction of one whole RL step (rollout, scoring,
  rewards, updates) spent inside the rollout engine's `generate`, for GRPO
  (N prompts x G completions) and PPO (N prompts, shared critic);
- ``completions_per_s`` on the same prompts and lengths: posttrain's
  `generate` (as the recipes call it), the same with the prompt cache not
  reused across a group, plain `model.generate` with
  num_return_sequences = G, and the naive loop (batch 1, no KV cache: the
  whole sequence recomputed for every new token), timed on a few rows only.

``--prompt_length L`` lengthens the prompts to about L tokens (rows differ by
one token each, so left padding is exercised): the prefill a GRPO group
shares grows with it. A random model almost never samples EOS, so every completion runs the full
max_completion_length: the figures are of full-length rollouts. Absolute
times depend on the machine; ratios are measured in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from posttrain.config import load_config  # noqa: E402
from posttrain.data import left_pad, prompt_examples, read_rows  # noqa: E402
from posttrain.models import build_tiny_tokenizer, load_causal_lm, load_tokenizer  # noqa: E402
from posttrain.rollout import build_engine, generate, sampling_config  # noqa: E402
from posttrain.tasks import arith  # noqa: E402

SHAPES = {
    "tiny": {"hidden_size": 256, "num_layers": 4, "vocab": 2048, "prompts": 8, "generations": 8},
    "medium": {"hidden_size": 768, "num_layers": 8, "vocab": 32000, "prompts": 2, "generations": 4},
}


def build_model(corpus: list[str], out: str, hidden_size: int, num_layers: int, vocab: int) -> str:
    """A random Qwen2 of the given shape, with the embedded tokenizer (ids past its vocabulary are never prompts)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = build_tiny_tokenizer(corpus, out)
    heads = max(1, hidden_size // 64)
    config = Qwen2Config(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=hidden_size * 4,
                         max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class TimedEngine:
    """The recipe's engine, with the seconds spent in `generate` added up."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0

    def generate(self, *args, **kwargs):
        spent, result = timed(lambda: self.engine.generate(*args, **kwargs))
        self.seconds += spent
        return result

    def load_weights(self, model):
        self.engine.load_weights(model)


def step_shares(stage: str, model_dir: str, prompts_file: str, prompts, shape: dict, args, tmp: str) -> dict:
    """Median generation share of ``args.steps`` whole RL steps (after one untimed step)."""
    import importlib

    from posttrain.optim import build_optimizer
    from posttrain.rewards import RewardSources
    from posttrain.training import StatsWindow, trainable_parameters

    recipe = importlib.import_module(f"posttrain.recipes.{stage}")
    fields = {"model_name_or_path": model_dir, "dataset_name": prompts_file, "output_dir": f"{tmp}/{stage}",
              "max_completion_length": str(args.max_new_tokens), "per_device_train_batch_size": str(len(prompts))}
    if stage == "grpo":
        fields.update(num_generations=str(shape["generations"]))
    else:
        fields.update(critic="shared", num_ppo_epochs="1")
    cfg = load_config(stage, None, fields)
    tokenizer = load_tokenizer(model_dir)
    policy, ref = load_causal_lm(model_dir), load_causal_lm(model_dir, trainable=False)
    rewards = RewardSources.from_config(cfg, tokenizer)
    engine = TimedEngine(build_engine(cfg, policy, tokenizer))
    window = StatsWindow()
    if stage == "grpo":
        params = trainable_parameters(policy)
        optimizer = build_optimizer(params, cfg.learning_rate, cfg.weight_decay)

        def step():
            rollout, _ = recipe.make_rollout(cfg, engine, policy, ref, rewards, prompts)
            recipe.update(cfg, policy, rollout, optimizer, [p for _, p in params], window)
    else:
        head = recipe.ValueHead(policy.config.hidden_size)
        optimizer = build_optimizer(trainable_parameters(policy), cfg.learning_rate, cfg.weight_decay)
        optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0, "lr": cfg.learning_rate})
        params = [p for _, p in trainable_parameters(policy)] + list(head.parameters())

        def step():
            rollout, _ = recipe.make_rollout(cfg, engine, policy, ref, None, head, rewards, prompts, cfg.kl_coef)
            recipe.ppo_epochs(cfg, policy, None, head, rollout, optimizer, params, window)

    shares, totals = [], []
    for i in range(args.steps + 1):
        engine.seconds = 0.0
        total, _ = timed(step)
        if i:  # the first step warms caches up
            shares.append(engine.seconds / total)
            totals.append(total)
    return {"generation_share": round(statistics.median(shares), 3), "step_s": round(statistics.median(totals), 3)}


def naive_completion(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Sample one completion recomputing the whole sequence for every new token (batch 1, no KV cache)."""
    ids = torch.tensor([prompt])
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        token = torch.multinomial(torch.softmax(logits.float(), -1), 1)
        ids = torch.cat([ids, token], dim=1)
        if int(token) == eos_id:
            break
    return ids[0, len(prompt):].tolist()


@torch.no_grad()
def generation_rates(model_dir: str, prompts, shape: dict, args) -> dict:
    """Completions per second of each way of sampling the same N x G completions."""
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir, trainable=False)
    prompt_ids = [p.prompt_ids for p in prompts]
    G, T = shape["generations"], args.max_new_tokens
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    config = sampling_config(T, 1.0, False, 0, G, tokenizer.pad_token_id, tokenizer.eos_token_id)
    ways = {
        "posttrain": lambda: generate(model, tokenizer, prompt_ids, T, num_return_sequences=G),
        "posttrain_no_group_cache": lambda: generate(model, tokenizer, prompt_ids, T, num_return_sequences=G,
                                                     reuse_prompt_cache=False),
        "model_generate": lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config),
    }
    try:
        generate(model, tokenizer, prompt_ids[:1], 1, num_return_sequences=2, reuse_prompt_cache=False)
    except TypeError:  # a version without the option
        del ways["posttrain_no_group_cache"]
    rates = {}
    for name, fn in ways.items():
        fn()  # warm-up
        times = [timed(fn)[0] for _ in range(args.repeats)]
        rates[name] = round(len(prompts) * G / statistics.median(times), 2)
    naive_rows = [prompt_ids[i % len(prompt_ids)] for i in range(args.naive_rows)]
    spent = sum(timed(lambda p=p: naive_completion(model, p, T, -1))[0] for p in naive_rows)
    rates["naive_loop"] = round(len(naive_rows) / spent, 3)
    ratios = {f"posttrain_over_{k}": round(rates["posttrain"] / v, 2) for k, v in rates.items() if k != "posttrain"}
    return {"completions_per_s": rates, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "medium"], choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=2, help="timed RL steps per stage (after one untimed)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per way")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--naive_rows", type=int, default=2, help="completions sampled by the naive loop")
    parser.add_argument("--prompts", type=int, default=0, help="prompts per batch (0: the shape's own)")
    parser.add_argument("--hidden_size", type=int, default=0, help="override the shapes' hidden size (smoke runs)")
    parser.add_argument("--prompt_length", type=int, default=0,
                        help="lengthen every prompt to this many tokens by repeating it (0: the arith prompts, ~6 tokens)")
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens,
               "prompt_length": args.prompt_length or "arith"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = arith.write_datasets(tmp, num_sft=8, num_preference=8, num_prompts=64, num_eval=8)
        corpus = [line for p in paths.values() for line in p.read_text().splitlines()]
        for name in args.shapes:
            shape = dict(SHAPES[name])
            if args.prompts:
                shape["prompts"] = args.prompts
            if args.hidden_size:
                shape["hidden_size"] = args.hidden_size
            model_dir = build_model(corpus, f"{tmp}/{name}", shape["hidden_size"], shape["num_layers"], shape["vocab"])
            tokenizer = load_tokenizer(model_dir)
            prompts = prompt_examples(read_rows(str(paths["prompts"]))[:shape["prompts"]], tokenizer, 64)
            if args.prompt_length:  # long prompts (chat templates, questions) are where a group's prefill is shared
                prompts = [dataclasses.replace(p, prompt_ids=(p.prompt_ids * args.prompt_length)[-args.prompt_length + i:])
                           for i, p in enumerate(prompts)]
            torch.manual_seed(0)
            results[name] = {"shape": shape,
                             "grpo": step_shares("grpo", model_dir, str(paths["prompts"]), prompts, shape, args, tmp),
                             "ppo": step_shares("ppo", model_dir, str(paths["prompts"]), prompts, shape, args, tmp),
                             **generation_rates(model_dir, prompts, shape, args)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
