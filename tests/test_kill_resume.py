"""Real subprocesses killed and interrupted, for every stage variant.

Each variant runs once uninterrupted. A second run of the same command gets
SIGTERM or SIGINT mid-run (it must finish its step, save a checkpoint and exit
143 / 130), is
restarted with `--resume_from_checkpoint latest` and SIGKILLed at a random
moment (during a checkpoint save when one is caught in the act), and is
restarted again to the end: its final weights must equal the uninterrupted
run's bit for bit, and its metrics too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests" / "recipes") not in sys.path:  # reward_helpers, for the in-process run
    sys.path.insert(0, str(REPO / "tests" / "recipes"))
VARIANTS = {
    "sft": ("sft", ["--dataset_name", "{sft}", "--per_device_train_batch_size", "8"]),
    "rm": ("rm", ["--dataset_name", "{preference}", "--per_device_train_batch_size", "8", "--eval_split", "0"]),
    "dpo": ("dpo", ["--dataset_name", "{preference}", "--per_device_train_batch_size", "8"]),
    "ppo_separate": ("ppo", ["--dataset_name", "{prompts}", "--per_device_train_batch_size", "8", "--critic", "separate",
                             "--reward_funcs", "reward_helpers:ascii_frac", "--max_completion_length", "4",
                             "--num_ppo_epochs", "1"]),
    "ppo_shared": ("ppo", ["--dataset_name", "{prompts}", "--per_device_train_batch_size", "8", "--critic", "shared",
                           "--reward_funcs", "reward_helpers:ascii_frac", "--max_completion_length", "4",
                           "--num_ppo_epochs", "1"]),
    "grpo": ("grpo", ["--dataset_name", "{prompts}", "--per_device_train_batch_size", "4", "--num_generations", "2",
                      "--reward_funcs", "reward_helpers:ascii_frac", "--max_completion_length", "4"]),
    "online_dpo": ("online_dpo", ["--dataset_name", "{prompts}", "--per_device_train_batch_size", "2",
                                  "--reward_funcs", "reward_helpers:ascii_frac", "--max_completion_length", "4"]),
}
STEPS = 24
SLOW_VARIANTS = ("online_dpo",)  # about 30 s on one core: outside `make test`'s budget, run with -m slow


def command(variant: str, model: Path, data: dict, out: Path, *extra: str) -> list[str]:
    stage, fields = VARIANTS[variant]
    fields = [f.format(**{k: str(v) for k, v in data.items()}) for f in fields]
    return [sys.executable, "-m", "posttrain", stage, "--model_name_or_path", str(model), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--save_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--num_threads", "1", "--progress", "false", "--seed", "0", *fields, *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "recipes")]))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(proc: subprocess.Popen, out: Path, steps: int, timeout: float = 240) -> bool:
    """Poll until ``steps`` metrics lines exist (True) or the process ended (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if len(read_metrics(out / "metrics.jsonl")) >= steps or list(out.glob("checkpoint-*.tmp")):
            return True
        time.sleep(0.005)
    raise AssertionError("the run did not progress")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v in SLOW_VARIANTS else v for v in VARIANTS])
def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_qwen, arith_data, variant):
    rng = random.Random(variant)
    full, broken = tmp_path / "full", tmp_path / "broken"
    from posttrain import cli

    assert cli.main(command(variant, tiny_qwen, arith_data, full)[3:]) == 0  # uninterrupted, in-process

    # 1. SIGTERM (a scheduler's pre-emption) or SIGINT (Ctrl-C) mid-run: the step finishes, a checkpoint is
    # written, exit 143 / 130 with a note on how to resume
    signum, code = (signal.SIGINT, 130) if variant in ("sft", "dpo", "grpo") else (signal.SIGTERM, 143)
    proc = start(command(variant, tiny_qwen, arith_data, broken))
    assert wait_for(proc, broken, rng.randint(2, 8)), "finished before the signal"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err[-2000:]
    assert "resume with --resume_from_checkpoint latest" in err
    assert not (broken / "model.safetensors").exists()

    # 2. resumed, then SIGKILLed at a random moment (mid-save if one is caught)
    proc = start(command(variant, tiny_qwen, arith_data, broken, "--resume_from_checkpoint", "latest"))
    if wait_for(proc, broken, len(read_metrics(broken / "metrics.jsonl")) + rng.randint(1, 6)):
        proc.kill()
    proc.communicate(timeout=240)

    # 3. resumed to the end
    done = subprocess.run(command(variant, tiny_qwen, arith_data, broken, "--resume_from_checkpoint", "latest"),
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1",
                                   PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "recipes")])))
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(str(full / "model.safetensors")), load_file(str(broken / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), f"{variant}: {key} differs after kill and resume"
    metrics_a, metrics_b = read_metrics(full / "metrics.jsonl"), read_metrics(broken / "metrics.jsonl")
    assert [r["step"] for r in metrics_b] == list(range(1, STEPS + 1))
    for ra, rb in zip(metrics_a, metrics_b):
        assert ra["loss"] == rb["loss"], (variant, ra["step"])
