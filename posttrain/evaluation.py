"""`posttrain generate` and `posttrain eval`: sampled and greedy accuracy, mean
reward, and the mean per-sequence KL to a reference model; and the held-out
evaluation of every stage during training, in the stage's own format:

- ``sft_evaluation``: the SFT loss (its token mean, and perplexity) on held-out
  chats or prompt/completion rows, and greedy exact-match accuracy on rows with
  an ``answer``;
- ``pair_evaluation``: a preference stage's own step (dpo_step, rm_step) on
  held-out pairs: its loss and stats (rewards/accuracies, rewards/margins, ...);
- ``rl_evaluation``: the mean reward of greedy completions of held-out prompts
  (and their exact-match accuracy where rows have an ``answer``).

Each returns a function that ``training.fit`` / ``run_rl`` call on the
eval_strategy schedule, logged as ``eval/...`` keys of metrics.jsonl (or None
when there is no held-out data). Evaluation runs under no_grad in eval mode (the
mode is restored after), leaves every RNG as it was, goes in batches of a
training micro-batch (each rank its share, sums reduced over ranks) and reuses
the stage's own loss, so eval and training figures are the same function.

`kl_to_ref` is Σ_t (log π(y_t) - log π_ref(y_t)) over each sampled completion,
averaged over completions: a Monte-Carlo estimate of KL(π || π_ref) per
sequence (k1, unbiased), measured on the same held-out prompts for every stage.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable

import torch

from posttrain import distributed
from posttrain.data import (
    collate_examples,
    collate_preferences,
    eval_rows,
    preference_examples,
    prompt_examples,
    read_rows,
    sft_examples,
    sft_response_only,
)
from posttrain.errors import UserError
from posttrain.losses import masked_sum
from posttrain.models import load_causal_lm, load_tokenizer, token_logps
from posttrain.rewards import RewardSource, RewardSources, check_required_fields, resolve_reward_func
from posttrain.rollout import HFEngine, generate, multi_turn, sample
from posttrain.training import autocast


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
        reward, parts = rewards.score(prompts, sampled.completions, extras, raw_prompts=raw_prompts,
                                      truncated=sampled.truncated)
        _, greedy_parts = rewards.score(prompts, greedy.completions, extras, raw_prompts=raw_prompts,
                                        truncated=greedy.truncated)
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
    return _accuracy_of(model, tokenizer, examples, max_new_tokens)


def _accuracy_of(model, tokenizer, examples, max_new_tokens: int):
    source = RewardSources([RewardSource("exact_match", 1.0, func=resolve_reward_func("exact_match"))], 0)

    def probe() -> dict:
        gen = generate(model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens, greedy=True)
        _, parts = source.score([e.prompt_text for e in examples], gen.completions, [e.extra for e in examples])
        return {"eval/greedy_accuracy": float(_correct(parts).float().mean())}

    return probe


# ----------------------------------------------------------- held-out evaluation during training


def _rank_batches(n: int, size: int):
    """(indices, counted) for this rank over n rows in global batches of size x world: every rank runs the
    same number of forwards (FSDP2 needs each rank in each one); a rank whose share of the last batch is
    empty runs row 0 uncounted."""
    world = distributed.world_size()
    for start in range(0, n, size * world):
        share = distributed.rank_share(list(range(start, min(start + size * world, n))))
        yield (share, True) if share else ([0], False)


@contextlib.contextmanager
def _eval_mode(*models, seed: int = 0):
    """no_grad, eval mode (each model's mode restored after) and the RNG left as it was."""
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        with torch.no_grad(), _own_rng(seed):
            yield
    finally:
        for m, mode in modes:
            m.train(mode)


def _reduced_means(sums: dict[str, torch.Tensor], count: torch.Tensor) -> dict[str, float]:
    """{key: Σ over ranks of sums / Σ count}, in one all-reduce."""
    keys = sorted(sums)
    totals = distributed.all_sum(torch.stack([count.float(), *[sums[k].float() for k in keys]]).to(distributed.device()))
    total = totals[0].clamp_min(1e-12)
    return {k: float(v / total) for k, v in zip(keys, totals[1:].cpu())}


def _add(sums: dict, stats: dict, weight: float) -> None:
    for k, v in stats.items():
        value = torch.as_tensor(v, dtype=torch.float32).detach().to(distributed.device()) * weight
        sums[k] = sums[k] + value if k in sums else value


def sft_evaluation(cfg, model, tokenizer, loss_fn: Callable, max_new_tokens: int = 8) -> Callable[[], dict] | None:
    """SFT's held-out figures: eval/loss (``loss_fn``'s token mean over every held-out response token) and
    eval/perplexity (its exp) on chat or prompt/completion rows; eval/greedy_accuracy on rows with an
    ``answer`` (a prompt file). None without held-out data."""
    rows = eval_rows(cfg)
    if rows is None:
        return None
    rows = rows[:cfg.eval_max_rows]
    first = rows[0].data
    scored = "messages" in first or "completion" in first or cfg.dataset_text_field in first
    probe = _greedy_accuracy(model, tokenizer, rows, max_new_tokens, cfg.seed) if "answer" in first else None
    if not scored and probe is None:
        raise UserError(f"{rows[0].source}: held-out SFT rows need 'messages', 'prompt' and 'completion' or "
                        f"{cfg.dataset_text_field!r} (loss), or 'prompt' and 'answer' (accuracy)")
    examples = sft_examples(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.dataset_text_field) if scored else []
    response_only = sft_response_only(rows[0], cfg.completion_only_loss, cfg.assistant_only_loss)

    def evaluate() -> dict:
        out = probe() if probe is not None else {}
        if not examples:
            return out
        nll, tokens = torch.zeros((), device=distributed.device()), torch.zeros((), device=distributed.device())
        with _eval_mode(model, seed=cfg.seed):
            for indices, counted in _rank_batches(len(examples), cfg.per_device_train_batch_size):
                batch = collate_examples([examples[i] for i in indices], tokenizer.pad_token_id,
                                         response_only).to(distributed.device())
                with autocast(cfg.bf16):
                    loss, _ = loss_fn(batch)
                n = batch.loss_mask.sum() * counted
                nll, tokens = nll + loss.float() * n, tokens + n
        mean = _reduced_means({"loss": nll}, tokens)["loss"]
        return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 80.0)), **out}

    return evaluate


def pair_evaluation(cfg, model, tokenizer, step: Callable, precompute: Callable | None = None,
                    rename: dict | None = None, rows: list | None = None) -> Callable[[], dict] | None:
    """A preference stage's held-out figures: ``step(batch, reference_table)`` (the stage's own loss and
    stats, e.g. dpo_step's rewards/accuracies and rewards/margins) averaged over every held-out pair, as
    eval/loss and eval/<stat> (``rename`` maps a stat to its eval name). ``precompute(pairs, make_batch)``
    scores the held-out pairs with the reference once, where the stage does so for its training pairs
    (precompute_ref_log_probs). ``rows``: the held-out rows, when not ``eval_rows(cfg)``. None without
    held-out data."""
    rows = eval_rows(cfg) if rows is None else rows
    if not rows:
        return None
    pairs = preference_examples(rows, tokenizer, cfg.max_length, cfg.max_prompt_length)

    def make_batch(indices):
        return collate_preferences([pairs[i] for i in indices], indices, tokenizer.pad_token_id)

    table = precompute(pairs, make_batch) if precompute is not None and getattr(cfg, "precompute_ref_log_probs", False) else None
    names = rename or {}

    def evaluate() -> dict:
        sums: dict = {}
        count = torch.zeros((), device=distributed.device())
        with _eval_mode(model, seed=cfg.seed):
            for indices, counted in _rank_batches(len(pairs), cfg.per_device_train_batch_size):
                batch = make_batch(indices).to(distributed.device())
                with autocast(cfg.bf16):
                    loss, stats = step(batch, table)
                weight = len(indices) * counted
                _add(sums, {"loss": loss, **stats}, weight)
                count = count + weight
        return {f"eval/{names.get(k, k)}": v for k, v in _reduced_means(sums, count).items()}

    return evaluate


def rl_evaluation(cfg, model, tokenizer, rewards: RewardSources) -> Callable[[], dict] | None:
    """An RL stage's held-out figures: eval/reward, the mean reward (the run's own reward sources) of greedy
    completions of held-out prompts, and eval/greedy_accuracy where the rows have an ``answer``. None
    without held-out prompts."""
    rows = eval_rows(cfg)
    if rows is None:
        return None
    rows = rows[:cfg.eval_max_rows]
    prompts = prompt_examples(rows, tokenizer, cfg.max_prompt_length)
    check_required_fields(cfg.reward_funcs, prompts, [r.source for r in rows])
    answers = all("answer" in p.extra for p in prompts)
    exact = RewardSources([RewardSource("exact_match", 1.0, func=resolve_reward_func("exact_match"))], 0)
    size = cfg.per_device_train_batch_size * getattr(cfg, "num_generations", 1)  # the sequences of a rollout
    # greedy turns; with an environment or tools, whole greedy trajectories (tool calls run as in training)
    engine = multi_turn(cfg, HFEngine(model, tokenizer, cfg.max_completion_length, greedy=True), tokenizer)

    def evaluate() -> dict:
        sums: dict = {}
        count = torch.zeros((), device=distributed.device())
        with _eval_mode(model, seed=cfg.seed):
            for indices, counted in _rank_batches(len(prompts), size):
                chunk = [prompts[i] for i in indices]
                gen, episodes = sample(engine, chunk)
                texts, extras = [p.prompt_text for p in chunk], [p.extra for p in chunk]
                reward, _ = rewards.score(texts, gen.completions, extras, raw_prompts=[p.prompt for p in chunk],
                                          truncated=gen.truncated, environments=episodes and episodes.environments)
                stats = {"reward": reward.float().mean(), "completion_length": gen.completion_mask.sum(-1).float().mean(),
                         **(episodes.stats() if episodes else {})}
                if answers:
                    stats["greedy_accuracy"] = _correct(exact.score(texts, gen.completions, extras)[1]).float().mean()
                _add(sums, stats, len(chunk) * counted)
                count = count + len(chunk) * counted
        return {f"eval/{k}": v for k, v in _reduced_means(sums, count).items()}

    return evaluate


def _greedy_accuracy(model, tokenizer, rows, max_new_tokens: int, seed: int) -> Callable[[], dict]:
    examples = prompt_examples(rows, tokenizer, 1024)
    probe = _accuracy_of(model, tokenizer, examples, max_new_tokens)

    def evaluate() -> dict:
        with _eval_mode(model, seed=seed):
            return probe()

    return evaluate


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
