"""Multi-turn rollouts under real torchrun processes on CPU (gloo): 2 ranks equal one process.

The rollout engine is scripted (tests/agent_helpers.py:scripted_engine), so the
samples are the same however the batch is split; each rank rolls out whole
groups (a prompt's G trajectories and their environments stay on one rank),
and the update over tool-masked trajectories matches the one-process run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_torchrun import first_lines, launch

from posttrain.metrics import read_metrics

HERE = Path(__file__).resolve().parent


def jobs(root: Path, model: Path, prompts: Path, per_device: int, extra: list[str]) -> list[list[str]]:
    common = ["--model_name_or_path", str(model), "--num_threads", "1", "--progress", "false", "--seed", "0",
              "--logging_steps", "1", "--learning_rate", "1e-3", "--dataset_name", str(prompts),
              "--environment", "agent_helpers:Calculator", "--rollout_engine", "agent_helpers:scripted_engine",
              "--reward_funcs", "agent_helpers:used_calculator", "--max_completion_length", "150", "--max_steps", "2",
              *extra]
    return [["grpo", *common, "--per_device_train_batch_size", str(per_device), "--num_generations", "2",
             "--loss_type", "dapo", "--output_dir", str(root / "grpo")],
            ["ppo", *common, "--per_device_train_batch_size", str(2 * per_device), "--critic", "shared",
             "--num_ppo_epochs", "1", "--output_dir", str(root / "ppo")]]


@pytest.mark.slow
def test_multi_turn_two_ranks_equal_one_process(tmp_path, tiny_qwen, arith_data):
    shutil.copy(HERE.parent / "agent_helpers.py", tmp_path / "agent_helpers.py")
    prompts = first_lines(arith_data["prompts"], tmp_path / "prompts.jsonl", 16)
    launch(jobs(tmp_path / "one", tiny_qwen, prompts, 4, []), tmp_path, 1)
    launch(jobs(tmp_path / "ddp", tiny_qwen, prompts, 2, []), tmp_path, 2)
    for stage in ("grpo", "ppo"):
        a = load_file(str(tmp_path / "one" / stage / "model.safetensors"))
        b = load_file(str(tmp_path / "ddp" / stage / "model.safetensors"))
        start = load_file(str(tiny_qwen / "model.safetensors"))
        assert any(not torch.equal(a[k], start[k]) for k in a), f"{stage}: the run trained"
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=f"{stage}: {key}")
        one, ddp = read_metrics(tmp_path / "one" / stage / "metrics.jsonl"), read_metrics(tmp_path / "ddp" / stage / "metrics.jsonl")
        calls = 0.5 if stage == "grpo" else 1.0  # grpo: odd rows of a group call no tool; ppo: one row per prompt
        for r, s in zip(one, ddp):
            assert r["tools/call_frequency"] == s["tools/call_frequency"] == calls
            assert r["num_turns"] == s["num_turns"] == 1 + calls


@pytest.mark.slow
def test_multi_turn_sampling_under_fsdp2_finishes(tmp_path, tiny_qwen, arith_data):
    """Real sampling of every turn after the first (forced to call `add`) under FSDP2: every rank keeps stepping
    its generate calls together, so ranks whose trajectories end at different turns do not deadlock."""
    shutil.copy(HERE.parent / "agent_helpers.py", tmp_path / "agent_helpers.py")
    prompts = first_lines(arith_data["prompts"], tmp_path / "prompts.jsonl", 16)
    run = jobs(tmp_path / "fsdp", tiny_qwen, prompts, 2, ["--fsdp", "true"])
    run = [[v if v != "agent_helpers:scripted_engine" else "agent_helpers:forced_call_engine" for v in job] for job in run]
    launch(run, tmp_path, 2)
    for stage in ("grpo", "ppo"):
        records = [r for r in read_metrics(tmp_path / "fsdp" / stage / "metrics.jsonl") if "loss" in r]
        assert len(records) == 2 and all(r["tools/call_frequency"] == 1.0 for r in records)
