"""Reward functions and a run helper for the recipe tests (rm, ppo, grpo).

A random tiny model samples nearly uniform bytes, so the rewards here are ones
such a policy already earns part of the time and can quickly earn more of:

- ``ascii_frac``: the share of printable ASCII characters in a completion
  (about 0.4 for the random tiny model; 1.0 is reachable by shifting mass at
  every position).
- ``prompt_low``: 1 when the prompt starts with a digit 1-5, whatever the
  completion. The policy cannot change it, but a critic can predict it from the
  prompt, which makes explained variance rise.

Recipes resolve them as ``reward_helpers:NAME``; this folder is put on sys.path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def ascii_frac(prompts, completions, **_):
    return [sum(ch.isascii() and ch.isprintable() for ch in c) / max(1, len(c)) for c in completions]


def prompt_low(prompts, completions, **_):
    return [float(p[:1] in "12345") for p in prompts]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_recipe(stage: str, output_dir, **fields) -> tuple[list[dict], dict]:
    """Run ``posttrain.recipes.<stage>.main`` in-process; returns (metrics.jsonl records, summary.json)."""
    import importlib

    from posttrain.config import load_config

    overrides = {"num_threads": "1", "progress": "false", "output_dir": str(output_dir), "seed": "0"}
    overrides.update({k: str(v) for k, v in fields.items()})
    cfg = load_config(stage, None, overrides)
    importlib.import_module(f"posttrain.recipes.{stage}").main(cfg)
    out = Path(output_dir)
    return read_jsonl(out / "metrics.jsonl"), json.loads((out / "summary.json").read_text())


def thirds(values: list[float]) -> tuple[float, float]:
    """Mean of the first third and of the last third of a series."""
    k = max(1, len(values) // 3)
    return sum(values[:k]) / k, sum(values[-k:]) / k


class Interrupted(Exception):
    """Raised right after the first checkpoint is written: the run 'dies' there."""


def run_interrupted(stage: str, output_dir, **fields) -> None:
    """Run a recipe that is killed right after its first checkpoint-STEP is saved."""
    import posttrain.checkpoint

    original = posttrain.checkpoint.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = original(*args, **kwargs)
        raise Interrupted(path)

    posttrain.checkpoint.save_checkpoint = save_then_die
    try:
        run_recipe(stage, output_dir, **fields)
    except Interrupted:
        return
    finally:
        posttrain.checkpoint.save_checkpoint = original
    raise AssertionError("the run finished without saving a checkpoint")
