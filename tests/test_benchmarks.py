"""Smoke runs of the benchmark scripts, so they never rot (their figures are not checked here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_logprob_loops_benchmark_prints_json():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "logprob_loops.py"), "--batch", "4", "--tokens", "3",
                           "--vocab", "11", "--repeats", "2"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["speedup_logps"] > 0 and set(result["median_s"]) == {"logps_per_row", "logps_chunked",
                                                                        "entropy_per_row", "entropy_chunked"}


def test_padding_free_benchmark_prints_json():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "padding_free.py"), "--hidden", "16", "--layers", "1",
                           "--heads", "2", "--intermediate", "32", "--vocab", "40", "--batch", "3", "--min_length", "4",
                           "--max_length", "12", "--repeats", "2", "--threads", "1"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for stage in ("sft", "dpo"):
        tokens = result[stage]["tokens_per_batch"]
        assert 0 < tokens["packed"] <= tokens["padded"]  # packing never computes more positions than padding
        assert result[stage]["speedup"] > 0


def test_logprob_memory_benchmark_prints_json():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "logprob_memory.py"), "--batch", "2", "--tokens", "5",
                           "--vocab", "64", "--hidden", "8", "--chunk-tokens", "3", "--chunk-sweep", "4", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["memory_ratio"] > 0 and result["time_ratio"] > 0 and result["chunk_tokens"] == 3
    assert set(result["peak_extra_mb"]) == {"plain", "chunked"} and result["chunk_sweep"][0]["chunk_tokens"] == 4


def test_rollout_benchmark_prints_json():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rollout.py"), "--shapes", "tiny", "--hidden_size", "32",
                           "--prompts", "2", "--max_new_tokens", "4", "--steps", "1", "--repeats", "1", "--naive_rows", "1"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    tiny = json.loads(done.stdout)["tiny"]
    assert 0 < tiny["grpo"]["generation_share"] < 1 and 0 < tiny["ppo"]["generation_share"] < 1
    assert set(tiny["completions_per_s"]) == {"posttrain", "posttrain_no_group_cache", "model_generate", "naive_loop"}


def test_vs_trl_smoke_runs_both_sides_of_every_stage(tmp_path):
    """posttrain and TRL each train every stage on the same rows: throughputs and ratios are consistent, and TRL's
    own count of SFT tokens equals the count posttrain's tokenisation gives (so both saw the same data)."""
    import importlib.util

    assert importlib.util.find_spec("trl") is not None, "TRL is part of the test extra (pip install -e .[test])"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vs_trl.py"), "sft", "rm", "dpo", "grpo", "--smoke",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert set(results) == {"sft", "rm", "dpo", "grpo"}
    for stage, result in results.items():
        assert result["steps"] == 2 and result["timed_steps"] == 1
        for side in ("posttrain", "trl"):
            assert result[side]["items_per_s"] > 0 and result[side]["peak_rss_mb"] > 100, (stage, side)
        timed = sum(result["items_per_step"][1:])
        for side in ("posttrain", "trl"):
            run = result[side]["runs"][0]
            assert abs(run["items_per_s"] - timed / run["seconds"]) <= 1e-3 * run["items_per_s"] + 1e-3
        expected = result["posttrain"]["items_per_s"] / result["trl"]["items_per_s"]
        assert abs(result["ratio"]["throughput"] - expected) <= 1e-3 * expected + 1e-3
    assert results["rm"]["items_per_step"] == results["dpo"]["items_per_step"] == [2.0, 2.0]  # pairs per batch
    assert results["grpo"]["items_per_step"] == [2.0, 2.0]  # 1 prompt x 2 completions
    assert results["sft"]["trl_num_tokens"] == sum(results["sft"]["items_per_step"])
    # posttrain logged every step of every stage
    for stage in results:
        steps = [json.loads(line)["step"] for line in (tmp_path / stage / "out" / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]


def test_profile_step_shares_cover_the_step():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "sft", "--shape", "smoke"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    shares = result["shares"]
    assert abs(sum(shares.values()) - 1) < 0.02 and all(v >= 0 for v in shares.values())
    # an SFT step is forward, log-probs, backward and the optimizer; it generates nothing and has no reward
    assert shares["forward"] > 0 and shares["backward"] > 0 and shares["optimizer"] > 0 and shares["logprobs"] > 0
    assert shares["generation"] == shares["rewards"] == shares["forward_no_grad"] == 0
