"""End-to-end tests of the PPO recipe (posttrain.recipes.ppo) on the random tiny Qwen2.

Rewards come from tests/recipes/reward_helpers.py (``reward_helpers:NAME``): a
random policy earns ``ascii_frac`` about 40% of the way, so a working PPO loop
raises it within a few dozen rollouts; ``prompt_low`` depends only on the
prompt, so only a working critic can explain it.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from reward_helpers import ascii_frac, read_jsonl, run_interrupted, run_recipe, thirds
from safetensors.torch import load_file

import posttrain.recipes.ppo as ppo_recipe

PPO_KEYS = ("reward", "reward_std", "kl", "entropy", "clip_ratio", "approx_kl", "policy_loss", "value_loss",
            "explained_variance", "completion_length")


def base_fields(tiny_qwen, arith_data, **extra) -> dict:
    fields = {
        "model_name_or_path": tiny_qwen,
        "dataset_name": arith_data["prompts"],
        "reward_funcs": "reward_helpers:ascii_frac",
        "max_completion_length": 4,
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "num_ppo_epochs": 2,
        "logging_steps": 1,
    }
    fields.update(extra)
    return fields


def series(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if key in r]


# ------------------------------------------------------------------ learning runs (separate and shared critic)


@pytest.fixture(scope="module", params=["separate", "shared"])
def learning_run(request, tmp_path_factory, tiny_qwen, arith_data):
    out = tmp_path_factory.mktemp(f"ppo_{request.param}")
    records, summary = run_recipe("ppo", out, **base_fields(tiny_qwen, arith_data, max_steps=30,
                                                            critic=request.param))
    return request.param, out, records, summary


@pytest.mark.slow
def test_ppo_reward_rises(learning_run):
    critic, _, records, _ = learning_run
    rewards = series(records, "reward")
    assert len(rewards) == 30
    first, last = thirds(rewards)
    assert last > first + 0.2, f"{critic}: reward did not rise: first third {first:.3f}, last {last:.3f}: {rewards}"


@pytest.mark.slow
def test_ppo_logs_every_metric(learning_run):
    _, _, records, _ = learning_run
    assert [r["step"] for r in records] == list(range(1, 31))
    for record in records:
        missing = [k for k in PPO_KEYS if k not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        for key in PPO_KEYS:
            assert isinstance(record[key], float) and math.isfinite(record[key]), (key, record[key])
        assert 1 <= record["completion_length"] <= 4
        assert 0.0 <= record["clip_ratio"] <= 1.0
        assert record["entropy"] > 0
        assert record["reward_std"] >= 0
        assert record["value_loss"] >= 0
        assert 0.0 <= record["reward"] <= 1.0
    assert "rewards/reward_helpers:ascii_frac" in records[-1]
    assert any(r["clip_ratio"] > 0 for r in records), "lr 1e-2 over 2 epochs never hit the clip"


@pytest.mark.slow
def test_ppo_final_models_and_model_copies(learning_run, tiny_qwen):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    critic, out, _, summary = learning_run
    assert summary["critic"] == critic
    assert summary["model_copies"] == {"actor": 1, "critic": 1 if critic == "separate" else 0, "reference": 1,
                                       "reward_model": 0}
    if critic == "separate":
        model = AutoModelForSequenceClassification.from_pretrained(out / "critic", num_labels=1)
        # the value head starts at 0 (load_scalar_model) and must have been trained
        assert model.score.weight.abs().sum() > 0
        assert (out / "critic" / "tokenizer.json").is_file()
    else:
        head = out / "critic" / "value_head.safetensors"
        assert head.is_file()
        state = load_file(head)
        assert set(state) == {"score.weight"}
        assert state["score.weight"].shape == (1, 32)
        assert state["score.weight"].abs().sum() > 0, "the value head was not trained"
        assert not (out / "critic" / "config.json").exists(), "a shared critic has no trunk of its own"
    actor = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    name = "model.embed_tokens.weight"
    assert not torch.equal(actor.state_dict()[name], start.state_dict()[name]), "the actor was not trained"


# ------------------------------------------------------------------ the critic


@pytest.fixture
def split_prompts(tmp_path):
    """256 prompts `AB+CD=`; prompt_low rewards about half of them, by their first digit only."""
    rng = random.Random(0)
    rows = [{"prompt": f"{rng.randrange(10, 100)}+{rng.randrange(10, 100)}="} for _ in range(256)]
    path = tmp_path / "split_prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# the policy cannot change prompt_low; the critic (a copy of its own, or a head on the actor's trunk) can predict it
CRITIC_SETTINGS = {
    "separate": {"learning_rate": 1e-4, "critic_learning_rate": 3e-3},
    "shared": {"learning_rate": 1e-3, "critic_learning_rate": 3e-3, "vf_coef": 1.0},
}


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_explained_variance_rises(tmp_path, tiny_qwen, split_prompts, critic):
    records, _ = run_recipe("ppo", tmp_path / "run", **base_fields(
        tiny_qwen, {"prompts": split_prompts}, max_steps=30, critic=critic, kl_coef=0, num_ppo_epochs=4,
        reward_funcs="reward_helpers:prompt_low", **CRITIC_SETTINGS[critic]))
    ev = series(records, "explained_variance")
    assert len(ev) == 30
    assert max(ev) > 0
    _, last = thirds(ev)
    assert last > 0.5 and last > ev[0] + 0.3, f"{critic}: explained variance did not rise: {ev}"


def _reward_model_folder(tiny_qwen, target):
    """tiny_qwen saved as AutoModelForSequenceClassification, with a non-zero head and a perturbed trunk."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
        for p in model.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_qwen).pad_token_id
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_qwen).save_pretrained(target)
    return model.state_dict()


def test_ppo_critic_initialised_from_reward_model(tmp_path, tiny_qwen, arith_data, monkeypatch):
    rm_dir = tmp_path / "rm"
    rm_state = _reward_model_folder(tiny_qwen, rm_dir)
    loaded = []
    original = ppo_recipe.load_scalar_model

    def spy(path, field, *args, **kwargs):
        model = original(path, field, *args, **kwargs)
        loaded.append((str(path), field, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(ppo_recipe, "load_scalar_model", spy)
    out = tmp_path / "ppo"
    records, summary = run_recipe("ppo", out, **base_fields(tiny_qwen, arith_data, max_steps=1,
                                                            reward_model_name_or_path=rm_dir))
    critics = [entry for entry in loaded if entry[1] == "critic_model_name_or_path"]
    assert len(critics) == 1
    path, _, state = critics[0]
    assert path == str(rm_dir), "the critic was not initialised from reward_model_name_or_path"
    for key in ("score.weight", "model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(state[key], rm_state[key])  # the trained head is kept, not zeroed
    assert summary["model_copies"]["reward_model"] == 1
    assert "rewards/reward_model" in records[-1]


def test_ppo_missing_eos_penalty(tmp_path, tiny_qwen, arith_data):
    """A completion of one token that is not EOS was cut off and loses missing_eos_penalty; an EOS (empty
    text) keeps its reward."""
    run_recipe("ppo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=1, max_completion_length=1,
                                              missing_eos_penalty=10, log_completions=True))
    rows = read_jsonl(tmp_path / "completions.jsonl")
    penalties = [ascii_frac([], [r["completion"]])[0] - r["reward"] for r in rows]
    # a non-empty text is a token other than EOS: cut off; an empty one is EOS (kept) or another special token
    # (skipped when decoding, and cut off too)
    assert all(p == pytest.approx(10.0) or p == pytest.approx(0.0) and not r["completion"]
               for p, r in zip(penalties, rows)), penalties
    assert any(p > 5 for p in penalties)


# ------------------------------------------------------------------ KL control and early stopping


def test_ppo_target_kl_stops_epochs_early(tmp_path, tiny_qwen, arith_data, monkeypatch):
    calls = []
    original = ppo_recipe.clip_and_step

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ppo_recipe, "clip_and_step", counting)
    fields = base_fields(tiny_qwen, arith_data, max_steps=2, num_ppo_epochs=4, num_mini_batches=2,
                         per_device_train_batch_size=8)
    records, _ = run_recipe("ppo", tmp_path / "full", **fields)
    assert len(calls) == 2 * 4 * 2
    assert all("early_stop" not in r for r in records)

    calls.clear()
    records, _ = run_recipe("ppo", tmp_path / "stopped", **fields, target_kl=1e-9)
    assert all(r.get("early_stop") == 1.0 for r in records), records
    assert 0 < len(calls) < 2 * 4 * 2, f"{len(calls)} optimizer steps despite target_kl"


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_ppo_kl_estimators(tmp_path, tiny_qwen, arith_data, estimator):
    records, _ = run_recipe("ppo", tmp_path, **base_fields(tiny_qwen, arith_data, max_steps=3,
                                                           kl_estimator=estimator))
    kls = series(records, "kl")
    assert len(kls) == 3
    assert all(math.isfinite(k) and k >= 0 for k in kls), kls  # k2 and k3 are >= 0 token by token
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # the first rollout comes from the reference itself
    assert kls[-1] > 0, "the policy moved but the KL estimate stayed 0"
    assert series(records, "non_score_reward")[-1] < 0


def test_ppo_adaptive_kl_controller(tmp_path, tiny_qwen, arith_data):
    fields = base_fields(tiny_qwen, arith_data, max_steps=4, kl_coef=0.05)
    fixed, _ = run_recipe("ppo", tmp_path / "fixed", **fields)
    assert series(fixed, "kl_coef") == [0.05] * 4

    adaptive, _ = run_recipe("ppo", tmp_path / "adaptive", **fields, target_kl_coef=100.0, kl_horizon=100)
    coefs, kls = series(adaptive, "kl_coef"), series(adaptive, "kl")
    # Ziegler et al.: e = clip(KL/target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon), n = 16 prompts
    expected, beta = [], 0.05
    for kl in kls:
        error = min(max(kl / 100.0 - 1.0, -0.2), 0.2)
        beta = beta * (1 + error * 16 / 100)
        expected.append(beta)
    assert coefs == pytest.approx(expected, rel=1e-6)
    assert coefs[0] == pytest.approx(0.05 * (1 - 0.2 * 16 / 100), rel=1e-6)  # KL far below target: shrink
    assert all(b < a for a, b in zip(coefs, coefs[1:]))


# ------------------------------------------------------------------ exact resume


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_resume_reproduces_uninterrupted_run(tmp_path, tiny_qwen, arith_data, critic):
    fields = base_fields(tiny_qwen, arith_data, max_steps=6, save_steps=3, per_device_train_batch_size=8,
                         lr_scheduler_type="cosine", critic=critic)
    full, _ = run_recipe("ppo", tmp_path / "full", **fields)
    assert (tmp_path / "full" / "checkpoint-3").is_dir()

    # the same run, killed right after its checkpoint at step 3 ...
    out = tmp_path / "interrupted"
    run_interrupted("ppo", out, **fields)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert not (out / "summary.json").exists()

    # ... and resumed from `latest`
    resumed, _ = run_recipe("ppo", out, **fields, resume_from_checkpoint="latest")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert a["reward"] == b["reward"], f"step {a['step']}: reward {a['reward']} vs resumed {b['reward']}"
        assert a["completion_length"] == b["completion_length"]
        for key in ("loss", "kl", "value_loss", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    # the final actor and critic match too
    full_actor, resumed_actor = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "interrupted"))
    assert full_actor.keys() == resumed_actor.keys()
    for key in full_actor:
        torch.testing.assert_close(resumed_actor[key], full_actor[key], rtol=1e-4, atol=1e-5)
    if critic == "shared":
        heads = [load_file(tmp_path / d / "critic" / "value_head.safetensors") for d in ("full", "interrupted")]
    else:
        heads = [load_file(tmp_path / d / "critic" / "model.safetensors") for d in ("full", "interrupted")]
    for key in heads[0]:
        torch.testing.assert_close(heads[1][key], heads[0][key], rtol=1e-4, atol=1e-5)


def test_ppo_resume_inside_a_logging_window(tmp_path, tiny_qwen, arith_data):
    # save_steps 3 falls inside the logging window of steps 3-4 (logging_steps 2)
    fields = base_fields(tiny_qwen, arith_data, max_steps=4, save_steps=3, logging_steps=2,
                         per_device_train_batch_size=8)
    full, _ = run_recipe("ppo", tmp_path / "full", **fields)
    run_interrupted("ppo", tmp_path / "interrupted", **fields)
    resumed, _ = run_recipe("ppo", tmp_path / "interrupted", **fields, resume_from_checkpoint="latest")
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == [2, 4]
    for key in ("reward", "completion_length", "loss"):
        assert resumed[-1][key] == pytest.approx(full[-1][key], rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------ dropout, mini-batches and accumulation


def _dropout_copy(tiny_qwen, dest):
    import shutil

    shutil.copytree(tiny_qwen, dest)
    config = json.loads((dest / "config.json").read_text())
    config["attention_dropout"] = 0.3
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_ppo_with_dropout_config_has_zero_kl_and_unit_ratio_at_init(tmp_path, tiny_qwen, arith_data):
    """Dropout is off in every scoring forward: old = new = reference log-probs before any update."""
    from posttrain.config import load_config
    from posttrain.data import prompt_examples, read_rows
    from posttrain.models import load_policy_and_reference
    from posttrain.rewards import RewardSources
    from posttrain.rollout import build_engine

    model_dir = _dropout_copy(tiny_qwen, tmp_path / "model")
    cfg = load_config("ppo", None, {**{k: str(v) for k, v in base_fields(model_dir, arith_data).items()},
                                    "output_dir": str(tmp_path / "out"), "critic": "shared"})
    tokenizer, actor, ref = load_policy_and_reference(cfg)
    assert actor.training, "the policy stays in train mode (gradient checkpointing needs it)"
    prompts = prompt_examples(read_rows(str(arith_data["prompts"]))[:16], tokenizer, 64)
    head = ppo_recipe.ValueHead(actor.config.hidden_size)
    torch.manual_seed(0)
    engine = build_engine(cfg, actor, tokenizer)
    rollout, stats = ppo_recipe.make_rollout(cfg, engine, actor, ref, None, head, RewardSources.from_config(cfg, tokenizer),
                                             prompts, cfg.kl_coef)
    assert float(stats["kl"]) == 0.0
    T = rollout.mask.shape[1]
    logps, _, _ = ppo_recipe.actor_critic_forward(actor, None, head, rollout.input_ids, rollout.attention_mask, T)
    ratio = torch.exp(logps - rollout.old_logps)[rollout.mask.bool()]
    assert torch.equal(ratio, torch.ones_like(ratio)), (ratio.min(), ratio.max())


def test_ppo_batch_must_split_into_mini_batches(tmp_path, tiny_qwen, arith_data):
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="num_mini_batches"):
        run_recipe("ppo", tmp_path, **base_fields(tiny_qwen, arith_data, per_device_train_batch_size=8,
                                                  num_mini_batches=3, max_steps=1))
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        run_recipe("ppo", tmp_path, **base_fields(tiny_qwen, arith_data, per_device_train_batch_size=8,
                                                  num_mini_batches=2, gradient_accumulation_steps=3, max_steps=1))


def test_ppo_steps_once_per_mini_batch_accumulating_micro_batches(tmp_path, tiny_qwen, arith_data, monkeypatch):
    """B = 8, 2 mini-batches, accumulation 2: 2 optimizer steps per epoch, each over 2 micro-batches of 2."""
    steps, forwards = [], []
    real_step, real_forward = ppo_recipe.clip_and_step, ppo_recipe.actor_critic_forward

    def counting_step(*args, **kwargs):
        steps.append(1)
        return real_step(*args, **kwargs)

    def counting_forward(actor, critic, value_head, ids, *args, **kwargs):
        forwards.append(ids.shape[0])
        return real_forward(actor, critic, value_head, ids, *args, **kwargs)

    monkeypatch.setattr(ppo_recipe, "clip_and_step", counting_step)
    monkeypatch.setattr(ppo_recipe, "actor_critic_forward", counting_forward)
    run_recipe("ppo", tmp_path, **base_fields(tiny_qwen, arith_data, per_device_train_batch_size=8, num_mini_batches=2,
                                              gradient_accumulation_steps=2, num_ppo_epochs=3, max_steps=1))
    assert len(steps) == 3 * 2
    # one rollout forward over 8, then 3 epochs x 2 mini-batches x 2 micro-batches of 2
    assert forwards == [8] + [2] * 12
