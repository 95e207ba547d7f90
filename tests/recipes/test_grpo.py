"""End-to-end tests of the GRPO recipe (posttrain.recipes.grpo) on the random tiny Qwen2.

The learning signal is ``reward_helpers:ascii_frac`` (a random policy earns
about 0.4 of it); ``reward_helpers:prompt_low`` depends on the prompt only, so
every group of completions gets equal rewards (zero std, no signal).
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from reward_helpers import ascii_frac, read_jsonl, run_interrupted, run_recipe, thirds

import posttrain.models
import posttrain.recipes.grpo as grpo_recipe
from posttrain.losses import group_advantages
from posttrain.rewards import RewardSources
from posttrain.rollout import generate

GRPO_KEYS = ("reward", "reward_std", "rewards/reward_helpers:ascii_frac", "frac_reward_zero_std", "kl", "entropy",
             "clip_ratio/low", "clip_ratio/high", "completion_length", "loss")


def base_fields(tiny_qwen, arith_data, **extra) -> dict:
    fields = {
        "model_name_or_path": tiny_qwen,
        "dataset_name": arith_data["prompts"],
        "reward_funcs": "reward_helpers:ascii_frac",
        "max_completion_length": 4,
        "per_device_train_batch_size": 4,
        "num_generations": 8,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
    }
    fields.update(extra)
    return fields


def series(records: list[dict], key: str) -> list:
    return [r[key] for r in records if key in r]


def same_weights(folder_a, folder_b) -> bool:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(folder_a).state_dict()
    b = AutoModelForCausalLM.from_pretrained(folder_b).state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ learning


@pytest.mark.slow
def test_grpo_reward_rises(tmp_path, tiny_qwen, arith_data):
    records, summary = run_recipe("grpo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=30))
    rewards = series(records, "reward")
    assert len(rewards) == 30
    first, last = thirds(rewards)
    assert last > first + 0.2, f"reward did not rise: first third {first:.3f}, last third {last:.3f}: {rewards}"
    assert summary["model_copies"] == {"policy": 1, "reference": 1, "reward_model": 0}
    assert not same_weights(tmp_path, tiny_qwen)


def test_grpo_num_iterations_2_logs_every_metric(tmp_path, tiny_qwen, arith_data):
    records, _ = run_recipe("grpo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=3, num_iterations=2))
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        missing = [k for k in GRPO_KEYS if k not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        for key in GRPO_KEYS:
            assert isinstance(record[key], float) and math.isfinite(record[key]), (key, record[key])
        assert 0 <= record["frac_reward_zero_std"] <= 1
        assert 1 <= record["completion_length"] <= 4
        assert record["kl"] >= 0  # k3 is non-negative token by token
    assert records[-1]["kl"] > 0  # the second pass of each rollout already sees a moved policy


# ------------------------------------------------------------------ loss types and clipping


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_types(tmp_path, tiny_qwen, arith_data, loss_type, monkeypatch):
    modes = []
    original = grpo_recipe.aggregate_loss

    def spy(per_token, mask, mode="grpo", *args, **kwargs):
        modes.append(mode)
        return original(per_token, mask, mode, *args, **kwargs)

    monkeypatch.setattr(grpo_recipe, "aggregate_loss", spy)
    records, _ = run_recipe("grpo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=2, loss_type=loss_type,
                                                            gradient_accumulation_steps=2))
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert isinstance(record["loss"], float) and math.isfinite(record["loss"]), record  # None would be NaN/inf
        assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert modes and set(modes) == {loss_type}
    assert not same_weights(tmp_path, tiny_qwen)


@pytest.mark.parametrize("epsilon_high, clips", [(1e-4, True), (10.0, False)])
def test_grpo_epsilon_high_clip_ratio(tmp_path, tiny_qwen, arith_data, epsilon_high, clips):
    # the second pass over a rollout sees ratios != 1; a tiny upper clip range binds on positive advantages
    records, _ = run_recipe("grpo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=2, num_iterations=2,
                                                            epsilon_high=epsilon_high))
    high = series(records, "clip_ratio/high")
    assert len(high) == 2 and all(math.isfinite(h) for h in high)
    if clips:
        assert max(high) > 0, high
    else:
        assert max(high) == 0.0, high


# ------------------------------------------------------------------ the reference model


@pytest.mark.parametrize("beta, copies", [(0.0, 0), (0.04, 1)])
def test_grpo_reference_only_when_beta(tmp_path, tiny_qwen, arith_data, monkeypatch, beta, copies):
    loads = []
    original = posttrain.models.load_causal_lm

    def counting(path, *args, **kwargs):
        loads.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(posttrain.models, "load_causal_lm", counting)
    records, summary = run_recipe("grpo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=1, beta=beta))
    assert len(loads) == 1 + copies, loads
    assert summary["model_copies"]["reference"] == copies
    assert ("kl" in records[-1]) == bool(beta)
    if beta:
        assert records[-1]["kl"] == pytest.approx(0.0, abs=1e-6)  # one pass: the policy is still the reference
    assert math.isfinite(records[-1]["loss"])


# ------------------------------------------------------------------ groups


def test_generate_keeps_groups_together(tiny_qwen):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    prompts = ["1+1=", "23+45=", "hello there, 77+18=", "9"]  # different lengths: left padding differs
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    G, T = 5, 6
    torch.manual_seed(0)
    gen = generate(model, tokenizer, ids, T, num_return_sequences=G)
    assert gen.input_ids.shape[0] == len(prompts) * G
    assert gen.completion_mask.shape == (len(prompts) * G, T)
    width = gen.input_ids.shape[1] - T
    for i, prompt_ids in enumerate(ids):
        for row in range(i * G, (i + 1) * G):
            prompt_part = gen.input_ids[row, :width][gen.attention_mask[row, :width].bool()].tolist()
            assert prompt_part == prompt_ids, f"row {row} does not start with prompt {i}"
    # group advantages over these rows: centred within each group of G consecutive rows
    rewards = torch.tensor(ascii_frac(prompts, gen.completions))
    for scale in ("group", "batch", "none"):
        advantages = group_advantages(rewards, G, scale)
        sums = advantages.view(len(prompts), G).sum(1)
        torch.testing.assert_close(sums, torch.zeros(len(prompts)), atol=1e-4, rtol=0)
    grouped = rewards.view(len(prompts), G)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, G), expected.view(-1))


def test_grpo_rewards_see_whole_groups(tmp_path, tiny_qwen, arith_data, monkeypatch):
    """Inside the recipe the reward sources get each prompt (and its extra fields) G times in a row."""
    answers = {r["prompt"]: r["answer"] for r in read_jsonl(arith_data["prompts"])}
    calls = []
    original = RewardSources.score

    def spy(self, prompts, completions, extras, **kwargs):
        calls.append((list(prompts), list(completions), [dict(e) for e in extras]))
        return original(self, prompts, completions, extras, **kwargs)

    monkeypatch.setattr(RewardSources, "score", spy)
    G = 4
    run_recipe("grpo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=2, num_generations=G,
                                               per_device_train_batch_size=3))
    assert len(calls) == 2
    for prompts, completions, extras in calls:
        assert len(prompts) == len(completions) == len(extras) == 3 * G
        for g in range(3):
            block = slice(g * G, (g + 1) * G)
            assert len(set(prompts[block])) == 1, prompts
            assert all(e == extras[g * G] for e in extras[block]), extras
            assert extras[g * G]["answer"] == answers[prompts[g * G]]


# ------------------------------------------------------------------ filtering and masking


@pytest.mark.parametrize("filter_groups", [True, False])
def test_grpo_filter_zero_std_groups(tmp_path, tiny_qwen, arith_data, filter_groups):
    # prompt_low gives all G completions of a prompt the same reward: every group has zero std
    out = tmp_path / "run"
    records, _ = run_recipe("grpo", out, **base_fields(tiny_qwen, arith_data, max_steps=2,
                                                       reward_funcs="reward_helpers:prompt_low",
                                                       filter_zero_std_groups=filter_groups))
    assert series(records, "frac_reward_zero_std") == [1.0, 1.0]
    assert series(records, "reward_std") == [0.0, 0.0]
    if filter_groups:
        assert all("loss" not in r for r in records), "filtered-out groups still produced an update"
        assert same_weights(out, tiny_qwen)
    else:
        assert all("loss" in r and math.isfinite(r["loss"]) for r in records)


def test_grpo_frac_reward_zero_std_partial(tmp_path, tiny_qwen, arith_data, monkeypatch):
    """frac_reward_zero_std counts the groups whose rewards are all equal."""
    seen = []
    original = RewardSources.score

    def spy(self, *args, **kwargs):
        total, parts = original(self, *args, **kwargs)
        seen.append(total.clone())
        return total, parts

    monkeypatch.setattr(RewardSources, "score", spy)
    # with 1-token completions and G = 2 some groups agree on ascii_frac (0 or 1) and some do not
    records, _ = run_recipe("grpo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=3, num_generations=2,
                                                            per_device_train_batch_size=8, max_completion_length=1,
                                                            filter_zero_std_groups=True))
    for record, rewards in zip(records, seen):
        grouped = rewards.view(-1, 2)
        expected = float((grouped.max(1).values == grouped.min(1).values).float().mean())
        assert record["frac_reward_zero_std"] == pytest.approx(expected)
    assert any(0 < r["frac_reward_zero_std"] < 1 for r in records), records


@pytest.fixture
def no_eos_model(tmp_path, tiny_qwen):
    """tiny_qwen whose generation config suppresses EOS: every completion is truncated."""
    from transformers import GenerationConfig

    target = tmp_path / "no_eos"
    shutil.copytree(tiny_qwen, target)
    config = GenerationConfig.from_pretrained(target)
    config.suppress_tokens = [config.eos_token_id]
    config.save_pretrained(target)
    return target


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_grpo_mask_truncated_completions(tmp_path, no_eos_model, arith_data, mask_truncated):
    out = tmp_path / "run"
    records, _ = run_recipe("grpo", out, **base_fields(no_eos_model, arith_data, max_steps=2, max_completion_length=2,
                                                       mask_truncated_completions=mask_truncated))
    assert series(records, "truncated_ratio") == [1.0, 1.0]
    for record in records:
        assert isinstance(record["loss"], float) and math.isfinite(record["loss"]), record
    if mask_truncated:
        # every completion truncated: nothing contributes, the loss is 0 and no weight moves
        assert series(records, "loss") == [0.0, 0.0]
        assert series(records, "grad_norm") == [0.0, 0.0]
        assert same_weights(out, no_eos_model)
    else:
        assert min(series(records, "grad_norm")) > 0
        assert not same_weights(out, no_eos_model)


def test_grpo_missing_eos_penalty(tmp_path, tiny_qwen, arith_data):
    """TRL's missing_eos_penalty: a completion of one token that is not EOS was cut off and loses 10 of its
    reward; one that is EOS (empty text) keeps it. The reward the advantages see includes the penalty."""
    records, _ = run_recipe("grpo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=1, max_completion_length=1,
                                                            missing_eos_penalty=10, log_completions=True))
    rows = read_jsonl(tmp_path / "completions.jsonl")
    penalties = [ascii_frac([], [r["completion"]])[0] - r["reward"] for r in rows]
    # a non-empty text is a token other than EOS: cut off; an empty one is EOS or another special token
    # (skipped when decoding, and cut off too), so the count is checked against truncated_ratio below
    assert all(p == pytest.approx(10.0) or p == pytest.approx(0.0) and not r["completion"]
               for p, r in zip(penalties, rows)), penalties
    assert records[0]["truncated_ratio"] > 0
    assert sum(p > 5 for p in penalties) / len(rows) == pytest.approx(records[0]["truncated_ratio"])
    assert records[0]["reward"] == pytest.approx(records[0]["rewards/reward_helpers:ascii_frac"]
                                                 - 10 * records[0]["truncated_ratio"], abs=1e-5)


# ------------------------------------------------------------------ resume


def test_grpo_resume_reproduces_uninterrupted_run(tmp_path, tiny_qwen, arith_data):
    fields = base_fields(tiny_qwen, arith_data, max_steps=4, save_steps=2, num_iterations=2)
    full, _ = run_recipe("grpo", tmp_path / "full", **fields)
    run_interrupted("grpo", tmp_path / "interrupted", **fields)
    assert [r["step"] for r in read_jsonl(tmp_path / "interrupted" / "metrics.jsonl")] == [1, 2]
    resumed, _ = run_recipe("grpo", tmp_path / "interrupted", **fields, resume_from_checkpoint="latest")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert a["reward"] == b["reward"], f"step {a['step']}: reward {a['reward']} vs resumed {b['reward']}"
        for key in ("loss", "kl", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_filtered_groups_leave_the_gradient_of_the_kept_ones(tmp_path, tiny_qwen, loss_type):
    """filter_zero_std_groups: a batch whose filtered groups stay in (mask 0, kept False) steps exactly as the
    kept groups alone do. Before, bnpo weighed each micro-batch by all its rows (8) over the kept ones (4)
    while its token mean was of the kept tokens only: a step 2.0x too large."""
    from posttrain.config import load_config
    from posttrain.models import load_causal_lm
    from posttrain.rollout import GroupRollout
    from posttrain.training import StatsWindow

    cfg = load_config("grpo", None, {"model_name_or_path": str(tiny_qwen), "dataset_name": "unused.jsonl",
                                     "output_dir": str(tmp_path), "loss_type": loss_type, "beta": "0",
                                     "num_generations": "2", "max_completion_length": "4", "max_grad_norm": "0",
                                     "gradient_accumulation_steps": "1"})
    gen = torch.Generator().manual_seed(0)
    N, P, T = 8, 3, 4  # 4 groups of G = 2; rows 4-7 (groups 2 and 3) are filtered out
    ids = torch.randint(3, 100, (N, P + T), generator=gen)
    mask = torch.ones(N, T)
    mask[0, 2:], mask[1, 1:], mask[2, 3:] = 0, 0, 0  # completions of 2, 1, 3 and 4 tokens: bnpo != grpo
    attn = torch.cat([torch.ones(N, P), mask], 1).long()
    kept = torch.arange(N) < 4
    advantages = torch.tensor([1.0, -1.0, 0.7, -0.7, 0.0, 0.0, 0.0, 0.0])
    filtered = GroupRollout(ids, attn, mask * kept.float().unsqueeze(1), advantages, kept, None, None)
    kept_only = GroupRollout(ids[:4], attn[:4], mask[:4], advantages[:4], kept[:4], None, None)

    def step(rollout):  # SGD at lr 1: the change of the weights is minus the gradient
        policy = load_causal_lm(str(tiny_qwen))
        params = [p for p in policy.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        grpo_recipe.update(cfg, policy, rollout, torch.optim.SGD(params, lr=1.0), params, StatsWindow())
        return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])

    grad_filtered, grad_kept = step(filtered), step(kept_only)
    ratio = float(grad_filtered.norm() / grad_kept.norm())
    assert ratio == pytest.approx(1.0, abs=1e-4), f"{loss_type}: filtered / kept-only gradient = {ratio:.4f}"
    torch.testing.assert_close(grad_filtered, grad_kept, rtol=1e-4, atol=1e-7)
