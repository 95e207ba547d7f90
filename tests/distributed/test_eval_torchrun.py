"""Held-out evaluation under torchrun (CPU, gloo): 2 ranks, under DDP and FSDP2, log the eval/... figures of
one process. 5 held-out rows in global batches of 4 leave the ranks unequal shares (and one rank an empty
last batch), which the reduction must weigh right and FSDP2 must survive."""

from __future__ import annotations

import json

import pytest
from test_torchrun import first_lines, launch

from posttrain.metrics import read_metrics


def jobs(root, model, data, per_device: int, extra):
    """The same global batch of 2·per_device rows (prompts for grpo) on one process or two ranks."""
    common = ["--model_name_or_path", str(model), "--num_threads", "1", "--progress", "false", "--seed", "0",
              "--logging_steps", "1", "--max_steps", "2", "--learning_rate", "1e-4", "--max_length", "32",
              "--max_prompt_length", "16", *extra]
    return [
        ["sft", *common, "--dataset_name", str(data["sft"]), "--eval_dataset_name", str(data["sft_eval"]),
         "--per_device_train_batch_size", str(2 * per_device), "--output_dir", str(root / "sft")],
        ["dpo", *common, "--dataset_name", str(data["preference"]), "--eval_dataset_name", str(data["preference_eval"]),
         "--per_device_train_batch_size", str(2 * per_device), "--output_dir", str(root / "dpo")],
        ["rm", *common, "--dataset_name", str(data["preference"]), "--eval_dataset_name", str(data["preference_eval"]),
         "--per_device_train_batch_size", str(2 * per_device), "--output_dir", str(root / "rm")],
        ["grpo", *common, "--dataset_name", str(data["prompts"]), "--eval_dataset_name", str(data["eval"]),
         "--rollout_engine", "fixed_engine:fixed_completions", "--reward_funcs", "fixed_engine:length_reward",
         "--max_completion_length", "4", "--per_device_train_batch_size", str(per_device), "--num_generations", "2",
         "--output_dir", str(root / "grpo")],
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen, arith_data):
    root = tmp_path_factory.mktemp("eval_torchrun")
    data = {k: first_lines(arith_data[k], root / f"{k}.jsonl", 8) for k in ("sft", "preference", "prompts")}
    for k in ("sft", "preference"):
        rows = arith_data[k].read_text().splitlines(keepends=True)[100:105]
        (root / f"{k}_eval.jsonl").write_text("".join(rows))
        data[f"{k}_eval"] = root / f"{k}_eval.jsonl"
    data["eval"] = first_lines(arith_data["eval"], root / "eval.jsonl", 5)
    launch(jobs(root / "one", tiny_qwen, data, 2, []), root, 1)
    launch(jobs(root / "ddp", tiny_qwen, data, 1, []), root, 2)
    launch(jobs(root / "fsdp", tiny_qwen, data, 1, ["--fsdp", "true"]), root, 2)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("stage", ["sft", "dpo", "rm", "grpo"])
def test_two_ranks_log_the_eval_figures_of_one_process(runs, stage, mode):
    one, many = (read_metrics(runs / m / stage / "metrics.jsonl") for m in ("one", mode))
    keys = {k for k in one[0] if k.startswith("eval/")}
    assert keys, one[0]
    for a, b in zip(one, many):
        assert {k for k in b if k.startswith("eval/")} == keys
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, json.dumps(a), json.dumps(b))
