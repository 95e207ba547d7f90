"""Environments, tools and rollout engines for the multi-turn tests (resolved as ``agent_helpers:NAME``).

A random tiny model never writes a tool call by itself, so two engines make it
call one: ``ScriptedEngine`` answers each turn with fixed text (the exact ids
are then known and the trajectory can be checked token by token), and
``forced_call_engine`` samples every turn from the real model after forcing
the first turn to open with a tool call (constrained decoding of a prefix).
"""

from __future__ import annotations

import time

import torch

from posttrain.data import left_pad
from posttrain.rollout import HFEngine, generation_from_ids

CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


class NoTools:
    """A one-turn environment: no tools, no observation."""

    def reset(self, **row):
        return None


class Calculator:
    """Adds numbers for the model; rewarded when the last turn holds the row's answer."""

    def reset(self, **row):
        self.answer, self.calls = str(row.get("answer", "")), 0
        return " (a calculator is available)"

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first number
            b: the second number
        """
        self.calls += 1
        return a + b

    def explode(self, x: int) -> int:
        """Always fails.

        Args:
            x: anything
        """
        raise ValueError("no such luck")

    def wait(self, seconds: float) -> str:
        """Sleep, then answer.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "done"

    def get_reward(self) -> float:
        return float(self.calls > 0)


def used_calculator(prompts, completions, environments=None, **_):
    """A rule reward reading the environments: 1 per trajectory whose environment saw a tool call."""
    return [float(env.calls > 0) for env in environments]


class ScriptedEngine:
    """A rollout engine answering turn k of every trajectory with ``script[k]`` (+ EOS), cut at the budget."""

    def __init__(self, tokenizer, script: list[str], max_new_tokens: int = 64, alternate: bool = False):
        self.tokenizer, self.script, self.max_new_tokens = tokenizer, script, max_new_tokens
        self.alternate = alternate  # odd rows of a group skip the script's first turn: some trajectories call no tool
        self.calls: list[list[list[int]]] = []  # the contexts of each generate call

    def generate(self, prompt_ids, num_return_sequences: int = 1, max_new_tokens: int | None = None):
        self.calls.append([list(p) for p in prompt_ids])
        tok, budget = self.tokenizer, max_new_tokens or self.max_new_tokens
        rows = []
        for context in prompt_ids:
            turn = tok.decode(context).count("<|im_start|>user\n<tool_response>")
            for k in range(num_return_sequences):
                text = self.script[min(turn + (self.alternate and k % 2), len(self.script) - 1)]
                ids = tok(text, add_special_tokens=False)["input_ids"]
                rows.append((ids + [tok.eos_token_id])[:budget])
        width = max(len(r) for r in rows)
        completion = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        ids, mask = left_pad([list(p) for p in prompt_ids], tok.pad_token_id)
        gen = generation_from_ids(ids, mask, completion, tok, num_return_sequences)
        gen.sampling_logps = -(1 + torch.arange(width, dtype=torch.float32)).expand(len(rows), width) / 100  # -0.01, -0.02 ...
        return gen

    def load_weights(self, model) -> None:
        pass


class ForcedCallEngine(HFEngine):
    """Samples from the model, except a first turn (no tool result in its context yet): that one is forced to
    be a call of `add` (constrained decoding of the whole turn)."""

    def generate(self, prompt_ids, num_return_sequences: int = 1, max_new_tokens: int | None = None):
        tok = self.tokenizer
        if any("<tool_response>" in tok.decode(p) for p in prompt_ids):
            return super().generate(prompt_ids, num_return_sequences, max_new_tokens)
        forced = tok(CALL, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        completion = torch.tensor([forced] * (len(prompt_ids) * num_return_sequences))
        ids, mask = left_pad([list(p) for p in prompt_ids], tok.pad_token_id)
        return generation_from_ids(ids, mask, completion, tok, num_return_sequences)


def forced_call_engine(cfg, model, tokenizer):
    return ForcedCallEngine(model, tokenizer, cfg.max_completion_length, cfg.temperature, cfg.top_k)


def printable_frac(prompts, completions, **_):
    """The share of printable ASCII characters in a completion (a signal a random tiny model partly earns)."""
    return [sum(ch.isascii() and ch.isprintable() for ch in c) / max(1, len(c)) for c in completions]


def run_recipe(stage: str, output_dir, **fields) -> list[dict]:
    """Run ``posttrain.recipes.<stage>.main`` in-process; returns its metrics.jsonl records."""
    import importlib
    import json
    from pathlib import Path

    from posttrain.config import load_config

    overrides = {"num_threads": "1", "progress": "false", "output_dir": str(output_dir), "seed": "0"}
    overrides.update({k: str(v) for k, v in fields.items()})
    importlib.import_module(f"posttrain.recipes.{stage}").main(load_config(stage, None, overrides))
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def scripted_engine(cfg, model, tokenizer):
    """Even rows of a group call `add` once, then answer 5; odd rows answer 5 at once: the same samples, and
    rewards that differ within each group, on any number of ranks."""
    return ScriptedEngine(tokenizer, [CALL, "5"], cfg.max_completion_length, alternate=True)
