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
