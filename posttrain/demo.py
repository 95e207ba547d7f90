"""`posttrain demo`: the whole pipeline on the embedded tiny model, then a report.

    posttrain demo --output_dir runs/demo          # ~minutes on a 2-core CPU
    posttrain demo --output_dir /tmp/d --quick     # seconds, for tests

data -> sft -> (rm, dpo, ppo, grpo, each from the same SFT model) -> eval -> report.
Each stage runs as its own `posttrain STAGE --config` process — exactly the
command a user would type — so its wall time and peak memory are its own, and
independent stages run side by side, one thread each. Adding a stage is
one entry in ``STAGES``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.errors import UserError
from posttrain.tasks import arith


@dataclass
class Stage:
    name: str  # output folder and report key
    command: str  # posttrain subcommand
    config: dict  # fields for the full demo ({data}, {out} are filled in)
    quick: dict = field(default_factory=dict)  # overrides for --quick
    after: tuple[str, ...] = ()  # stages whose outputs this one reads
    policy: bool = True  # evaluated as a policy (rm is evaluated on held-out pairs)


SFT_MODEL = "{out}/sft"
SHORT = {"max_length": 16, "max_prompt_length": 8, "num_threads": 1}  # arith rows are ~10 tokens
RL = {"model_name_or_path": SFT_MODEL, "dataset_name": "{data}/prompts.jsonl", "eval_dataset_name": "{data}/eval.jsonl",
      "reward_funcs": ["exact_match"], "max_completion_length": 4, "temperature": 1.0, "lr_scheduler_type": "constant",
      "logging_steps": 5, **SHORT}
PPO = {**RL, "learning_rate": 5e-5, "critic_learning_rate": 1e-4, "per_device_train_batch_size": 64,
       "num_ppo_epochs": 4, "num_mini_batches": 2, "kl_coef": 0.05, "vf_coef": 0.1, "max_steps": 60}
RL_QUICK = {"max_steps": 4, "logging_steps": 2, "eval_max_rows": 16, "per_device_train_batch_size": 16}

STAGES = [
    Stage("sft", "sft", {
        "model_name_or_path": "tiny", "dataset_name": "{data}/sft.jsonl", "learning_rate": 1e-3,
        "per_device_train_batch_size": 64, "max_steps": 600, "warmup_ratio": 0.02, "logging_steps": 25,
        "lr_scheduler_type": "constant", "eval_dataset_name": "{data}/eval.jsonl", **SHORT, "num_threads": 2,
    }, quick={"max_steps": 30, "logging_steps": 10, "eval_max_rows": 32}),
    Stage("rm", "rm", {
        "model_name_or_path": SFT_MODEL, "dataset_name": "{data}/preference.jsonl", "learning_rate": 1e-3,
        "warmup_ratio": 0.05, "per_device_train_batch_size": 64, "max_steps": 300, "logging_steps": 20, "eval_split": 0.1,
        **SHORT,
    }, quick={"max_steps": 6, "logging_steps": 2}, after=("sft",), policy=False),
    Stage("dpo", "dpo", {
        "model_name_or_path": SFT_MODEL, "dataset_name": "{data}/preference.jsonl", "learning_rate": 1e-4,
        "beta": 0.1, "rpo_alpha": 1.0, "per_device_train_batch_size": 64, "max_steps": 200, "logging_steps": 10,
        "lr_scheduler_type": "constant", **SHORT,
    }, quick={"max_steps": 20, "logging_steps": 5}, after=("sft",)),
    Stage("ppo", "ppo", PPO, quick=RL_QUICK, after=("sft",)),
    Stage("ppo_shared", "ppo", {**PPO, "critic": "shared"}, quick=RL_QUICK, after=("sft",)),
    # reward_clip 3 keeps the reward model's scores in [-3, 3], as the demo's figures were measured with
    # (the exact_match stages' 0/1 rewards never reach a clip of 3)
    Stage("ppo_rm", "ppo", {**PPO, "reward_funcs": [], "reward_model_name_or_path": "{out}/rm", "reward_clip": 3.0},
          quick=RL_QUICK, after=("sft", "rm")),
    Stage("grpo", "grpo", {
        **RL, "learning_rate": 1e-4, "per_device_train_batch_size": 32, "num_generations": 8, "beta": 0.04,
        "max_steps": 60,
    }, quick=RL_QUICK, after=("sft",)),
]


def _fill(value, paths: dict):
    if isinstance(value, list):
        return [_fill(v, paths) for v in value]
    return value.format(**paths) if isinstance(value, str) else value


def stage_config(stage: Stage, out: Path, data: Path, quick: bool, num_threads: int = 0) -> dict:
    paths = {"out": str(out), "data": str(data)}
    config = {k: _fill(v, paths) for k, v in stage.config.items()}
    if quick:
        config.update(stage.quick)
    if num_threads:
        config["num_threads"] = num_threads
    config.update({"output_dir": str(out / stage.name), "progress": False, "seed": 0})
    return config


def run_stage(stage: Stage, out: Path, data: Path, quick: bool, log, num_threads: int = 0) -> dict:
    """Write the stage's YAML, run `posttrain STAGE --config` in a child process, return its summary."""
    stage_dir = out / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{stage.name}.yaml"
    config = stage_config(stage, out, data, quick, num_threads)
    config_path.write_text(f"# posttrain {stage.command} --config {config_path}\n" + yaml.safe_dump(config, sort_keys=False))
    threads = str(config.get("num_threads") or 1)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    start = time.time()
    log(f"[{stage.name}] started")
    with open(stage_dir / "stdout.log", "w") as handle:
        proc = subprocess.run([sys.executable, "-m", "posttrain", stage.command, "--config", str(config_path)],
                              stdout=handle, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        tail = (stage_dir / "stdout.log").read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"stage {stage.name} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    summary = json.loads((stage_dir / "summary.json").read_text())
    log(f"[{stage.name}] done in {wall:.0f}s")
    return {"process_wall_s": round(wall, 1), **summary}


def evaluate_stage(stage: Stage, out: Path, data: Path, ref, max_rows: int) -> dict:
    """Held-out figures of a trained policy: accuracy, greedy accuracy, reward, KL to ``ref`` (the SFT model)."""
    from posttrain.data import prompt_examples, read_rows
    from posttrain.evaluation import evaluate
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.rewards import RewardSource, RewardSources

    model_dir = out / stage.name
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), trainable=False)
    rows = read_rows(str(data / arith.FILES["eval"]))[:max_rows]
    examples = prompt_examples(rows, tokenizer, 64)
    rewards = RewardSources([RewardSource("exact_match", 1.0, func=arith.exact_match)], 0)
    return evaluate(model, tokenizer, examples, rewards, ref, max_new_tokens=6, seed=0, num_samples_kept=12)


def run_demo(output_dir: str, quick: bool = False, stages: str = "", jobs: int = 0, num_threads: int = 0) -> dict:
    """Run the selected stages (each after the stages it reads), evaluate the policies and write the report.

    ``num_threads`` sets the torch threads of every stage process and of the evaluation; 0 keeps the
    defaults (SFT 2, the stages after it 1 each, the evaluation one per core).
    """
    import torch

    if num_threads < 0:
        raise UserError(f"--num_threads: must be 0 (the defaults) or more, got {num_threads}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in stages.split(",") if s.strip()] or [s.name for s in STAGES]
    unknown = set(wanted) - {s.name for s in STAGES}
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; valid: {', '.join(s.name for s in STAGES)}")
    selected = [s for s in STAGES if s.name in wanted or any(s.name in t.after for t in STAGES if t.name in wanted)]
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))  # stages after SFT use one thread each
    began = time.time()

    def log(message: str) -> None:
        print(f"{time.time() - began:6.0f}s {message}", flush=True)

    # 1. data
    data = out / "data"
    sizes = {"num_sft": 2000, "num_preference": 512, "num_prompts": 512, "num_eval": 64} if quick else {}
    arith.write_datasets(data, seed=0, **sizes)
    log(f"wrote the {arith.NAME} task to {data}")

    # 2. training: each stage starts when the stages it reads are done
    results: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {}
        for stage in selected:
            deps = [futures[d] for d in stage.after if d in futures]

            def task(stage=stage, deps=deps):
                for dep in deps:
                    dep.result()
                return run_stage(stage, out, data, quick, log, num_threads)

            futures[stage.name] = pool.submit(task)
        for name, future in futures.items():
            results[name] = future.result()

    # 3. evaluation on the held-out prompts
    torch.set_num_threads(num_threads or max(1, os.cpu_count() or 1))
    from posttrain.models import load_causal_lm

    max_rows = 64 if quick else 10**6
    sft_model = load_causal_lm(str(out / "sft"), trainable=False)  # the reference of every KL, loaded once
    for stage in selected:
        if stage.policy:
            log(f"[{stage.name}] evaluating")
            ref = sft_model if stage.name != "sft" else None
            results[stage.name]["eval"] = evaluate_stage(stage, out, data, ref, max_rows)

    # 4. report
    from posttrain.browser import screenshots
    from posttrain.report import build_report, write_report

    report = build_report(arith.NAME, out, selected, results, time.time() - began)
    page = write_report(report, out)
    log(f"report: {page}")
    shots = screenshots(page, out)
    log(f"screenshots: {', '.join(map(str, shots))}" if isinstance(shots, list) else f"no screenshots of the report: {shots}")
    print(json.dumps(report["stages"], indent=1))
    return report
