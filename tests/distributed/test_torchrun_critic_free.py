"""Real torchrun processes on CPU (gloo): the critic-free estimators on 2 ranks equal one process.

`posttrain rloo` (leave-one-out baseline, KL in the reward, normalize_advantages
over the global batch), grpo with REINFORCE++-baseline (token returns with
the KL, whitened over every rank's tokens) and GSPO's sequence ratio, and
`posttrain online_dpo` (pairs judged on each rank, accumulated): 2 ranks x
b prompts end with the weights of 1 process x 2b prompts. Completions come from
the fixed rollout engine of tests/distributed/fixed_engine.py, so the update is
what is compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_torchrun import TOLERANCE, first_lines, launch, max_difference

from posttrain.metrics import read_metrics

RUNS = {
    "rloo": ["rloo", "--normalize_advantages", "true", "--num_iterations", "2"],
    "reinforce_pp_baseline": ["grpo", "--advantage_estimator", "reinforce_pp_baseline", "--kl_in_reward", "true",
                              "--num_generations", "2"],
    "gspo_cispo": ["grpo", "--importance_sampling_level", "sequence", "--loss_type", "cispo", "--epsilon_high", "1.1",
                   "--num_iterations", "2", "--num_generations", "2"],
    # pairs judged by length_reward, accumulated over 2 micro-batches of per_device_train_batch_size prompts
    "online_dpo": ["online_dpo", "--gradient_accumulation_steps", "2"],
}


def jobs(root: Path, model: Path, prompts: Path, per_device: int) -> list[list[str]]:
    common = ["--model_name_or_path", str(model), "--num_threads", "1", "--progress", "false", "--seed", "0",
              "--logging_steps", "1", "--learning_rate", "1e-4", "--dataset_name", str(prompts),
              "--rollout_engine", "fixed_engine:fixed_completions", "--reward_funcs", "fixed_engine:length_reward",
              "--max_completion_length", "5", "--max_steps", "2", "--per_device_train_batch_size", str(per_device)]
    return [[stage, *common, *flags, "--output_dir", str(root / name)] for name, (stage, *flags) in RUNS.items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen, arith_data):
    root = tmp_path_factory.mktemp("torchrun_critic_free")
    prompts = first_lines(arith_data["prompts"], root / "prompts.jsonl", 48)
    launch(jobs(root / "one", tiny_qwen, prompts, 4), root, 1)
    launch(jobs(root / "ddp", tiny_qwen, prompts, 2), root, 2)
    return {"root": root, "model": tiny_qwen}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_equal_one_process(runs, name):
    one, many = runs["root"] / "one" / name, runs["root"] / "ddp" / name
    assert max_difference(one, Path(runs["model"]), same_keys=False) > 10 * TOLERANCE
    assert max_difference(one, many) <= TOLERANCE
    for a, b in zip(read_metrics(one / "metrics.jsonl"), read_metrics(many / "metrics.jsonl"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        for key in ("reward", "objective/scores", "rewards/margins", "objective/kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
