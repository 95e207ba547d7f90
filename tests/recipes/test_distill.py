"""End-to-end tests of posttrain distill (on-policy distillation / GKD) on tiny real models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.metrics import read_metrics
from posttrain.recipes import distill

# a student smaller than tiny_qwen (hidden 32, 2 layers), built by `model_name_or_path: tiny` with the same tokenizer
SMALL_STUDENT = ["--model_name_or_path", "tiny", "--tiny_hidden_size", "16", "--tiny_num_layers", "1",
                 "--tiny_num_heads", "2", "--tiny_intermediate_size", "32"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_qwen):
    """tiny_qwen with a 20x final norm: peaked next-token distributions, far from a fresh student's."""
    out = tmp_path_factory.mktemp("teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    with torch.no_grad():
        model.model.norm.weight.mul_(20)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_qwen).save_pretrained(out)
    return out


def eight_rows(arith_data, tmp_path):
    """One micro-batch of 8 rows: every dataset step sees the same batch, so its loss must fall."""
    rows = arith_data["sft"].read_text().splitlines()[:8]
    path = tmp_path / "sft8.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_distill_cli_three_steps_mixes_on_policy_and_dataset_batches_and_the_loss_falls(cli, teacher, arith_data, tmp_path):
    out = tmp_path / "out"
    proc = cli("distill", *SMALL_STUDENT, "--teacher_model_name_or_path", teacher, "--dataset_name",
               eight_rows(arith_data, tmp_path), "--output_dir", out, "--max_steps", "3", "--logging_steps", "1",
               "--learning_rate", "3e-2", "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "8",
               "--max_new_tokens", "6", "--max_length", "32", "--max_prompt_length", "16", "--beta", "0",
               "--num_threads", "1", "--progress", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3]
    on_policy = [r["on_policy"] for r in lines]
    assert 0.0 in on_policy and 1.0 in on_policy, on_policy  # lmbda 0.5: both kinds of micro-batch ran
    dataset = [r["loss"] for r in lines if r["on_policy"] == 0.0]
    assert len(dataset) >= 2 and dataset[-1] < dataset[0], dataset  # the same 8 rows, a closer student
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_copies"] == {"policy": 1, "teacher": 1}
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.hidden_size == 16


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(teacher, arith_data, tmp_path):
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(teacher).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    flags = dict(zip(SMALL_STUDENT[::2], SMALL_STUDENT[1::2]))
    values = {k.lstrip("-"): v for k, v in flags.items()}
    values.update({"teacher_model_name_or_path": str(other), "dataset_name": str(eight_rows(arith_data, tmp_path)),
                   "output_dir": str(tmp_path / "out"), "max_steps": "1", "num_threads": "1", "progress": "false"})
    with pytest.raises(UserError, match=r"field 'teacher_model_name_or_path': .* does not share the student's tokenizer") as err:
        distill.main(load_config("distill", None, values))
    assert "\n" not in str(err.value)


def test_distill_needs_a_teacher_and_lmbda_and_beta_in_0_1():
    with pytest.raises(UserError, match="teacher_model_name_or_path' is required"):
        load_config("distill", None, {"dataset_name": "d.jsonl"}, check_paths=True)
    for name in ("lmbda", "beta"):
        with pytest.raises(UserError, match=rf"field '{name}' must be in \[0, 1\]"):
            load_config("distill", None, {"dataset_name": "d.jsonl", "teacher_model_name_or_path": "t", name: "1.5"})


def test_a_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_runs_weights(teacher, arith_data, tmp_path):
    """The lmbda coins and the sampling keys come from the checkpointed RNG: a resumed run samples the same batches.

    (The SIGTERM / SIGKILL machinery is the shared training.fit's, killed for real in tests/test_kill_resume.py.)"""
    from safetensors.torch import load_file

    def run(out, **extra):
        values = {"model_name_or_path": "tiny", "tiny_hidden_size": "16", "tiny_num_layers": "1", "tiny_num_heads": "2",
                  "tiny_intermediate_size": "32", "teacher_model_name_or_path": str(teacher),
                  "dataset_name": str(arith_data["sft"]), "output_dir": str(out), "max_steps": "4", "save_steps": "2",
                  "logging_steps": "1", "learning_rate": "1e-2", "per_device_train_batch_size": "4", "max_new_tokens": "4",
                  "max_length": "32", "num_threads": "1", "progress": "false", **extra}
        distill.main(load_config("distill", None, values))
        return read_metrics(out / "metrics.jsonl")

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert {r["on_policy"] for r in full} == {0.0, 1.0}  # both kinds of batch, before and after the checkpoint
    assert [(r["step"], r["loss"], r["on_policy"]) for r in resumed] == [(r["step"], r["loss"], r["on_policy"]) for r in full[2:]]
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
