"""`posttrain generate` and `posttrain eval`: sampled and greedy accuracy, mean
reward, and the mean per-sequence KL to a reference model.

`kl_to_ref` is Σ_t (log π(y_t) - log π_ref(y_t)) over each sampled completion,
averaged over completions: a Monte-Carlo estimate of KL(π || π_ref) per
sequence (k1, unbiased), measured on the same held-out prompts for every stage.
"""

from __future__ import annotations

import contextlib
import json

import torch

from posttrain.data import prompt_examples, read_rows
from posttrain.losses import masked_sum
from posttrain.models import load_causal_lm, load_tokenizer, token_logps
from posttrain.rewards import RewardSource, RewardSources, resolve_reward_func
from posttrain.rollout import generate


@torch.no_grad()
def sequence_kl(model, ref_model, gen) -> torch.Tensor:
    """(B,) Σ_t log π - log π_ref over each completion of ``gen``."""
    T = gen.completion_mask.shape[1]
    logps = token_logps(model, gen.input_ids, gen.attention_mask, logits_to_keep=T)
    ref_logps = token_logps(ref_model, gen.input_ids, gen.attention_mask, logits_to_keep=T)
    return masked_sum(logps - ref_logps, gen.completion_mask, dim=-1)


@torch.no_grad()
def evaluate(model, tokenizer, examples, rewards: RewardSources, ref_model=None, max_new_tokens: int = 16,
             batch_size: int = 256, seed: int = 0, num_samples_kept: int = 0) -> dict:
    """Accuracy (sampled at temperature 1 and greedy), mean reward and KL to ``ref_model``.

    A completion is correct when its ``exact_match`` reward is 1 (for other
    tasks: when the first reward source is positive).
    """
    with _own_rng(seed):
        return _evaluate(model, tokenizer, examples, rewards, ref_model, max_new_tokens, batch_size, num_samples_kept)


@contextlib.contextmanager
def _own_rng(seed: int):
    """Reseed for a repeatable evaluation, then put every RNG (CPU and each CUDA device) back.

    The training run around it continues exactly as if it had not evaluated:
    what makes a resumed run equal an uninterrupted one.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _evaluate(model, tokenizer, examples, rewards, ref_model, max_new_tokens, batch_size, num_samples_kept) -> dict:
    totals = {"accuracy": 0.0, "greedy_accuracy": 0.0, "reward_mean": 0.0, "kl_to_ref": 0.0}
    samples = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids = [e.prompt_ids for e in chunk]
        prompts, extras = [e.prompt_text for e in chunk], [e.extra for e in chunk]
        raw_prompts = [e.prompt for e in chunk]
        sampled = generate(model, tokenizer, ids, max_new_tokens, temperature=1.0)
        greedy = generate(model, tokenizer, ids, max_new_tokens, greedy=True)
        reward, parts = rewards.score(prompts, sampled.completions, extras, raw_prompts=raw_prompts)
        _, greedy_parts = rewards.score(prompts, greedy.completions, extras, raw_prompts=raw_prompts)
        totals["accuracy"] += float(_correct(parts).sum())
        totals["greedy_accuracy"] += float(_correct(greedy_parts).sum())
        totals["reward_mean"] += float(reward.sum())
        if ref_model is not None:
            totals["kl_to_ref"] += float(sequence_kl(model, ref_model, sampled).sum())
        kept = min(len(chunk), num_samples_kept - len(samples))
        if kept > 0:
            shown_sampled = readable_completions(tokenizer, sampled, kept)
            shown_greedy = readable_completions(tokenizer, greedy, kept)
            samples += [{"prompt": prompts[i], "answer": extras[i].get("answer"), "sampled": shown_sampled[i],
                         "greedy": shown_greedy[i]} for i in range(kept)]
    n = len(examples)
    result = {k: round(v / n, 4) for k, v in totals.items()}
    if ref_model is None:
        result.pop("kl_to_ref")
    if num_samples_kept:
        result["samples"] = samples
    return result


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (Radford et al. 2019, `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_OF_CHAR = _byte_level_alphabet()


def readable_completions(tokenizer, gen, n: int) -> list[str]:
    """The first ``n`` completions of ``gen`` for people to read: each whole sequence decoded, bytes that are
    not UTF-8 shown as ``\\xNN`` rather than as U+FFFD.

    A sampled byte-level model can emit a lone UTF-8 lead byte or stop inside a multi-byte character; the
    plain decode turns those into U+FFFD, which hides what was sampled. Tokenizers that are not byte-level
    keep their own decode.
    """
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return gen.completions[:n]
    special = set(tokenizer.all_special_ids)
    out = []
    for ids, mask in zip(gen.completion_ids[:n].tolist(), gen.completion_mask[:n].tolist()):
        tokens = tokenizer.convert_ids_to_tokens([t for t, m in zip(ids, mask) if m and t not in special])
        chars = "".join(tokens)
        if not all(c in BYTE_OF_CHAR for c in chars):  # added (non-byte) tokens: the plain decode
            out.append(tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True))
            continue
        out.append(bytes(BYTE_OF_CHAR[c] for c in chars).decode("utf-8", errors="backslashreplace"))
    return out


def _correct(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Exact match when the task has it, else a positive first reward."""
    if "rewards/exact_match" in parts:
        return parts["rewards/exact_match"] >= 1
    return next(iter(parts.values())) > 0


def accuracy_probe(model, tokenizer, path: str, max_rows: int, max_new_tokens: int):
    """A greedy-accuracy function for in-training logging (eval_dataset_name)."""
    examples = prompt_examples(read_rows(path, "eval_dataset_name")[:max_rows], tokenizer, 1024)
    source = RewardSources([RewardSource("exact_match", 1.0, func=resolve_reward_func("exact_match"))], 0)

    def probe() -> dict:
        gen = generate(model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens, greedy=True)
        _, parts = source.score([e.prompt_text for e in examples], gen.completions, [e.extra for e in examples])
        return {"eval/greedy_accuracy": float(_correct(parts).float().mean())}

    return probe


def probe_from_config(cfg, model, tokenizer, max_new_tokens: int):
    """``accuracy_probe`` on ``cfg.eval_dataset_name``, or None when the config names no eval file."""
    if not cfg.eval_dataset_name:
        return None
    return accuracy_probe(model, tokenizer, cfg.eval_dataset_name, cfg.eval_max_rows, max_new_tokens)


def generate_main(args) -> None:
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_causal_lm(args.model_name_or_path, trainable=False)
    torch.manual_seed(args.seed)
    prompts = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompt]
    from posttrain.data import encode_prompt

    ids = [encode_prompt(tokenizer, p) for p in prompts]
    gen = generate(model, tokenizer, ids, args.max_new_tokens, args.temperature, greedy=args.greedy,
                   num_return_sequences=args.num_return_sequences)
    for i, text in enumerate(gen.completions):
        print(json.dumps({"prompt": args.prompt[i // args.num_return_sequences], "completion": text}))


def eval_main(args) -> None:
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_causal_lm(args.model_name_or_path, trainable=False)
    ref = load_causal_lm(args.ref_model_name_or_path, "ref_model_name_or_path", False) if args.ref_model_name_or_path else None
    rows = read_rows(args.dataset_name)
    if args.max_rows:
        rows = rows[:args.max_rows]
    examples = prompt_examples(rows, tokenizer, 1024)
    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    rewards = RewardSources([RewardSource(n, 1.0, func=resolve_reward_func(n)) for n in names], 0)
    result = evaluate(model, tokenizer, examples, rewards, ref, args.max_new_tokens, args.batch_size, args.seed)
    result = {"model": args.model_name_or_path, "eval_prompts": len(examples), **result}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
