"""Real torchrun processes on CPU (gloo): N ranks equal one process for the same global batch.

For sft, rm, dpo, kto and orpo, 2 ranks x batch b end with the same weights as 1 process x
batch 2b, under DDP and FSDP2. PPO, GRPO and distill (its on-policy batches) compare the same way with a rollout
engine of fixed completions (tests/distributed/fixed_engine.py), so the test
checks the distributed update itself: whitening, group statistics, token
counts, KL control. Checkpoints resume 2 -> 1 and 1 -> 2 from FSDP2 and whole
checkpoints, and real sampling runs under FSDP2 without deadlock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.metrics import read_metrics

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOLERANCE = 1e-5
STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "kto", "distill", "orpo")


def launch(jobs: list[list[str]], workdir: Path, nproc: int, timeout: int = 600) -> None:
    """Run ``jobs`` in one process (nproc 1) or under torchrun with ``nproc`` ranks."""
    spec = workdir / f"jobs-{len(list(workdir.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), str(REPO / "tests" / "recipes")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    runner = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={nproc}"]
    done = subprocess.run([*runner, str(HERE / "drive.py"), str(spec)], capture_output=True, text=True, env=env,
                          cwd=workdir, timeout=timeout)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise AssertionError(f"{nproc}-process run failed ({done.returncode}):\n{tail}")


def stage_jobs(root: Path, model: Path, data: dict, per_device: int, extra: list[str]) -> list[list[str]]:
    """One command per stage; ``per_device`` rows (pairs, prompts) per rank."""
    common = ["--model_name_or_path", str(model), "--num_threads", "1", "--progress", "false", "--seed", "0",
              "--logging_steps", "1", "--learning_rate", "1e-4", *extra]
    rl = ["--dataset_name", str(data["prompts"]), "--rollout_engine", "fixed_engine:fixed_completions",
          "--reward_funcs", "fixed_engine:length_reward", "--max_completion_length", "5", "--max_steps", "2",
          "--save_steps", "1"]
    return [
        ["sft", *common, "--dataset_name", str(data["sft"]), "--per_device_train_batch_size", str(per_device),
         "--gradient_accumulation_steps", "2", "--max_steps", "3", "--save_steps", "2", "--output_dir", str(root / "sft")],
        ["rm", *common, "--dataset_name", str(data["preference"]), "--eval_split", "0", "--max_steps", "3",
         "--per_device_train_batch_size", str(per_device), "--output_dir", str(root / "rm")],
        ["dpo", *common, "--dataset_name", str(data["preference"]), "--max_steps", "3", "--save_steps", "2",
         "--per_device_train_batch_size", str(per_device), "--output_dir", str(root / "dpo")],
        # orpo: the dpo loop, reference-free, with an NLL averaged per pair (so pairs of unequal length split evenly)
        ["orpo", *common, "--dataset_name", str(data["preference"]), "--max_steps", "3", "--gradient_accumulation_steps", "2",
         "--per_device_train_batch_size", str(per_device // 2), "--output_dir", str(root / "orpo")],
        ["ppo", *common, *rl, "--per_device_train_batch_size", str(per_device), "--num_ppo_epochs", "2",
         "--target_kl_coef", "0.5", "--output_dir", str(root / "ppo")],
        ["grpo", *common, *rl, "--per_device_train_batch_size", str(per_device // 2), "--num_generations", "4",
         "--scale_rewards", "batch", "--loss_type", "dapo", "--num_iterations", "2", "--output_dir", str(root / "grpo")],
        # z0 from the mismatched pairs of the global micro-batch, its mean summed over ranks
        ["kto", *common, "--dataset_name", str(data["preference"]), "--max_steps", "3", "--undesirable_weight", "1.5",
         "--learning_rate", "3e-3", "--per_device_train_batch_size", str(per_device), "--output_dir", str(root / "kto")],
        # the one-process run's SFT model teaches; lmbda 0.5 mixes fixed "student" completions and the dataset's
        ["distill", *common, "--dataset_name", str(data["sft"]), "--teacher_model_name_or_path", str(root.parent / "one" / "sft"),
         "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", "2", "--max_steps", "3",
         "--lmbda", "0.5", "--rollout_engine", "fixed_engine:fixed_completions", "--max_new_tokens", "5",
         "--learning_rate", "3e-4", "--output_dir", str(root / "distill")],  # a teacher this close moves weights slowly
    ]


def first_lines(src: Path, dest: Path, n: int) -> Path:
    dest.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dest


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen, arith_data):
    """1 process x batch 8, and 2 ranks x batch 4 under DDP and under FSDP2, for every stage."""
    root = tmp_path_factory.mktemp("torchrun")
    data = {k: first_lines(arith_data[k], root / f"{k}.jsonl", 48) for k in ("sft", "preference", "prompts")}
    launch(stage_jobs(root / "one", tiny_qwen, data, 8, []), root, 1)
    launch(stage_jobs(root / "ddp", tiny_qwen, data, 4, []), root, 2)
    fsdp = stage_jobs(root / "fsdp", tiny_qwen, data, 4, ["--fsdp", "true"])
    # real sampling under FSDP2: ranks finish generating at different lengths and must not deadlock
    fsdp.append(["grpo", "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(data["prompts"]),
                 "--num_threads", "1", "--progress", "false", "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--logging_steps", "1",
                 "--num_generations", "2", "--max_completion_length", "8", "--fsdp", "true",
                 "--reward_funcs", "fixed_engine:length_reward", "--output_dir", str(root / "sampled_grpo")])
    # FSDP2 composes with LoRA and activation checkpointing
    fsdp.append(["dpo", "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(data["preference"]),
                 "--num_threads", "1", "--progress", "false", "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--logging_steps", "1", "--fsdp", "true", "--use_peft", "true", "--lora_r", "4",
                 "--gradient_checkpointing", "true", "--learning_rate", "1e-2", "--output_dir", str(root / "lora_dpo")])
    # a LoRA reward model (adapters + score head) saved from the unsharded replica
    fsdp.append(["rm", "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(data["preference"]),
                 "--num_threads", "1", "--progress", "false", "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--logging_steps", "1", "--fsdp", "true", "--use_peft", "true", "--lora_r", "4", "--eval_split", "0",
                 "--learning_rate", "1e-2", "--output_dir", str(root / "lora_rm")])
    launch(fsdp, root, 2)
    return {"root": root, "model": tiny_qwen, "data": data}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a: Path, b: Path, same_keys: bool = True) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() or not same_keys
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa.keys() & wb.keys())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_equal_one_process(runs, stage, mode):
    one, many = runs["root"] / "one" / stage, runs["root"] / mode / stage
    before = max_difference(one, Path(runs["model"]), same_keys=False)
    if stage == "rm":  # the scalar head starts at 0
        before = max(before, float(weights(one)["score.weight"].abs().max()))
    assert before > 10 * TOLERANCE, "the run must have moved the weights for the comparison to mean anything"
    assert max_difference(one, many) <= TOLERANCE
    if stage == "ppo":
        assert max_difference(one / "critic", many / "critic") <= TOLERANCE
    # one metrics line per logged step, whatever the number of ranks, with the same values
    lines_one, lines_many = read_metrics(one / "metrics.jsonl"), read_metrics(many / "metrics.jsonl")
    assert [r["step"] for r in lines_many] == [r["step"] for r in lines_one] == list(range(1, len(lines_one) + 1))
    # the logged loss is the global batch's, not a rank's
    for a, b in zip(lines_one, lines_many):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        if stage == "kto":  # z0: the global micro-batch's mismatched pairs, not each rank's
            assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-6)


def test_fsdp_checkpoint_is_sharded_and_holds_no_pickle(runs):
    ckpt = runs["root"] / "fsdp" / "dpo" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"model", "optimizer", "optimizer.json", "rng-0.json", "rng-1.json", "manifest.json"} <= names
    shards = sorted(p.name for p in (ckpt / "model").iterdir())
    assert len(shards) == 2 and all(n.endswith(".safetensors") for n in shards)
    assert not [p for p in ckpt.rglob("*") if p.is_file() and p.suffix in (".pt", ".bin", ".pkl", ".metadata")]


def test_real_sampling_under_fsdp_completes(runs):
    out = runs["root"] / "sampled_grpo"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_fsdp_with_lora_and_checkpointing_trains_adapters_and_saves_merged_weights(runs):
    from transformers import AutoModelForCausalLM

    out = runs["root"] / "lora_dpo"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert not any("lora" in k for k in merged), "the adapters are merged into plain weights"
    moved = max_difference(out, Path(runs["model"]))
    assert moved > 1e-4, "the merged adapters changed the weights"
    # the peft adapter saved beside them is the same model: base + adapter, merged by peft
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(runs["model"], dtype=torch.float32)
    by_peft = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
    for name, value in merged.items():
        torch.testing.assert_close(by_peft[name], value, rtol=0, atol=1e-5, msg=name)


def test_fsdp_with_lora_reward_model_saves_adapter_and_trained_head(runs):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = runs["root"] / "lora_rm"
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert float(merged.score.weight.detach().abs().max()) > 0, "the score head starts at 0 and trained"
    base = AutoModelForSequenceClassification.from_pretrained(runs["model"], num_labels=1, dtype=torch.float32)
    by_peft = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(by_peft[name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_resume_across_world_sizes(runs, stage):
    """2 -> 1 from an FSDP2 checkpoint and 1 -> 2 (FSDP2) from a whole one end like the uninterrupted run."""
    root, data = runs["root"], runs["data"]
    one_job = stage_jobs(root / "resumed_2to1", runs["model"], data, 8, [])[STAGES.index(stage)]
    one_job += ["--resume_from_checkpoint", str(root / "fsdp" / stage / "checkpoint-2")]
    launch([one_job], root, 1)
    many_job = stage_jobs(root / "resumed_1to2", runs["model"], data, 4, ["--fsdp", "true"])[STAGES.index(stage)]
    many_job += ["--resume_from_checkpoint", str(root / "one" / stage / "checkpoint-2")]
    launch([many_job], root, 2)
    for resumed in ("resumed_2to1", "resumed_1to2"):
        assert max_difference(root / "one" / stage, root / resumed / stage) <= TOLERANCE, resumed
        assert [r["step"] for r in read_metrics(root / resumed / stage / "metrics.jsonl")] == [3]


def test_torchrun_dpo_command_line(tmp_path, tiny_qwen, arith_data):
    """`torchrun -m posttrain dpo` on the demo's pair data: one metrics line per logged step, a loadable model."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    pairs = first_lines(arith_data["preference"], tmp_path / "pairs.jsonl", 64)
    out = tmp_path / "dpo"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "posttrain", "dpo", "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(pairs),
                           "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "2",
                           "--per_device_train_batch_size", "4", "--num_threads", "1", "--progress", "false"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_ranks_sample_from_their_own_streams(tmp_path, tiny_qwen, arith_data):
    """2 ranks, the same prompt on each: set-up leaves the same RNG on both (initial weights agree), while the
    completions each rank samples differ (one stream per rank, seeded seed + rank, not the shared one)."""
    prompt = arith_data["prompts"].read_text().splitlines()[0]
    prompts = tmp_path / "one_prompt.jsonl"
    prompts.write_text((prompt + "\n") * 4)
    fields = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(prompts), "seed": "0", "num_threads": "1"}
    argv = ["grpo", *[x for k, v in fields.items() for x in (f"--{k}", v)], "--output_dir", str(tmp_path / "out"),
            "--progress", "false", "--max_steps", "2", "--per_device_train_batch_size", "1", "--num_generations", "4",
            "--max_completion_length", "8", "--logging_steps", "1", "--reward_funcs", "rank_sampling:record_completions"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"fields": fields, "argv": argv}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "rank_sampling.py"), str(spec)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    init = [json.loads((tmp_path / f"init-rank{r}.json").read_text()) for r in (0, 1)]
    assert init[0] == init[1], "set-up seeds every rank alike: models initialised there start equal"
    rows = [[json.loads(line) for line in (tmp_path / f"completions-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 2 * 4 and {r["prompt"] for r in rows[0] + rows[1]} == {rows[0][0]["prompt"]}
    same = sum(a["completion"] == b["completion"] for a, b in zip(rows[0], rows[1]))
    assert same < len(rows[0]) // 2, f"{same} of {len(rows[0])} completions of the same prompt are equal on both ranks"


@pytest.mark.slow
def test_fewer_prompts_than_the_global_batch_run_under_torchrun(tmp_path, tiny_qwen, arith_data):
    """3 prompts, global batch 4 (2 ranks x 2): every batch is full, completed from the next epoch's order,
    so both ranks get 2 prompts (unequal shares made all_gather see unequal shapes and fail)."""
    prompts = first_lines(arith_data["prompts"], tmp_path / "three.jsonl", 3)
    common = ["--model_name_or_path", str(tiny_qwen), "--num_threads", "1", "--progress", "false", "--seed", "0",
              "--logging_steps", "1", "--dataset_name", str(prompts), "--rollout_engine", "fixed_engine:fixed_completions",
              "--reward_funcs", "fixed_engine:length_reward", "--max_completion_length", "5", "--max_steps", "2",
              "--per_device_train_batch_size", "2"]
    launch([["grpo", *common, "--num_generations", "2", "--output_dir", str(tmp_path / "grpo")],
            ["ppo", *common, "--output_dir", str(tmp_path / "ppo")]], tmp_path, 2, timeout=300)
    for stage in ("grpo", "ppo"):
        assert [r["step"] for r in read_metrics(tmp_path / stage / "metrics.jsonl") if "loss" in r or "policy_loss" in r] \
            == [1, 2], stage
