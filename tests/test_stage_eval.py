"""Held-out evaluation of every stage in its own format (posttrain.evaluation), on the random tiny Qwen2:
the figures equal hand computations with the stage's own loss, and the eval/... keys reach metrics.jsonl
on the eval_strategy / eval_steps schedule."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict

from posttrain.config import load_config
from posttrain.data import collate_preferences, preference_examples, read_rows
from posttrain.evaluation import accuracy_probe, pair_evaluation, sft_evaluation
from posttrain.metrics import read_metrics
from posttrain.models import load_causal_lm, load_policy_and_reference, load_tokenizer
from posttrain.recipes.dpo import dpo_step, precompute_reference
from posttrain.recipes.sft import sft_loss


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(stage: str, output_dir: Path, **fields):
    values = {"num_threads": "1", "progress": "false", "seed": "0", "output_dir": str(output_dir)}
    values.update({k: str(v) for k, v in fields.items()})
    return load_config(stage, None, values)


def run(stage: str, output_dir: Path, **fields) -> list[dict]:
    importlib.import_module(f"posttrain.recipes.{stage}").main(config(stage, output_dir, **fields))
    return read_metrics(output_dir / "metrics.jsonl")


def eval_keys(record: dict) -> set[str]:
    return {k for k in record if k.startswith("eval/")}


# ------------------------------------------------------------------ SFT: held-out loss = mean NLL by hand


def test_sft_eval_loss_is_the_mean_nll_of_the_held_out_responses(tmp_path, tiny_qwen, arith_data):
    rows = read_jsonl(arith_data["sft"])[:7]
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{**r, "answer": r["completion"]} for r in rows])
    cfg = config("sft", tmp_path / "out", model_name_or_path=tiny_qwen, dataset_name=held_out,
                 eval_dataset_name=held_out, per_device_train_batch_size=3, max_length=128, max_prompt_length=64)
    tokenizer = load_tokenizer(str(tiny_qwen))
    model = load_causal_lm(str(tiny_qwen))
    model.train()
    evaluate = sft_evaluation(cfg, model, tokenizer, lambda batch: sft_loss(model, batch))
    rng = torch.get_rng_state()
    result = evaluate()
    assert torch.equal(torch.get_rng_state(), rng), "evaluation moved the RNG of the run"
    assert model.training, "evaluation left the model in eval mode"

    # by hand: one row at a time, no padding, the completion tokens (and EOS) after the prompt
    nll, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + completion])
            logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
            nll -= float(logps[positions, ids[0, positions + 1]].sum())
            tokens += len(completion)
    assert result["eval/loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["eval/perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    # rows with an `answer` also get today's greedy exact-match accuracy
    assert result["eval/greedy_accuracy"] == accuracy_probe(model, tokenizer, held_out, 7, 8)()["eval/greedy_accuracy"]


# ------------------------------------------------------------------ DPO: eval figures = dpo_step on the pairs


@pytest.fixture
def dpo_setup(tmp_path, tiny_qwen, arith_data):
    held_out = write_jsonl(tmp_path / "pairs.jsonl", read_jsonl(arith_data["preference"])[:7])
    cfg = config("dpo", tmp_path / "out", model_name_or_path=tiny_qwen, dataset_name=held_out,
                 eval_dataset_name=held_out, per_device_train_batch_size=3, max_length=64, max_prompt_length=32)
    tokenizer, policy, ref = load_policy_and_reference(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the policy off the reference, so rewards, accuracies and margins are not all 0
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return cfg, tokenizer, policy, ref, held_out


def test_dpo_eval_equals_dpo_step_on_the_same_pairs(dpo_setup):
    cfg, tokenizer, policy, ref, held_out = dpo_setup
    evaluate = pair_evaluation(cfg, policy, tokenizer, lambda batch, table: dpo_step(cfg, policy, ref, batch, table))
    result = evaluate()
    pairs = preference_examples(read_rows(held_out), tokenizer, cfg.max_length, cfg.max_prompt_length)
    batch = collate_preferences(pairs, list(range(len(pairs))), tokenizer.pad_token_id)  # all 7 pairs at once
    with torch.no_grad():
        loss, stats = dpo_step(cfg, policy, ref, batch, None)
    assert result["eval/loss"] == pytest.approx(float(loss), rel=1e-5)
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert result[f"eval/{key}"] == pytest.approx(float(stats[key]), rel=1e-5, abs=1e-7), key
    assert 0 < result["eval/rewards/accuracies"] < 1 and result["eval/rewards/margins"] != 0

    # with precompute_ref_log_probs the held-out pairs' reference is scored once, and the figures stay the same
    cfg.precompute_ref_log_probs = True
    precomputed = pair_evaluation(cfg, policy, tokenizer, lambda batch, table: dpo_step(cfg, policy, None, batch, table),
                                  lambda p, make: precompute_reference(cfg, policy, ref, p, make))()
    assert precomputed == pytest.approx(result, rel=1e-5)


# ------------------------------------------------------------------ every stage: eval keys on the eval_steps cadence


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, arith_data):
    out = tmp_path_factory.mktemp("eval_data")
    sft, pref = read_jsonl(arith_data["sft"]), read_jsonl(arith_data["preference"])
    datasets.disable_progress_bars()
    try:
        DatasetDict({"train": Dataset.from_list(pref[:16]), "test": Dataset.from_list(pref[16:22])}).save_to_disk(
            str(out / "pref_dd"))
    finally:
        datasets.enable_progress_bars()
    return {"sft": write_jsonl(out / "sft.jsonl", sft[:16]), "sft_eval": write_jsonl(out / "sft_eval.jsonl", sft[16:22]),
            "pref": write_jsonl(out / "pref.jsonl", pref[:16]), "pref_eval": write_jsonl(out / "pref_eval.jsonl", pref[16:22]),
            "pref_dd": str(out / "pref_dd"), "prompts": str(arith_data["prompts"]),
            "prompts_eval": write_jsonl(out / "prompts_eval.jsonl", read_jsonl(arith_data["eval"])[:6])}


SHORT = {"max_steps": 4, "logging_steps": 3, "eval_steps": 2, "max_length": 32, "max_prompt_length": 16}
RL = {"reward_funcs": "exact_match", "max_completion_length": 3, "per_device_train_batch_size": 2}
STAGES = {
    "sft": ({"dataset_name": "sft", "eval_dataset_name": "sft_eval", "per_device_train_batch_size": 4},
            {"eval/loss", "eval/perplexity"}),
    "rm": ({"dataset_name": "pref", "eval_dataset_name": "pref_eval", "per_device_train_batch_size": 4},
           {"eval/loss", "eval/pair_accuracy", "eval/rewards/margins", "eval/rewards/chosen", "eval/rewards/rejected"}),
    # no eval_dataset_name: the DatasetDict's test split is held out
    "dpo": ({"dataset_name": "pref_dd", "per_device_train_batch_size": 4},
            {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen",
             "eval/rewards/rejected", "eval/logps/chosen", "eval/logps/rejected"}),
    "grpo": ({"dataset_name": "prompts", "eval_dataset_name": "prompts_eval", "num_generations": 2, **RL},
             {"eval/reward", "eval/greedy_accuracy", "eval/completion_length"}),
    "ppo": ({"dataset_name": "prompts", "eval_dataset_name": "prompts_eval", "num_ppo_epochs": 1, **RL},
            {"eval/reward", "eval/greedy_accuracy", "eval/completion_length"}),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_eval_keys_follow_eval_steps(tmp_path, tiny_qwen, small_data, stage):
    fields, keys = STAGES[stage]
    fields = {k: small_data.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    records = run(stage, tmp_path, model_name_or_path=tiny_qwen, **SHORT, **fields)
    assert [r["step"] for r in records] == [2, 3, 4]  # eval at 2 and 4 (the last step), logs at 3 and 4
    assert eval_keys(records[0]) == keys and "loss" not in records[0]  # an eval step between logs: its own line
    assert eval_keys(records[1]) == set() and "loss" in records[1]
    assert eval_keys(records[2]) == keys and "loss" in records[2]
    for record in (records[0], records[2]):
        assert all(isinstance(record[k], float) and math.isfinite(record[k]) for k in keys), record
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert any(name.startswith("eval_") for name in plots), plots


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_eval_strategy_no_writes_no_eval_keys(tmp_path, tiny_qwen, small_data, stage):
    fields, _ = STAGES[stage]
    fields = {k: small_data.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    records = run(stage, tmp_path, model_name_or_path=tiny_qwen, **SHORT, **fields, eval_strategy="no")
    assert [r["step"] for r in records] == [3, 4]
    assert not any(eval_keys(r) for r in records)
    if stage == "rm":  # the held-out pair accuracy is still reported at the end
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert 0 <= summary["report"]["pair_accuracy"] <= 1 and summary["report"]["eval_pairs"] == 6


def test_eval_strategy_epoch(tmp_path, tiny_qwen, small_data):
    # 16 rows in batches of 8: 2 steps an epoch, 3 epochs; eval at the end of each epoch only
    records = run("sft", tmp_path, model_name_or_path=tiny_qwen, dataset_name=small_data["sft"],
                  eval_dataset_name=small_data["sft_eval"], per_device_train_batch_size=8, num_train_epochs=3,
                  logging_steps=1, eval_strategy="epoch", max_length=32, max_prompt_length=16)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 4, 6]
    losses = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert losses[-1] < losses[0], f"the held-out loss did not fall: {losses}"
