"""Config loading (defaults < YAML < flags) and the command line run as a user runs it (DESIGN.md §2)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from posttrain.config import STAGE_CONFIGS, DPOConfig, GRPOConfig, PPOConfig, SFTConfig, field_docs, load_config
from posttrain.errors import UserError

DATA = {"dataset_name": "train.jsonl"}


def write_yaml(path, text: str):
    path.write_text(text)
    return str(path)


# ===================================================================== precedence


def test_defaults_when_nothing_is_given():
    cfg = load_config("sft", None, dict(DATA))
    assert isinstance(cfg, SFTConfig)
    for f in dataclasses.fields(SFTConfig):
        if f.name != "dataset_name":
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(cfg, f.name) == default, f.name
    assert cfg.learning_rate == 2e-5  # the SFT default, not the common 1e-5


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path / "cfg.yaml", "dataset_name: from_yaml.jsonl\nlearning_rate: 0.001\nseed: 7\n"
                                             "max_length: 100\n")
    cfg = load_config("dpo", path, {"learning_rate": "0.5", "max_length": "64"})
    assert cfg.learning_rate == 0.5  # flag beats YAML
    assert cfg.max_length == 64
    assert cfg.seed == 7  # YAML beats default
    assert cfg.dataset_name == "from_yaml.jsonl"
    assert cfg.beta == DPOConfig.beta == 0.1  # default where neither says anything


def test_empty_yaml_is_all_defaults(tmp_path):
    path = write_yaml(tmp_path / "cfg.yaml", "# nothing here\n")
    assert load_config("rm", path, dict(DATA)).learning_rate == 1e-4


# ===================================================================== coercion


def test_flag_strings_are_coerced_to_field_types():
    cfg = load_config("grpo", None, {**DATA, "max_steps": "5", "learning_rate": "1e-3", "temperature": "0.7",
                                     "bf16": "true", "progress": "false",
                                     "reward_funcs": "exact_match,think_format", "reward_weights": "1,0.5"})
    assert cfg.max_steps == 5 and type(cfg.max_steps) is int
    assert cfg.learning_rate == 1e-3 and type(cfg.learning_rate) is float
    assert cfg.temperature == 0.7
    assert cfg.bf16 is True and cfg.progress is False
    assert cfg.reward_funcs == ["exact_match", "think_format"]
    assert cfg.reward_weights == [1.0, 0.5]


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                        ("false", False), ("FALSE", False), ("0", False), ("no", False)])
def test_bool_spellings(text, value):
    assert load_config("sft", None, {**DATA, "bf16": text}).bf16 is value


def test_yaml_values_are_coerced(tmp_path):
    path = write_yaml(tmp_path / "cfg.yaml", "dataset_name: d.jsonl\nnum_train_epochs: 2\nmax_steps: 3.0\n"
                                             "use_peft: true\nreward_funcs: [exact_match]\n"
                                             "reward_weights: 2,1\nreward_model_name_or_path: rm\n")
    cfg = load_config("ppo", path, {})
    assert cfg.num_train_epochs == 2.0 and type(cfg.num_train_epochs) is float
    assert cfg.max_steps == 3 and type(cfg.max_steps) is int
    assert cfg.use_peft is True
    assert cfg.reward_funcs == ["exact_match"]
    assert cfg.reward_weights == [2.0, 1.0]


def test_list_defaults_are_not_shared():
    a = load_config("grpo", None, dict(DATA))
    a.reward_funcs.append("x")
    assert load_config("grpo", None, dict(DATA)).reward_funcs == ["exact_match"]


# ===================================================================== errors


def test_unknown_yaml_field_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path / "cfg.yaml", "# my run\ndataset_name: d.jsonl\nlearning_rat: 0.1\n")
    with pytest.raises(UserError) as info:
        load_config("sft", path, {})
    assert "cfg.yaml:3" in str(info.value)
    assert "learning_rat" in str(info.value)


def test_bad_yaml_type_names_file_line_and_field(tmp_path):
    path = write_yaml(tmp_path / "cfg.yaml", "dataset_name: d.jsonl\nseed: 1\nmax_steps: lots\n")
    with pytest.raises(UserError) as info:
        load_config("sft", path, {})
    message = str(info.value)
    assert "cfg.yaml:3" in message and "'max_steps'" in message and "int" in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = write_yaml(tmp_path / "cfg.yaml", "dataset_name: d.jsonl\nseed: [1, 2\nbeta: 0.1\n")
    with pytest.raises(UserError, match=r"cfg\.yaml:\d+: invalid YAML"):
        load_config("dpo", path, {})


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path / "cfg.yaml", "- seed\n- beta\n")
    with pytest.raises(UserError, match=r"cfg\.yaml"):
        load_config("dpo", path, {})


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="nope.yaml"):
        load_config("dpo", str(tmp_path / "nope.yaml"), dict(DATA))


def test_unknown_flag():
    with pytest.raises(UserError, match="--no_such_field"):
        load_config("sft", None, {**DATA, "no_such_field": "1"})
    with pytest.raises(UserError, match=r"^--learnig_rate: unknown field for posttrain sft; did you mean --learning_rate\?$"):
        load_config("sft", None, {**DATA, "learnig_rate": "1"})


@pytest.mark.parametrize("argv,field", [(["--learning", "1e-3"], "learning_rate"), (["--cliprange_val", "0.3"], "cliprange_value"),
                                        (["--max_step", "3"], "max_steps")])
def test_prefix_abbreviations_are_not_fields(argv, field, capsys):
    # argparse would read a unique prefix as the field (`--learning` -> learning_rate): that is switched off
    from posttrain import cli

    assert cli.main(["ppo", "--dataset_name", "d.jsonl", *argv]) == 2
    assert capsys.readouterr().err.strip().endswith(f"did you mean --{field}?")


def test_field_of_another_stage_is_unknown():
    with pytest.raises(UserError, match="kl_estimator"):
        load_config("dpo", None, {**DATA, "kl_estimator": "k1"})


@pytest.mark.parametrize("stage,name,value,kind", [
    ("sft", "max_steps", "abc", "int"),
    ("sft", "max_steps", "2.5", "int"),
    ("sft", "learning_rate", "fast", "float"),
    ("sft", "bf16", "maybe", "bool"),
    ("dpo", "beta", "", "float"),
])
def test_bad_flag_type_names_the_field(stage, name, value, kind):
    with pytest.raises(UserError) as info:
        load_config(stage, None, {**DATA, name: value})
    assert f"'{name}'" in str(info.value) and kind in str(info.value)


@pytest.mark.parametrize("stage,name,value,valid", [
    ("dpo", "loss_type", "foo", ["sigmoid", "ipo", "hinge"]),
    ("grpo", "loss_type", "sigmoid", ["grpo", "bnpo", "dr_grpo", "dapo"]),
    ("ppo", "kl_estimator", "k9", ["k1", "k2", "k3"]),
    ("ppo", "critic", "x", ["separate", "shared"]),
    ("grpo", "scale_rewards", "yes", ["group", "batch", "none"]),
    ("dpo", "logps_normalization", "max", ["sum", "mean"]),
    ("sft", "lr_scheduler_type", "step", ["cosine", "linear", "constant"]),
])
def test_invalid_choice_lists_valid_values(stage, name, value, valid):
    with pytest.raises(UserError) as info:
        load_config(stage, None, {**DATA, name: value})
    message = str(info.value)
    assert f"'{name}'" in message and repr(value) in message
    for v in valid:
        assert v in message


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_missing_dataset_name(stage):
    with pytest.raises(UserError, match="dataset_name"):
        load_config(stage, None, {})


@pytest.mark.parametrize("stage,overrides,words", [
    ("grpo", {"num_generations": "1"}, ["num_generations"]),
    ("grpo", {"reward_weights": "1,2"}, ["reward_weights"]),  # one reward func, two weights
    ("dpo", {"beta": "0"}, ["beta"]),
    ("sft", {"per_device_train_batch_size": "0"}, ["per_device_train_batch_size"]),
    ("rm", {"gradient_accumulation_steps": "0"}, ["gradient_accumulation_steps"]),
])
def test_impossible_values_are_rejected(stage, overrides, words):
    with pytest.raises(UserError) as info:
        load_config(stage, None, {**DATA, **overrides})
    for word in words:
        assert word in str(info.value)


def test_valid_choices_are_accepted():
    assert load_config("dpo", None, {**DATA, "loss_type": "ipo"}).loss_type == ["ipo"]  # TRL's list of loss types
    assert load_config("ppo", None, {**DATA, "critic": "shared", "kl_estimator": "k3"}).critic == "shared"
    cfg = load_config("grpo", None, {**DATA, "loss_type": "dr_grpo", "scale_rewards": "none"})
    assert (cfg.loss_type, cfg.scale_rewards) == ("dr_grpo", "none")


def test_stage_classes():
    assert STAGE_CONFIGS["ppo"] is PPOConfig and STAGE_CONFIGS["grpo"] is GRPOConfig
    assert set(STAGE_CONFIGS) == {"sft", "rm", "dpo", "ppo", "grpo", "rloo", "kto", "online_dpo", "distill", "cpo", "orpo"}


# ===================================================================== field docs


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_every_field_has_a_docstring(stage):
    cls = STAGE_CONFIGS[stage]
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert isinstance(docs.get(f.name), str) and docs[f.name].strip(), f"{stage}.{f.name} has no doc"
        assert "\n" not in docs[f.name]  # one line in --help


def test_field_docs_follow_overrides():
    assert field_docs(SFTConfig)["learning_rate"] == "Peak learning rate of AdamW."
    assert "k1 | k2 | k3" in field_docs(PPOConfig)["kl_estimator"]
    assert "sigmoid" in field_docs(DPOConfig)["loss_type"] and "grpo" in field_docs(GRPOConfig)["loss_type"]


# ===================================================================== CLI (child processes)


def _one_line(text: str) -> str:
    return " ".join(text.split())


STAGES = ["sft", "rm", "dpo", "ppo", "grpo"]


def _run_many(calls: list[tuple], cwd) -> list:
    """Several `python -m posttrain` child processes side by side (each one imports torch: seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import run_cli

    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda args: run_cli(*args, cwd=cwd), calls))


@pytest.fixture(scope="module")
def stage_help(tmp_path_factory) -> dict:
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "2000"  # no wrapping inside a field's help line
    try:
        procs = _run_many([(stage, "--help") for stage in STAGES], tmp_path_factory.mktemp("help"))
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return dict(zip(STAGES, procs))


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_lists_every_field_with_default(stage_help, stage):
    proc = stage_help[stage]
    assert proc.returncode == 0, proc.stderr
    out = _one_line(proc.stdout)
    docs = field_docs(STAGE_CONFIGS[stage])
    assert out.startswith(f"usage: posttrain {stage} ")
    assert "--config" in out
    for f in dataclasses.fields(STAGE_CONFIGS[stage]):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"--{f.name} " in out, f.name
        assert f"{docs[f.name]} (default: {default!r})" in out, f.name


def test_missing_data_file_exits_2_with_one_line(cli, tmp_path):
    proc = cli("dpo", "--dataset_name", "missing.jsonl", "--model_name_or_path", "X", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("posttrain: error:")
    assert "missing.jsonl" in lines[0] or "'X'" in lines[0]


def test_bad_row_exits_2_naming_file_and_line(cli, tmp_path, tiny_qwen):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "1+2=", "completion": "3"}) + "\n"
                    + json.dumps({"prompt": "2+2=", "completion": 4}) + "\n")
    proc = cli("sft", "--dataset_name", data, "--model_name_or_path", tiny_qwen, "--output_dir", tmp_path / "out",
               "--max_steps", "1", "--progress", "false", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("posttrain: error:")
    assert "bad.jsonl:2" in last and "'completion'" in last


def test_unknown_flag_exits_2(cli, tmp_path):
    proc = cli("sft", "--dataset_name", "d.jsonl", "--no_such_flag", "1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "posttrain: error: --no_such_flag: unknown field for posttrain sft (see posttrain sft --help)"


DATA_FILES = ("sft.jsonl", "preference.jsonl", "prompts.jsonl", "eval.jsonl")


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    from conftest import run_cli

    root = tmp_path_factory.mktemp("data_cmd")
    return root / "a", run_cli("data", "arith", "--output_dir", root / "a", cwd=root)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_data_command_writes_the_four_files(data_run):
    out, proc = data_run
    assert proc.returncode == 0, proc.stderr
    for name in DATA_FILES:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and all(isinstance(r, dict) and isinstance(r["prompt"], str) for r in rows)
    assert len((out / "eval.jsonl").read_text().splitlines()) >= 200  # DESIGN §6: N >= 200


def test_data_command_is_deterministic(data_run, tmp_path):
    # a second, independent run (in this process, same defaults: seed 0) gives the same bytes;
    # one child process fewer than running the command twice on a busy 2-core machine
    from posttrain.tasks import arith

    out, _ = data_run
    again = arith.write_datasets(tmp_path, seed=0, carry_error_rate=0.6)
    assert sorted(p.name for p in again.values()) == sorted(DATA_FILES)
    for name in DATA_FILES:
        assert _digest(out / name) == _digest(tmp_path / name), name
    other = arith.write_datasets(tmp_path / "seed1", seed=1)
    assert _digest(out / "sft.jsonl") != _digest(other["sft"])  # and it does depend on the seed


def test_data_command_eval_prompts_are_held_out(data_run):
    out, _ = data_run

    def prompts(name):
        return {json.loads(line)["prompt"] for line in (out / name).read_text().splitlines()}

    held_out = prompts("eval.jsonl")
    for name in ("sft.jsonl", "preference.jsonl", "prompts.jsonl"):
        assert not held_out & prompts(name), name


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_config_loads(path):
    # the stage is the file name's prefix (sft_tiny.yaml -> sft); each header names its run command
    stage = path.name.split("_")[0]
    cfg = load_config(stage, str(path), {})
    assert cfg.dataset_name and cfg.output_dir
    assert f"posttrain {stage} --config configs/{path.name}" in path.read_text()


def test_boolean_flags_work_bare_and_with_a_value():
    from posttrain.cli import _split_stage_args, build_parser
    from posttrain.config import load_config

    def parsed(*argv):
        config_file, overrides = _split_stage_args(build_parser().parse_args(["dpo", "--dataset_name", "x.jsonl", *argv]))
        return load_config("dpo", config_file, overrides)

    cfg = parsed("--bf16", "--gradient_checkpointing", "--precompute_ref_log_probs", "--beta", "0.2")
    assert cfg.bf16 and cfg.gradient_checkpointing and cfg.precompute_ref_log_probs and cfg.beta == 0.2
    assert not parsed("--bf16", "false").bf16
    assert parsed("--use_peft", "true").use_peft


def parse_flags(stage: str, *argv: str):
    """A stage's config from a command line, through the CLI's own parser (nothing runs)."""
    from posttrain.cli import _split_stage_args, build_parser

    args, extras = build_parser().parse_known_args([stage, "--dataset_name", "x.jsonl", *argv])
    assert not extras, extras
    config_file, overrides = _split_stage_args(args)
    return load_config(stage, config_file, overrides)


@pytest.mark.parametrize("argv,field,value", [
    # TRL's list syntax: space-separated values
    (["--lora_target_modules", "q_proj", "v_proj"], "lora_target_modules", "q_proj,v_proj"),
    (["--reward_funcs", "exact_match", "think_format"], "reward_funcs", ["exact_match", "think_format"]),
    (["--reward_funcs", "exact_match", "think_format", "--reward_weights", "1", "0.5"], "reward_weights", [1.0, 0.5]),
    (["--reward_funcs", "exact_match", "think_format", "--reward_weights", "1", "-0.5"], "reward_weights", [1.0, -0.5]),
    (["--report_to", "none"], "report_to", ["none"]),
    (["--report_to", "none", "jsonl"], "report_to", ["none", "jsonl"]),
    # posttrain's comma-separated form still works, also mixed with spaces
    (["--lora_target_modules", "q_proj,v_proj"], "lora_target_modules", "q_proj,v_proj"),
    (["--reward_funcs", "exact_match,think_format"], "reward_funcs", ["exact_match", "think_format"]),
    (["--reward_funcs", "exact_match,think_format", "accuracy_reward"], "reward_funcs",
     ["exact_match", "think_format", "accuracy_reward"]),
    (["--reward_funcs", ""], "reward_funcs", []),
    (["--lora_target_modules", "all-linear", "--lora_r", "4"], "lora_target_modules", "all-linear"),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and str(v[0]).startswith("--") else None)
def test_list_flags_take_space_separated_values(argv, field, value):
    cfg = parse_flags("grpo", *argv)
    assert getattr(cfg, field) == value
    if "--lora_r" in argv:
        assert cfg.lora_r == 4  # the next flag ends the list


def test_yaml_lists_still_work(tmp_path):
    path = write_yaml(tmp_path / "g.yaml", "reward_funcs: [exact_match, think_format]\nreward_weights: [1, 0.5]\n"
                                           "lora_target_modules: q_proj,v_proj\n")
    cfg = load_config("grpo", path, dict(DATA))
    assert (cfg.reward_funcs, cfg.reward_weights, cfg.lora_target_modules) == \
        (["exact_match", "think_format"], [1.0, 0.5], "q_proj,v_proj")


def test_space_separated_lists_in_a_real_run(cli, tmp_path, tiny_qwen, arith_data):
    out = tmp_path / "out"
    proc = cli("grpo", "--model_name_or_path", tiny_qwen, "--dataset_name", arith_data["prompts"], "--output_dir", out,
               "--reward_funcs", "exact_match", "think_format", "--reward_weights", "1", "0.5", "--use_peft",
               "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "4", "--report_to", "none",
               "--per_device_train_batch_size", "2", "--num_generations", "2", "--max_completion_length", "4",
               "--max_steps", "1", "--progress", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = (out / "config.yaml").read_text()
    assert "- exact_match\n- think_format\n" in saved and "- 1.0\n- 0.5\n" in saved
    assert "lora_target_modules: q_proj,v_proj" in saved
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


# ===================================================================== preference losses: lists of DPO loss types, cpo, orpo

def test_dpo_takes_a_list_of_loss_types_with_weights_and_checks_them():
    cfg = load_config("dpo", None, {**DATA, "loss_type": "sigmoid,bco_pair", "loss_weights": "1,0.5"})  # `--loss_type a b`
    assert (cfg.loss_type, cfg.loss_weights, cfg.logps_normalization) == (["sigmoid", "bco_pair"], [1.0, 0.5], "sum")
    assert load_config("dpo", None, {**DATA, "loss_type": "ipo"}).logps_normalization == "mean"  # ipo alone
    for overrides, words in [({"loss_type": "sigmoid,ipo", "loss_weights": "1"}, "field .loss_weights. has 1 values for 2 loss types"),
                             ({"loss_type": "exo_pair"}, "exo_pair needs label_smoothing > 0"),
                             ({"loss_type": "sigmoid,kto"}, "'kto' is not one of sigmoid, ipo, hinge, robust"),
                             ({"loss_type": "sigmoid,3"}, "is not a loss type")]:
        with pytest.raises(UserError, match=words):
            load_config("dpo", None, {**DATA, **overrides})


def test_cpo_and_orpo_take_trls_fields():
    cfg = load_config("cpo", None, {**DATA, "loss_type": "simpo", "simpo_gamma": "0.3", "cpo_alpha": "0", "beta": "2"})
    assert (cfg.loss_type, cfg.simpo_gamma, cfg.cpo_alpha, cfg.beta) == ("simpo", 0.3, 0.0, 2.0)
    assert load_config("cpo", None, DATA).beta == 0.1 and load_config("orpo", None, DATA).beta == 0.1  # TRL's defaults
    assert not hasattr(load_config("orpo", None, DATA), "ref_model_name_or_path")  # reference-free
    with pytest.raises(UserError, match="'alphapo' is not one of sigmoid, hinge, ipo, simpo"):
        load_config("cpo", None, {**DATA, "loss_type": "alphapo"})
    with pytest.raises(UserError, match="posttrain cpo does not support alpha"):
        load_config("cpo", None, {**DATA, "alpha": "0.5"})
