"""Where one optimizer step of a posttrain stage spends its time, from torch.profiler on the CPU.

    .venv/bin/python benchmarks/profile_step.py sft|rm|dpo|grpo [--shape tiny|medium] [--threads 1]

Runs the stage's own recipe (``posttrain.recipes.STAGE.main``) in this process
on the model and data of ``benchmarks/vs_trl.py`` (same shape, same flags),
for 2 steps, and profiles step 2 (step 1 is the warm-up). The phases are
marked without touching posttrain's code: the recipe's functions are wrapped
in ``record_function`` scopes, and a global forward hook marks every
outermost model forward. Prints one JSON object with each phase's share of
the step's wall time:

- ``forward`` / ``forward_no_grad``: model forwards with and without autograd
  (the reference and rollout-scoring passes are the no-grad ones)
- ``logprobs``: the chunked LM head (``chunked_head_logps``: head, log-softmax
  and entropy), or ``selective_log_softmax`` and ``entropy_from_logits`` on the
  logits where a model falls back to them (the forward part; the backward is in ``backward``)
- ``backward``: the autograd engine's functions
- ``optimizer``: ``clip_and_step`` (clip, AdamW, zero_grad)
- ``data``: collating micro-batches and moving them to the device
- ``generation``: the rollout engine's ``generate`` (its model forwards included)
- ``rewards``: the reward sources
- ``other``: the rest, i.e. losses, stats, logging and Python overhead

``aten_share`` is the share of the step spent inside outermost ATen ops
(the rest of the wall time is Python and framework overhead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's posttrain, not another installed one

import vs_trl  # noqa: E402

PHASES = ("forward", "forward_no_grad", "logprobs", "backward", "optimizer", "data", "generation", "rewards")


def scoped(name: str, fn, state: dict):
    from torch.autograd.profiler import record_function

    def wrapper(*args, **kwargs):
        state["depth"] += 1
        try:
            with record_function(f"phase::{name}"):
                return fn(*args, **kwargs)
        finally:
            state["depth"] -= 1
    return wrapper


def instrument(stage: str, state: dict) -> None:
    """Wrap the recipe's phases in record_function scopes and mark the outermost model forwards."""
    import torch
    from torch.autograd.profiler import record_function
    from transformers import PreTrainedModel

    from posttrain import models, rewards, training
    from posttrain.recipes import dpo, grpo, rm, sft

    # token_logps calls these by their names in posttrain.models; the recipes call clip_and_step by theirs
    models.chunked_head_logps = scoped("logprobs", models.chunked_head_logps, state)
    models.selective_log_softmax = scoped("logprobs", models.selective_log_softmax, state)
    models.entropy_from_logits = scoped("logprobs", models.entropy_from_logits, state)
    training.clip_and_step = scoped("optimizer", training.clip_and_step, state)
    grpo.clip_and_step = scoped("optimizer", grpo.clip_and_step, state)
    rewards.RewardSources.score = scoped("rewards", rewards.RewardSources.score, state)
    original_build = grpo.build_engine

    def build_engine(*args, **kwargs):
        engine = original_build(*args, **kwargs)
        engine.generate = scoped("generation", engine.generate, state)
        return engine
    grpo.build_engine = build_engine

    original_fit = training.fit

    def fit(cfg, model, lengths, make_batch, *args, **kwargs):
        class Timed:
            """The host batch, whose move to the device is timed as data."""

            def __init__(self, batch):
                self.batch = batch

            def __getattr__(self, name):
                return getattr(self.batch, name)

            def __len__(self):
                return len(self.batch)

            def to(self, device):
                with record_function("phase::data"):
                    return self.batch.to(device)

        def timed_make_batch(indices):
            with record_function("phase::data"):
                return Timed(make_batch(indices))
        return original_fit(cfg, model, lengths, timed_make_batch, *args, **kwargs)
    for module in (training, sft, rm, dpo):
        module.fit = fit

    scopes = {}

    def pre_hook(module, args):
        if isinstance(module, PreTrainedModel) and state["forward"] == 0 and state["depth"] == 0:
            name = "forward" if torch.is_grad_enabled() else "forward_no_grad"
            scopes[id(module)] = record_function(f"phase::{name}").__enter__()
            state["forward"] = id(module)

    def post_hook(module, args, output):
        if state["forward"] == id(module):
            scopes.pop(id(module)).__exit__(None, None, None)
            state["forward"] = 0

    torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    torch.nn.modules.module.register_module_forward_hook(post_hook)


def profile(stage: str, shape: str, threads: int, work: Path) -> dict:
    import importlib

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from posttrain import metrics
    from posttrain.config import load_config

    spec, items = vs_trl.prepare(stage, shape, 2, threads, False, work)
    args = vs_trl.posttrain_args(stage, dict(spec, out=str(work / "out")))
    args["dataset_name"] = spec["data_posttrain"]
    cfg = load_config(stage, None, {k: str(v) for k, v in args.items()})
    state = {"depth": 0, "forward": 0}
    instrument(stage, state)
    prof = torch_profile(activities=[ProfilerActivity.CPU])
    marks: dict = {}
    original_advance = metrics.MetricsLogger.advance

    def advance(self, n: int = 1):  # called once at the end of every optimizer step
        original_advance(self, n)
        marks["steps"] = marks.get("steps", 0) + 1
        if marks["steps"] == 1:
            prof.start()
            marks["start"] = time.perf_counter()
        elif marks["steps"] == 2:
            marks["end"] = time.perf_counter()
            prof.stop()
    metrics.MetricsLogger.advance = advance
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the GRPO reward vs_trl:bench_reward
    with contextlib.redirect_stdout(sys.stderr):  # the recipe's own report; stdout is the JSON only
        importlib.import_module(f"posttrain.recipes.{stage}").main(cfg)
    step_us = (marks["end"] - marks["start"]) * 1e6
    totals = dict.fromkeys(PHASES, 0.0)
    aten = 0.0
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("phase::"):
            phase = event.name.split("::", 1)[1]
            inside_phase = any(p.name.startswith("phase::") for p in _ancestors(event))
            if not inside_phase:
                totals[phase] += event.cpu_time_total
        elif event.name.startswith("autograd::engine::evaluate_function"):
            if parent is None or not parent.name.startswith("autograd::engine::evaluate_function"):
                totals["backward"] += event.cpu_time_total
        if event.name.startswith("aten::") and not any(p.name.startswith("aten::") for p in _ancestors(event)):
            aten += event.cpu_time_total
    shares = {k: round(v / step_us, 4) for k, v in totals.items()}
    shares["other"] = round(max(0.0, 1 - sum(shares.values())), 4)
    return {"stage": stage, "shape": shape, "threads": threads, "step_ms": round(step_us / 1000, 1),
            "items_in_step": items[1], "unit": vs_trl.UNITS[stage].split("/")[0], "shares": shares,
            "aten_share": round(aten / step_us, 4), "torch_threads": torch.get_num_threads()}


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=vs_trl.STAGES)
    parser.add_argument("--shape", choices=("tiny", "medium", "smoke"), default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:
        print(json.dumps(profile(args.stage, args.shape, args.threads, Path(tmp)), indent=1))


if __name__ == "__main__":
    main()
