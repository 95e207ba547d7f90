"""`posttrain rloo` and the critic-free fields of grpo: TRL RLOOConfig's defaults and names, --help, one-line errors."""

from __future__ import annotations

import dataclasses

import pytest

from posttrain import cli
from posttrain.config import STAGE_CONFIGS, RLOOConfig, load_config
from posttrain.errors import UserError

DATA = {"dataset_name": "train.jsonl"}


def test_rloo_has_trl_rlooconfig_defaults():
    trl = pytest.importorskip("trl")
    theirs = {f.name: f.default for f in dataclasses.fields(trl.RLOOConfig)}  # (building one needs a bf16 GPU)
    cfg = load_config("rloo", None, dict(DATA))
    assert isinstance(cfg, RLOOConfig) and STAGE_CONFIGS["rloo"] is RLOOConfig
    for name in ("beta", "num_generations", "epsilon", "num_iterations", "learning_rate", "normalize_advantages",
                 "mask_truncated_completions"):
        assert getattr(cfg, name) == theirs[name], name
    # RLOO's semantics: k1 KL in the reward, leave-one-out baseline, whole-completion ratio
    assert (cfg.kl_estimator, cfg.kl_in_reward, cfg.advantage_estimator, cfg.loss_type) == ("k1", True, "rloo", "rloo")
    # grpo keeps its own defaults
    grpo = load_config("grpo", None, dict(DATA))
    assert (grpo.kl_estimator, grpo.kl_in_reward, grpo.advantage_estimator, grpo.importance_sampling_level) == \
        ("k3", False, "grpo", "token")


def test_trl_rloo_flags_are_read():
    cfg = load_config("rloo", None, {**DATA, "normalize_advantages": "true", "epsilon_high": "0.28", "beta": "0"})
    assert cfg.normalize_advantages and cfg.epsilon_high == 0.28 and cfg.beta == 0
    with pytest.raises(UserError, match="reward_clip_range.*use reward_clip"):
        load_config("rloo", None, {**DATA, "reward_clip_range": "-1,1"})


def test_rloo_is_a_command_with_help(capsys):
    assert "rloo" in cli.STAGES
    with pytest.raises(SystemExit) as info:
        cli.run(["rloo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("--advantage_estimator", "--kl_in_reward", "--normalize_advantages", "--importance_sampling_level",
                 "--delta", "--clip_ratio_c", "--sapo_temperature_pos", "--cispo_two_sided"):
        assert name in out
    assert "TRL RLOOTrainer" in out
    with pytest.raises(SystemExit):
        cli.run(["--help"])
    assert "rloo" in capsys.readouterr().out


@pytest.mark.parametrize("stage, overrides, words", [
    ("grpo", {"advantage_estimator": "vtrace"}, "field 'advantage_estimator': 'vtrace' is not one of grpo, rloo"),
    ("grpo", {"importance_sampling_level": "group"}, "field 'importance_sampling_level'"),
    ("grpo", {"kl_estimator": "k4"}, "k3_plus"),
    ("grpo", {"loss_type": "cispo"}, "field 'epsilon_high': loss_type cispo needs epsilon_high > 1"),
    ("grpo", {"loss_type": "cispo", "epsilon_high": "0.28"}, "needs epsilon_high > 1"),
    ("grpo", {"delta": "0.9"}, "field 'delta' must be 0 (off) or > 1"),
    ("grpo", {"clip_ratio_c": "1"}, "field 'clip_ratio_c' must be 0 (off) or > 1"),
    ("grpo", {"loss_type": "sapo", "delta": "2"}, "field 'delta' applies to the clipped losses"),
    ("grpo", {"sapo_temperature_neg": "0"}, "field 'sapo_temperature_neg' must be > 0"),
    ("grpo", {"advantage_estimator": "reinforce_pp", "scale_rewards": "none"}, "applies to advantage_estimator grpo"),
    ("grpo", {"advantage_estimator": "reinforce_pp", "normalize_advantages": "true"}, "whitens its advantages already"),
    ("rloo", {"advantage_estimator": "reinforce_pp_baseline"}, "rloo needs one advantage per completion"),
    ("rloo", {"importance_sampling_level": "sequence"}, "a ratio per completion already"),
    ("rloo", {"use_bias_correction_kl": "true"}, "kl_in_reward puts the KL in the reward"),
    ("grpo", {"advantage_estimator": "remax", "rollout_engine": "m:f"}, "remax samples its greedy baseline"),
])
def test_bad_combinations_are_one_line_errors(stage, overrides, words):
    with pytest.raises(UserError) as info:
        load_config(stage, None, {**DATA, **overrides})
    message = str(info.value)
    assert words in message and "\n" not in message


def test_error_names_the_flag(capsys):
    code = cli.main(["grpo", "--dataset_name", "d.jsonl", "--loss_type", "cispo", "--epsilon_high", "0.2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("posttrain: error: --epsilon_high: field 'epsilon_high': loss_type cispo needs")


def test_every_new_field_has_help():
    from posttrain.config import field_docs

    docs = field_docs(RLOOConfig)
    for f in dataclasses.fields(RLOOConfig):
        assert docs.get(f.name), f.name
