"""The critic-free estimators and policy losses end to end through the command line, on the random tiny Qwen2.

Each run is two rollout steps of `posttrain grpo` (or `posttrain rloo`) with
one new option: the logged loss is finite and every trainable tensor moved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

BASE = ["--reward_funcs", "reward_helpers:ascii_frac", "--max_completion_length", "4", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--max_steps", "2",
        "--num_threads", "1", "--progress", "false", "--eval_max_rows", "1"]

RUNS = {
    "rloo_stage": ["rloo"],
    "rloo_normalized_k3_in_loss": ["rloo", "--normalize_advantages", "true", "--kl_in_reward", "false", "--kl_estimator", "k3"],
    "reinforce_pp": ["grpo", "--advantage_estimator", "reinforce_pp", "--kl_in_reward", "true", "--kl_estimator", "k1"],
    "reinforce_pp_baseline": ["grpo", "--advantage_estimator", "reinforce_pp_baseline", "--beta", "0"],
    "remax": ["grpo", "--advantage_estimator", "remax", "--num_generations", "2"],
    "gspo": ["grpo", "--importance_sampling_level", "sequence", "--num_iterations", "2", "--epsilon", "3e-4",
             "--epsilon_high", "4e-4"],
    "cispo": ["grpo", "--loss_type", "cispo", "--epsilon_high", "5.0", "--num_iterations", "2", "--cispo_two_sided", "true"],
    "sapo": ["grpo", "--loss_type", "sapo", "--num_iterations", "2"],
    "delta_k3_plus": ["grpo", "--delta", "1.5", "--kl_estimator", "k3_plus", "--num_iterations", "2"],
    "dual_clip": ["grpo", "--clip_ratio_c", "3", "--num_iterations", "2", "--kl_in_reward", "true"],
}


def trainable_change(before: Path, after: Path) -> list[str]:
    """Names of parameters that did NOT change."""
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(before).state_dict()
    b = AutoModelForCausalLM.from_pretrained(after).state_dict()
    return [k for k in a if torch.equal(a[k], b[k])]


@pytest.mark.parametrize("name", list(RUNS))
def test_each_estimator_and_loss_trains_from_the_cli(name, cli, tiny_qwen, arith_data, tmp_path):
    stage, *flags = RUNS[name]
    helpers = Path(__file__).parent
    out = tmp_path / name
    proc = cli(stage, "--model_name_or_path", tiny_qwen, "--dataset_name", arith_data["prompts"], "--output_dir", out,
               *BASE, *flags, cwd=helpers)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), records
    assert all(math.isfinite(r["reward"]) for r in records if "reward" in r)
    unchanged = trainable_change(tiny_qwen, out)
    # tied embeddings aside, every tensor of the tiny model is trained
    assert not unchanged, f"{name}: unchanged {unchanged}"
    if stage == "rloo" or "--kl_in_reward" in flags or name == "delta_k3_plus":
        assert "kl" in records[-1] and math.isfinite(records[-1]["kl"])
