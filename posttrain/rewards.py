"""Reward sources for PPO, GRPO and eval: rule functions and reward models.

A rule reward is called on a batch: ``f(prompts, completions, **fields) ->
list[float]``, where ``fields`` are the prompt rows' extra columns as lists
(e.g. ``answer``). Built-ins: ``exact_match`` (the arith task's verifiable
reward) and ``think_format`` (background document 000's reasoning-format
bonus). ``module:function`` names one of your own. A reward model folder scores
prompt + completion with its scalar head, re-rendered from the raw prompt and
the completion text with its own tokenizer exactly as RM training renders a
row, so the score is read at the token it was trained on. Sources are weighted,
summed and clipped to ``[-reward_clip, reward_clip]`` (background document 000
clips at 3).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import distributed
from posttrain.data import Example, collate_examples, encode_prompt, encode_response
from posttrain.errors import UserError
from posttrain.tasks.arith import exact_match

THINK_BLOCK = re.compile(r"<think>.+?</think>", re.DOTALL)


def think_format(prompts: list[str], completions: list[str], **_) -> list[float]:
    """0.5 when a completion contains a non-empty <think>...</think> block, else 0."""
    return [0.5 if THINK_BLOCK.search(c) else 0.0 for c in completions]


BUILTIN = {"exact_match": exact_match, "think_format": think_format}


def resolve_reward_func(name: str) -> Callable:
    """A built-in name, or `module:function` importable from the working directory."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise UserError(f"reward_funcs: unknown reward {name!r}; built-ins: {', '.join(BUILTIN)}; "
                        "or give module:function")
    return resolve_callable(name, "reward_funcs")


def resolve_callable(name: str, field: str) -> Callable:
    """`module:function`, imported from the working directory (for `posttrain` as for `python -m posttrain`)."""
    module_name, _, func_name = name.partition(":")
    if not module_name or not func_name:
        raise UserError(f"{field}: {name!r} is not of the form module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{field}: cannot import module {module_name!r} ({err})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{field}: {module_name!r} has no function {func_name!r}")
    return func


@dataclass
class RewardSource:
    name: str
    weight: float
    func: Callable | None = None  # rule reward
    model: torch.nn.Module | None = None  # reward model (AutoModelForSequenceClassification)
    tokenizer: object | None = None  # the reward model's own tokenizer (the one it was trained with)


class RewardError(UserError):
    pass


def call_reward_func(source: RewardSource, prompts: list[str], completions: list[str], extras: list[dict]) -> list[float]:
    """Run one rule reward on a batch; any failure names the function and the first offending row."""
    columns = {k: [row.get(k) for row in extras] for row in extras for k in row}
    try:
        values = source.func(prompts=prompts, completions=completions, **columns)
    except Exception as err:  # noqa: BLE001 - user code: report it, do not crash deep inside
        row = _first_failing_row(source, prompts, completions, extras)
        raise RewardError(f"reward function {source.name!r} raised {type(err).__name__}: {err}{row}") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward function {source.name!r} returned {got} values for {len(completions)} completions")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardError(f"reward function {source.name!r} returned a non-number: {values[:3]!r}...") from None


def _first_failing_row(source, prompts, completions, extras) -> str:
    for i in range(len(completions)):
        columns = {k: [v] for k, v in extras[i].items()}
        try:
            source.func(prompts=[prompts[i]], completions=[completions[i]], **columns)
        except Exception:  # noqa: BLE001
            return f" on row {i} (prompt {prompts[i]!r}, completion {completions[i]!r})"
    return ""


def rendered_sequences(tokenizer, raw_prompts: list[str | list[dict]],
                       completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask) (B, L) of each prompt + completion, rendered as in RM training.

    The same data path as an RM training row (encode_prompt + encode_response,
    collated by collate_examples): a chat prompt's completion becomes its
    templated assistant turn (ending ``<|im_end|>\n`` in ChatML), a text
    prompt's completion gets EOS. Sampled ids would end at the EOS instead,
    one token away from where the reward model learned to put its score.
    """
    examples = [Example(encode_prompt(tokenizer, prompt), encode_response(tokenizer, prompt, completion))
                for prompt, completion in zip(raw_prompts, completions)]
    batch = collate_examples(examples, tokenizer.pad_token_id)
    return batch.input_ids, batch.attention_mask


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


class RewardSources:
    """All reward sources of a run; ``score`` gives the weighted, clipped total and each part."""

    def __init__(self, sources: list[RewardSource], clip: float, tokenizer=None):
        self.sources, self.clip, self.tokenizer = sources, clip, tokenizer

    @classmethod
    def from_config(cls, cfg, tokenizer) -> RewardSources:
        from posttrain.models import load_scalar_model, load_tokenizer

        names = list(cfg.reward_funcs)
        weights = list(cfg.reward_weights) or [1.0] * (len(names) + bool(cfg.reward_model_name_or_path))
        sources = [RewardSource(n, float(w), func=resolve_reward_func(n)) for n, w in zip(names, weights)]
        if cfg.reward_model_name_or_path:
            path, field = cfg.reward_model_name_or_path, "reward_model_name_or_path"
            model = distributed.wrap(load_scalar_model(path, field, trainable=False), cfg.fsdp, cfg.bf16, frozen=True)
            rm_tokenizer = load_tokenizer(path, field) if _has_tokenizer(path) else tokenizer
            sources.append(RewardSource("reward_model", float(weights[len(names)]), model=model, tokenizer=rm_tokenizer))
        if not sources:
            raise UserError("no reward source: set reward_funcs or reward_model_name_or_path")
        return cls(sources, cfg.reward_clip, tokenizer)

    @property
    def models(self) -> list[torch.nn.Module]:
        return [s.model for s in self.sources if s.model is not None]

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], extras: list[dict],
              raw_prompts: list[str | list[dict]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B,) total reward and {"rewards/<name>": (B,)} per source.

        ``prompts`` are the texts rule rewards see; ``raw_prompts`` are the
        rows' own prompts (a string or a list of messages, ``PromptExample.prompt``),
        which reward models need to re-render each row as RM training did.
        """
        parts = {}
        total = torch.zeros(len(completions))
        for source in self.sources:
            if source.func is not None:
                values = torch.tensor(call_reward_func(source, prompts, completions, extras))
            else:
                values = self.model_scores(source, raw_prompts, completions)
            parts[f"rewards/{source.name}"] = values
            total += source.weight * values
        if self.clip > 0:
            total = total.clamp(-self.clip, self.clip)
        return total, parts

    def model_scores(self, source: RewardSource, raw_prompts: list[str | list[dict]] | None,
                     completions: list[str]) -> torch.Tensor:
        """(B,) scores of one reward model on the rendered rows, read at each row's last real token."""
        from posttrain.models import sequence_scores

        if raw_prompts is None or len(raw_prompts) != len(completions):
            raise ValueError(f"reward source {source.name!r} is a reward model: score() needs raw_prompts, "
                             "one raw prompt (a string or a list of messages) per completion")
        ids, mask = rendered_sequences(source.tokenizer or self.tokenizer, raw_prompts, completions)
        device = source.model.device
        return sequence_scores(source.model, ids.to(device), mask.to(device)).float().cpu()
