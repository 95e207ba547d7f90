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


def test_rollout_benchmark_prints_json():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rollout.py"), "--shapes", "tiny", "--hidden_size", "32",
                           "--prompts", "2", "--max_new_tokens", "4", "--steps", "1", "--repeats", "1", "--naive_rows", "1"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    tiny = json.loads(done.stdout)["tiny"]
    assert 0 < tiny["grpo"]["generation_share"] < 1 and 0 < tiny["ppo"]["generation_share"] < 1
    assert set(tiny["completions_per_s"]) == {"posttrain", "posttrain_no_group_cache", "model_generate", "naive_loop"}
