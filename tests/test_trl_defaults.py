"""What a renamed TRL command line meets: posttrain's defaults where TRL 1.16's differ (config.TRL_DEFAULTS, checked
here against TRL's own classes), TRL trainer names posttrain has no stage for, and accelerate launcher options."""

from __future__ import annotations

import dataclasses

import pytest

from posttrain import cli as posttrain_cli
from posttrain.config import ACCELERATE_LAUNCH_OPTIONS, STAGE_CONFIGS, TRL_DEFAULTS, trl_flags

# TRL's None that means what posttrain's default means: eval_steps (logging_steps; posttrain's 0), epsilon_high (epsilon;
# posttrain's 0), completion_only_loss (true for prompt/completion rows, posttrain's true), reward_weights (all 1),
# fsdp / center_rewards_coefficient / min_p / delta / missing_eos_penalty (off), and the empty paths and names;
# loss_weights (all 1) and max_completion_length (cpo, orpo: no bound, posttrain's 0)
NONE_MEANS_POSTTRAIN_DEFAULT = {"loss_weights", "max_completion_length",
    "eval_steps", "epsilon_high", "completion_only_loss", "reward_weights", "fsdp", "center_rewards_coefficient", "min_p",
    "delta", "missing_eos_penalty", "eos_token", "chat_template_path", "attn_implementation", "dataset_config", "resume_from_checkpoint", "run_name",
}
# where a run reads and writes, not how it trains (TRL has no default model or data; its output_dir is trainer_output;
# GKD's teacher None is the trained model itself, posttrain distill requires one)
NOT_COMPARED = {"model_name_or_path", "dataset_name", "output_dir", "teacher_model_name_or_path"}


def trl_classes(stage: str) -> list:
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from trl.experimental.online_dpo import OnlineDPOConfig

    trainer = {"sft": trl.SFTConfig, "rm": trl.RewardConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig,
               "rloo": trl.RLOOConfig, "online_dpo": OnlineDPOConfig, "kto": trl.KTOConfig,
               "ppo": transformers.TrainingArguments}.get(stage)  # TRL 1.16 has no PPO trainer
    if stage == "distill":
        trainer = pytest.importorskip("trl.experimental.gkd").GKDConfig
    if stage in ("cpo", "orpo"):  # TRL 1.16 keeps them under trl.experimental
        trainer = getattr(pytest.importorskip(f"trl.experimental.{stage}"), f"{stage.upper()}Config")
    return [trainer, trl.ModelConfig, trl.ScriptArguments]


def default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def trl_default(name: str, f: dataclasses.Field, trainer):
    """TRL's default as it takes effect."""
    value = default(f)
    if name == "bf16" and value is None:  # trl/trainer/base_config.py: bf16 = not fp16
        return not default(next(g for g in dataclasses.fields(trainer) if g.name == "fp16"))
    if name == "gradient_checkpointing" and value is None:  # transformers 5: a deprecated alias of activation_checkpointing
        return bool(default(next(g for g in dataclasses.fields(trainer) if g.name == "activation_checkpointing")))
    if name == "beta" and isinstance(value, list) and len(value) == 1:  # Online DPO's beta (one per epoch)
        return value[0]
    if name == "report_to" and isinstance(value, str):
        return [value]
    return value.value if hasattr(value, "value") else value  # transformers' str enums (lr_scheduler_type, eval_strategy)


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_the_table_of_trl_defaults_is_trl_1_16s(stage):
    classes = trl_classes(stage)
    ours = {f.name: default(f) for f in dataclasses.fields(STAGE_CONFIGS[stage])}
    theirs = {}
    for cls in reversed(classes):  # the trainer config wins over ModelConfig / ScriptArguments
        theirs.update({f.name: trl_default(f.name, f, classes[0]) for f in dataclasses.fields(cls)})
    differ = {}
    for name in ours.keys() & theirs.keys() - NOT_COMPARED:
        if theirs[name] is None and name in NONE_MEANS_POSTTRAIN_DEFAULT or theirs[name] == ours[name]:
            continue
        differ[name] = theirs[name]
    assert TRL_DEFAULTS[stage] == differ
    # the fields the issue names, as a reader checks them
    if stage == "dpo":
        assert differ["learning_rate"] == 1e-6 and differ["num_train_epochs"] == 3.0 and differ["save_steps"] == 500
    if stage == "grpo":
        assert differ["beta"] == 0.0 and differ["loss_type"] == "dapo" and differ["max_completion_length"] == 512


def test_a_trl_dpo_command_line_is_told_the_defaults_it_left_unlike_trls(cli, tiny_qwen, arith_data, tmp_path):
    proc = cli("dpo", "--dataset_name", arith_data["preference"], "--model_name_or_path", tiny_qwen, "--output_dir",
               tmp_path / "out", "--learning_rate", "5.0e-7", "--torch_dtype", "float32", "--per_device_train_batch_size",
               "2", "--max_steps", "1", "--no_remove_unused_columns", "--disable_tqdm", "true", "--num_threads", "1")
    assert proc.returncode == 0, proc.stderr
    [notice] = [line for line in proc.stderr.splitlines() if "defaults where TRL's differ" in line]
    assert notice.startswith("posttrain: note: posttrain's defaults where TRL's differ")
    assert "num_train_epochs=1.0 (TRL: 3.0)" in notice and "save_steps=0 (TRL: 500)" in notice
    assert "max_length=512 (TRL: 1024)" in notice and "bf16=false (TRL: true)" in notice
    assert "learning_rate" not in notice  # the user set it
    assert "lora_dropout" not in notice  # LoRA is off: its defaults change nothing


def test_the_notice_omits_what_the_user_set_and_names_ppo_s_source():
    from posttrain.config import load_config, trl_default_notice

    given: dict = {}
    cfg = load_config("grpo", None, {"dataset_name": "d.jsonl", "beta": "0.0", "loss_type": "grpo"}, given=given)
    notice = trl_default_notice("grpo", cfg, given)
    assert "max_completion_length=64 (TRL: 512)" in notice and "beta" not in notice and "loss_type" not in notice
    given = {}
    cfg = load_config("ppo", None, {"dataset_name": "d.jsonl"}, given=given)
    assert "learning_rate=3e-06 (transformers: 5e-05)" in trl_default_notice("ppo", cfg, given)
    cfg = load_config("dpo", None, {"dataset_name": "d.jsonl"})
    assert trl_default_notice("dpo", cfg, {name: "--x" for name in TRL_DEFAULTS["dpo"]}) == ""  # all set: no line


# ===================================================================== TRL trainers posttrain has no stage for

@pytest.mark.parametrize("name, nearest", [("simpo", "posttrain cpo"), ("xpo", "posttrain online_dpo"),
                                           ("nash_md", "posttrain online_dpo"), ("bco", "posttrain dpo"),
                                           ("prm", "posttrain rm")])
def test_a_trl_trainer_posttrain_lacks_says_what_to_run(cli, name, nearest):
    proc = cli(name, "--model_name_or_path", "m", "--dataset_name", "d")
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"posttrain: error: posttrain has no {name} stage; nearest: {nearest}"), line
    assert "posttrain: posttrain" not in line and "sft, rm (reward), dpo, cpo, orpo, kto, ppo, grpo, rloo, online_dpo, distill" in line


def test_every_trl_command_is_a_posttrain_command_or_named_with_the_nearest():
    commands = pytest.importorskip("trl.cli.commands")
    names = {c.name.replace("-", "_") for c in commands.get_commands()} - {"env"}  # trl env prints TRL's environment
    known = set(posttrain_cli.build_parser().commands)
    assert names - known - set(posttrain_cli.NEAREST_STAGE) == set()


def test_an_unknown_command_is_one_line_with_the_closest():
    with pytest.raises(Exception) as err:
        posttrain_cli.run(["dpx"])
    assert str(err.value).startswith("posttrain has no 'dpx' command; did you mean posttrain dpo?")


# ===================================================================== accelerate launcher options

@pytest.mark.parametrize("argv", [["grpo", "--num_processes", "8"], ["sft", "--accelerate_config", "zero2"],
                                  ["dpo", "--config_file", "fsdp.yaml"], ["--num_processes", "8", "grpo"]])
def test_an_accelerate_launcher_option_points_to_torchrun(cli, argv):
    proc = cli(*argv)
    stage = next(a for a in argv if a in STAGE_CONFIGS)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert f"torchrun --standalone --nproc_per_node N -m posttrain {stage} ..." in line, line
    assert "unknown field" not in line and "did you mean" not in line


def test_the_launcher_options_are_accelerates_and_no_posttrain_name(tmp_path):
    launch = pytest.importorskip("accelerate.commands.launch")
    options = {o.lstrip("-").replace("-", "_") for a in launch.launch_command_parser()._actions for o in a.option_strings}
    assert set(ACCELERATE_LAUNCH_OPTIONS) - options == {"accelerate_config"}  # TRL's name of accelerate's --config_file
    for stage, cls in STAGE_CONFIGS.items():
        names = {f.name for f in dataclasses.fields(cls)} | set(trl_flags(stage))
        assert names & set(ACCELERATE_LAUNCH_OPTIONS) == set()
    yaml = tmp_path / "c.yaml"
    yaml.write_text("num_processes: 8\n")
    with pytest.raises(Exception, match=r"c\.yaml:1: num_processes is an accelerate launcher option.*torchrun"):
        posttrain_cli.run(["grpo", "--config", str(yaml)])
