"""posttrain online_dpo end to end through the command line, on the random tiny Qwen2 and the arith prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

TRL_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward", "objective/scores",
               "objective/scores_margin", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta")


def test_online_dpo_trains_three_steps_and_logs_trls_metrics(cli, tiny_qwen, arith_data, tmp_path):
    out = tmp_path / "online_dpo"
    # TRL's flag names: max_new_tokens; per_device_train_batch_size counts prompts, accumulated twice per step
    proc = cli("online_dpo", "--model_name_or_path", tiny_qwen, "--dataset_name", arith_data["prompts"], "--output_dir", out,
               "--reward_funcs", "exact_match,reward_helpers:ascii_frac", "--max_new_tokens", "4", "--max_steps", "3",
               "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
               "--logging_steps", "1", "--eval_dataset_name", arith_data["eval"], "--eval_max_rows", "2",
               "--num_threads", "1", "--progress", "false", cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(math.isfinite(r[k]) for k in (*TRL_METRICS, "loss", "eval/greedy_accuracy")), r
        assert r["beta"] == 0.1 and r["objective/scores_margin"] >= 0  # the higher reward is the chosen one
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
    # step 1: the policy is the reference, so every pair's DPO loss is -log σ(0) = log 2 and the KL is 0
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and records[0]["objective/kl"] == pytest.approx(0, abs=1e-6)
    assert records[-1]["objective/kl"] != 0  # the policy moved away from the reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_copies"] == {"policy": 1, "reference": 1, "reward_model": 0}
