"""Bad configs and command lines stop before anything runs: exit 2, one line naming where, nothing written.

A property test throws hundreds of generated bad configs (out-of-range, non-finite and wrong-typed
values, typos of field names, fields that contradict each other) at ``posttrain.cli.main``, as flags
or as a --config YAML file, with a real data file and the embedded tiny model so that only the config
is wrong. Every one is rejected while the config is read, before a model loads: each takes milliseconds.

The valid ranges are written out again here on purpose: they are the contract, and
``test_every_numeric_field_has_a_range`` ties them to the table in posttrain/config.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain import cli
from posttrain.config import _RANGES, STAGE_CONFIGS, load_config

STAGES = sorted(STAGE_CONFIGS)
BIG = 10**6

# field -> (low, low_open, high, high_open): the valid interval, None where unbounded; a dict where stages differ
RANGES = {
    "seed": (0, False, 2**32, True),
    "learning_rate": (0, True, None, None),
    "critic_learning_rate": (0, False, None, None),
    "weight_decay": (0, False, None, None),
    "warmup_ratio": (0, False, 1, True),
    "warmup_steps": (0, False, None, None),
    "min_lr_rate": (0, False, 1, False),
    "per_device_train_batch_size": (1, False, None, None),
    "gradient_accumulation_steps": (1, False, None, None),
    "num_train_epochs": (0, True, None, None),
    "max_grad_norm": (0, False, None, None),
    "max_length": (2, False, None, None),
    "logging_steps": (1, False, None, None),
    "save_steps": (0, False, None, None),
    "save_total_limit": (0, False, None, None),
    "max_nonfinite_steps": (1, False, None, None),
    "lora_r": (1, False, None, None),
    "lora_alpha": (0, True, None, None),
    "lora_dropout": (0, False, 1, True),
    "num_threads": (0, False, None, None),
    "tiny_num_heads": (1, False, None, None),
    "tiny_num_layers": (1, False, None, None),
    "tiny_intermediate_size": (1, False, None, None),
    "eval_max_rows": (1, False, None, None),
    "eval_steps": (0, False, None, None),
    "eval_split": (0, False, 1, True),
    "beta": {"dpo": (0, True, None, None), "grpo": (0, False, None, None), "rloo": (0, False, None, None),
             "online_dpo": (0, True, None, None), "kto": (0, True, None, None), "distill": (0, False, 1, False),
             "cpo": (0, True, None, None), "orpo": (0, True, None, None)},
    "desirable_weight": (0, False, None, None),
    "undesirable_weight": (0, False, None, None),
    "lmbda": (0, False, 1, False),
    "teacher_top_k": (0, False, None, None),
    "cpo_alpha": (0, False, None, None),
    "simpo_gamma": (0, False, None, None),
    "label_smoothing": (0, False, 0.5, True),
    "rpo_alpha": (0, False, None, None),
    "center_rewards_coefficient": (0, False, None, None),
    "temperature": (0, True, None, None),
    "top_k": (0, False, None, None),
    "max_completion_length": {"ppo": (1, False, None, None), "grpo": (1, False, None, None), "rloo": (1, False, None, None),
                              "dpo": (0, False, None, None), "online_dpo": (1, False, None, None), "distill": (1, False, None, None),
                              "cpo": (0, False, None, None), "orpo": (0, False, None, None)},
    "top_p": (0, True, 1, False),
    "min_p": (0, False, 1, True),
    "repetition_penalty": (1, False, 1, False),  # other values: sampled != scored
    "kl_coef": (0, False, None, None),
    "target_kl_coef": (0, False, None, None),
    "kl_horizon": (1, False, None, None),
    "gamma": (0, False, 1, False),
    "lam": (0, False, 1, False),
    "num_ppo_epochs": (1, False, None, None),
    "num_mini_batches": (1, False, None, None),
    "epsilon": (0, True, 1, True),
    "epsilon_high": (0, False, None, None),  # 0: same as epsilon; the upper clip 1 + epsilon_high may exceed 2
    "cliprange_value": (0, False, None, None),
    "vf_coef": (0, False, None, None),
    "entropy_coef": (0, False, None, None),
    "target_kl": (0, False, None, None),
    "missing_eos_penalty": (0, False, None, None),
    "reward_clip": (0, False, None, None),
    "reward_timeout_s": (0, False, None, None),
    "num_generations": (2, False, None, None),
    "num_iterations": (1, False, None, None),
    "sapo_temperature_pos": (0, True, None, None),
    "sapo_temperature_neg": (0, True, None, None),
    "max_turns": (0, False, None, None),
    "max_tool_response_length": (0, False, None, None),
    "tool_timeout_s": (0, False, None, None),
}
# numeric fields whose rule is not one interval (they have strategies of their own below)
SPECIAL = {"max_steps", "max_prompt_length", "tiny_hidden_size", "delta", "clip_ratio_c"}  # the last two: 0 (off) or > 1
CHOICES = {
    "lr_scheduler_type": {"cosine", "linear", "constant", "cosine_with_min_lr"},
    "save_strategy": {"steps", "epoch", "no"},
    "dtype": {"float32", "bfloat16", "auto"},
    "attn_implementation": {"", "sdpa", "eager", "flash_attention_2"},
    "logps_normalization": {"", "sum", "mean"},
    "kl_estimator": {"k1", "k2", "k3", "k3_plus"},
    "advantage_estimator": {"grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"},
    "importance_sampling_level": {"token", "sequence"},
    "critic": {"separate", "shared"},
    "scale_rewards": {"group", "batch", "none"},
    ("dpo", "loss_type"): {"sigmoid", "ipo", "hinge", "robust", "bco_pair", "apo_zero", "sppo_hard", "nca_pair", "exo_pair"},
    ("cpo", "loss_type"): {"sigmoid", "hinge", "ipo", "simpo"},
    ("grpo", "loss_type"): {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "rloo"},
    ("rloo", "loss_type"): {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "rloo"},
    ("online_dpo", "loss_type"): {"sigmoid", "ipo"},
    ("kto", "loss_type"): {"kto", "apo_zero_unpaired"},
}


def kinds(stage: str) -> dict[str, str]:
    """field -> "int" | "float" | "str" | "bool" | "list" (the annotations are strings: `from __future__`)."""
    return {f.name: str(f.type) for f in dataclasses.fields(STAGE_CONFIGS[stage])}


def interval(stage: str, name: str):
    spec = RANGES[name]
    return spec[stage] if isinstance(spec, dict) else spec


def inside(spec, value) -> bool:
    low, low_open, high, high_open = spec
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


# ===================================================================== strategies of bad values


def out_of_range(kind: str, spec) -> st.SearchStrategy:
    """Values just and far outside the interval, on each bounded side."""
    low, low_open, high, high_open = spec
    parts = []
    if kind == "int":
        if low is not None:
            edge = low if low_open else low - 1
            parts += [st.just(edge), st.integers(edge - BIG, edge)]
        if high is not None:
            edge = high if high_open else high + 1
            parts += [st.just(edge), st.integers(edge, edge + BIG)]
    else:
        if low is not None:
            parts += [st.floats(low - BIG, low, exclude_max=not low_open), st.just(-1e300)]
            if low_open:
                parts.append(st.just(float(low)))
        if high is not None:
            parts += [st.floats(high, high + BIG, exclude_min=not high_open), st.just(1e300)]
            if high_open:
                parts.append(st.just(float(high)))
    return st.one_of(parts).filter(lambda v: not inside(spec, v))


NON_INTEGRAL = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda v: not v.is_integer())
YAML_ONLY_JUNK = st.sampled_from([[1], ["a", "b"], {"a": 1}, None])  # a flag value is always one string


def wrong_type(kind: str, name: str) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(values wrong as a flag or in YAML, values wrong only in YAML) for a field of this kind."""
    if kind == "int":
        return st.one_of(st.booleans(), NON_INTEGRAL, st.sampled_from(["abc", "1.5", "", "ten", "1e3", "0x10"])), \
            YAML_ONLY_JUNK
    if kind == "float":
        return st.one_of(st.booleans(), st.sampled_from(["fast", "", "1,5", "one", "1e", "--"])), YAML_ONLY_JUNK
    if kind == "bool":
        return st.one_of(st.sampled_from(["maybe", "2", "on", "", "ture", "-1"]), st.integers(2, 100), NON_INTEGRAL), \
            st.sampled_from([[True], {"a": True}, None])
    if kind == "str":
        junk = st.one_of(YAML_ONLY_JUNK, st.booleans())
        if name != "reward_on_error":  # the only str field that takes a number
            junk = st.one_of(junk, st.integers(-5, 5), NON_INTEGRAL)
        return st.nothing(), junk
    if name in ("reward_funcs", "tools", "loss_type"):
        return st.sampled_from(["5", "exact_match,3", "1e-3", "nan", "-2"]), \
            st.sampled_from([[1], [True], ["exact_match", 2.5], [None], [["a"]], {"a": 1}, True])
    if name in ("reward_weights", "loss_weights"):
        return st.sampled_from(["x", "1,nan", "inf", "1,two", "true"]), \
            st.sampled_from([["a"], [True], [math.nan], [math.inf], [None], {"a": 1}, False])
    if name == "report_to":
        return st.sampled_from(["mlflow", "tensorboard,comet", "5", "all"]), \
            st.sampled_from([[1], [True], [None], ["tensorboard", "x"], {"a": 1}, True])
    raise AssertionError(f"no strategy for {kind} field {name}")


def case(fields: dict, name: str, yaml_only: bool = False, mention: str | None = None) -> dict:
    """A bad config: the fields to give, the field given where the message must point, and the name it must say."""
    return {"fields": fields, "name": name, "yaml_only": yaml_only, "mention": mention or name}


def valid_names(stage: str) -> set[str]:
    return set(kinds(stage)) | {"config", "help", "h"}


@st.composite
def typo(draw, stage: str) -> dict:
    """A valid field name with one letter deleted, inserted, replaced or two swapped."""
    names = sorted(kinds(stage))
    name = draw(st.sampled_from(names))
    i = draw(st.integers(0, len(name) - 1))
    letter = draw(st.sampled_from(string.ascii_lowercase + "_"))
    edit = draw(st.sampled_from(["delete", "insert", "replace", "swap"]))
    if edit == "delete":
        bad = name[:i] + name[i + 1:]
    elif edit == "insert":
        bad = name[:i] + letter + name[i:]
    elif edit == "replace":
        bad = name[:i] + letter + name[i + 1:]
    else:
        j = min(i + 1, len(name) - 1)
        bad = name[:i] + name[j] + name[i] + name[j + 1:] if j > i else name[:-1] + letter
    # a key YAML reads as something else (`on`, `null`, `1`) is not a typo of a field name
    ok = bad and bad not in valid_names(stage) and yaml.safe_load(f"{bad}: 1") == {bad: 1}
    if not ok:
        bad = name + "x"
    return case({bad: "1"}, bad, mention=bad)


@st.composite
def bad_config(draw) -> tuple[str, dict]:
    stage = draw(st.sampled_from(STAGES))
    fields = kinds(stage)
    numeric = sorted(n for n, k in fields.items() if k in ("int", "float") and n in RANGES)
    category = draw(st.sampled_from(["range", "range", "range", "nonfinite", "type", "type", "typo", "choice", "cross"]))
    if category == "range":
        name = draw(st.sampled_from(numeric + sorted(SPECIAL & set(fields))))
        if name == "max_steps":
            return stage, case({name: draw(st.one_of(st.just(0), st.integers(-BIG, -2)))}, name)
        if name == "max_prompt_length":
            longest = draw(st.one_of(st.just(None), st.integers(2, 600)))
            given = {} if longest is None else {"max_length": longest}
            limit = longest or 512
            return stage, case({**given, name: draw(st.one_of(st.integers(-BIG, 0), st.integers(limit, limit + BIG)))}, name)
        if name == "tiny_hidden_size":
            return stage, case({name: draw(st.integers(-BIG, 0))}, name)
        if name in ("delta", "clip_ratio_c"):
            bad = st.one_of(st.floats(-BIG, 0, exclude_max=True), st.floats(0, 1, exclude_min=True))
            return stage, case({name: draw(bad)}, name)
        return stage, case({name: draw(out_of_range(fields[name], interval(stage, name)))}, name)
    if category == "nonfinite":
        name = draw(st.sampled_from(sorted(n for n, k in fields.items() if k == "float")))
        return stage, case({name: draw(st.sampled_from([math.nan, math.inf, -math.inf]))}, name)
    if category == "type":
        name = draw(st.sampled_from(sorted(fields)))
        anywhere, yaml_only = wrong_type(fields[name], name)
        in_yaml = draw(st.booleans()) or anywhere.is_empty
        value = draw(yaml_only if in_yaml else anywhere)
        return stage, case({name: value}, name, yaml_only=in_yaml)
    if category == "typo":
        return stage, draw(typo(stage))
    if category == "choice":
        names = sorted(n for n in fields if n in CHOICES or (stage, n) in CHOICES or n == "reward_on_error")
        name = draw(st.sampled_from(names))
        if name == "reward_on_error":  # `raise` or a finite number
            return stage, case({name: draw(st.sampled_from(["", "skip", "zero", "raised", "nan", "inf", "-inf", "1e999"]))},
                               name)
        valid = CHOICES.get((stage, name), CHOICES.get(name))
        # TRL's scale_rewards true / false (any case) are valid too: group / none
        also = {"true", "false"} if name == "scale_rewards" else set()
        value = draw(st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=12)
                     .filter(lambda v: v not in valid and v.lower() not in also))
        return stage, case({name: value}, name)
    # fields that contradict each other
    options = ["max_prompt_length"]
    if "tiny_hidden_size" in fields:
        options.append("tiny")
    if stage == "ppo":
        options += ["mini_batches", "accumulation"]
    if stage in ("ppo", "grpo"):
        options.append("weights")
    which = draw(st.sampled_from(options))
    if which == "max_prompt_length":
        longest = draw(st.integers(2, 4096))
        return stage, case({"max_length": longest, "max_prompt_length": draw(st.integers(longest, longest + 100))},
                           "max_prompt_length")
    if which == "tiny":
        heads = draw(st.integers(2, 16))
        size = draw(st.integers(1, 4096).filter(lambda s: s % heads))
        return stage, case({"tiny_num_heads": heads, "tiny_hidden_size": size}, "tiny_hidden_size")
    if which == "mini_batches":
        batch = draw(st.integers(1, 64))
        minis = draw(st.integers(2, 65).filter(lambda m: batch % m))
        return stage, case({"per_device_train_batch_size": batch, "num_mini_batches": minis}, "num_mini_batches")
    if which == "accumulation":
        batch = draw(st.integers(1, 64))
        steps = draw(st.integers(2, 65).filter(lambda g: batch % g))
        return stage, case({"per_device_train_batch_size": batch, "gradient_accumulation_steps": steps},
                           "gradient_accumulation_steps")
    weights = draw(st.lists(st.floats(0, 2), min_size=2, max_size=4))  # the default is one reward function
    return stage, case({"reward_weights": weights}, "reward_weights")


# ===================================================================== running the command line in-process


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, Path]:
    """A folder for output_dirs (each test makes a fresh one), a real 2-row data file and a model folder."""
    root = tmp_path_factory.mktemp("bad_config")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"1+{i}=", "completion": str(1 + i), "chosen": "2", "rejected": "3",
                                        "answer": str(1 + i)}) + "\n" for i in range(2)))
    # only sft builds the embedded tiny model; the other stages start from a folder (never loaded here:
    # every config below is rejected before any model loads)
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    return root, data


def model_for(stage: str, root: Path) -> str:
    return "tiny" if stage == "sft" else str(root / "model")


_fresh = itertools.count()


def fresh_output_dir(root: Path) -> Path:
    out = root / f"out{next(_fresh)}"
    assert not out.exists()
    return out


def run_main(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def flag_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(flag_text(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def as_flags(fields: dict) -> list[str]:
    argv = []
    for name, value in fields.items():
        text = flag_text(value)
        # argparse reads `--seed -5` as a missing value: the `=` form keeps a leading '-' a value
        argv += [f"--{name}={text}"] if text.startswith("-") else [f"--{name}", text]
    return argv


def write_yaml(path: Path, fields: dict) -> dict[str, int]:
    """Write the fields as YAML; returns each key's line."""
    text = yaml.safe_dump(fields, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return {line.split(":", 1)[0]: number for number, line in enumerate(text.splitlines(), 1)
            if line and not line[0].isspace() and not line.startswith("- ")}


def assert_rejected(code: int, err: str, out: Path) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.startswith("posttrain: error: "), err
    assert not out.is_dir() or not any(out.iterdir()), f"{out} was written"
    return err.strip()


def base_fields(stage: str, root: Path, data: Path, out: Path) -> dict:
    teacher = {"teacher_model_name_or_path": str(root / "model")} if stage == "distill" else {}
    return {"model_name_or_path": model_for(stage, root), "dataset_name": str(data), "output_dir": str(out),
            "progress": False, **teacher}


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=bad_config(), in_yaml=st.booleans())
def test_generated_bad_configs_exit_2_with_one_line(workspace, bad, in_yaml):
    stage, spec = bad
    root, data = workspace
    out = fresh_output_dir(root)
    fields = {**base_fields(stage, root, data, out), **spec["fields"]}
    if in_yaml or spec["yaml_only"]:
        config = root / f"{out.name}.yaml"
        lines = write_yaml(config, fields)
        code, err = run_main([stage, "--config", config])
        where = f"{config}:{lines[spec['mention']]}: "  # file and line of the field
    else:
        code, err = run_main([stage, *as_flags(fields)])
        where = f"--{spec['mention']}: "
    line = assert_rejected(code, err, out)
    assert not out.exists()
    assert line.startswith(f"posttrain: error: {where}"), (line, where)
    assert repr(spec["name"]) in line or f"--{spec['name']}:" in line, line  # and the field, by name


# ===================================================================== the contract's tables


@pytest.mark.parametrize("stage", STAGES)
def test_every_numeric_field_has_a_range(stage):
    numeric = {n for n, k in kinds(stage).items() if k in ("int", "float")}
    assert numeric <= set(RANGES) | SPECIAL, numeric - set(RANGES) - SPECIAL
    assert numeric <= set(_RANGES), numeric - set(_RANGES)  # and the code checks each one


def _edge_values(spec, kind: str) -> list:
    low, low_open, high, high_open = spec
    values = []
    if low is not None:
        values.append(low + (1 if kind == "int" else 1e-9) if low_open else low)
    if high is not None:
        values.append(high - (1 if kind == "int" else 1e-9) if high_open else high)
    if high is None:
        values.append(10**6 if kind == "int" else 1e6)
    return values


@pytest.mark.parametrize("stage", STAGES)
def test_values_at_the_edges_are_accepted(stage):
    """The ranges are not stricter than the contract: each valid edge (and far inside) loads."""
    fields = kinds(stage)
    for name in sorted(set(fields) & set(RANGES)):
        for value in _edge_values(interval(stage, name), fields[name]):
            overrides = {"dataset_name": "unused.jsonl", name: flag_text(value)}
            if name in ("num_mini_batches", "gradient_accumulation_steps"):  # they must divide the batch
                overrides["per_device_train_batch_size"] = flag_text(value)
            if name == "tiny_num_heads":  # which must divide the hidden size
                overrides["tiny_hidden_size"] = flag_text(value)
            load_config(stage, None, overrides)
    for value in ("-1", "1"):
        load_config(stage, None, {"dataset_name": "d", "max_steps": value})
    load_config(stage, None, {"dataset_name": "d", "max_length": "16", "max_prompt_length": "15"})
    load_config(stage, None, {"dataset_name": "d", "max_length": "64"})  # the default max_prompt_length is capped


@pytest.mark.parametrize("stage", STAGES)
def test_the_base_config_is_valid(workspace, stage):
    """The generated configs differ from this one only in what makes them bad."""
    root, data = workspace
    fields = base_fields(stage, root, data, root / "never_written")
    cfg = load_config(stage, None, {k: flag_text(v) for k, v in fields.items()}, check_paths=True)
    assert cfg.model_name_or_path == model_for(stage, root)
    config = root / f"base_{stage}.yaml"
    write_yaml(config, fields)
    assert load_config(stage, str(config), {}, check_paths=True).dataset_name == str(data)
    assert not (root / "never_written").exists()


# ===================================================================== hand-written cases


def _reject(workspace, stage: str, *args, yaml_text: str | bytes | None = None, out: Path | None = None) -> str:
    root, data = workspace
    out = out or fresh_output_dir(root)
    argv = [stage, "--model_name_or_path", model_for(stage, root), "--dataset_name", data, "--output_dir", out, *args]
    if yaml_text is not None:
        config = root / f"{out.name}.yaml"
        config.write_bytes(yaml_text if isinstance(yaml_text, bytes) else yaml_text.encode())
        argv += ["--config", config]
    code, err = run_main(argv)
    return assert_rejected(code, err, out)


@pytest.mark.parametrize("stage,args,expected", [
    ("sft", ["--learning", "1e-3"], "--learning: unknown field for posttrain sft; did you mean --learning_rate?"),
    ("ppo", ["--cliprange_val", "0.3"], "--cliprange_val: unknown field for posttrain ppo; did you mean --cliprange_value?"),
    ("sft", ["--learnig_rate", "1e-3"], "--learnig_rate: unknown field for posttrain sft; did you mean --learning_rate?"),
    ("sft", ["--learnig_rate=1e-3"], "--learnig_rate: unknown field for posttrain sft; did you mean --learning_rate?"),
    ("dpo", ["--conf", "x.yaml"], "--conf: unknown field for posttrain dpo; did you mean --config?"),
    ("dpo", ["--kl_estimator", "k1"], "--kl_estimator: unknown field for posttrain dpo (it is a field of posttrain ppo / grpo / rloo)"),
])
def test_abbreviations_and_typos_are_rejected_with_a_suggestion(workspace, stage, args, expected):
    assert _reject(workspace, stage, *args) == f"posttrain: error: {expected}"


def test_yaml_typo_names_file_line_and_suggestion(workspace):
    line = _reject(workspace, "sft", yaml_text="# run\nlearnig_rate: 0.1\n")
    assert line.endswith(".yaml:2: unknown field 'learnig_rate' for posttrain sft; did you mean learning_rate?"), line


@pytest.mark.parametrize("stage,args,words", [
    ("grpo", ["--temperature", "0"], "--temperature: field 'temperature' must be > 0, got 0.0"),
    ("ppo", ["--temperature=-1"], "--temperature: field 'temperature' must be > 0, got -1.0"),
    ("grpo", ["--top_k=-5"], "--top_k: field 'top_k' must be >= 0, got -5"),
    ("sft", ["--lora_r", "0"], "--lora_r: field 'lora_r' must be >= 1, got 0"),
    ("ppo", ["--num_mini_batches", "0"], "--num_mini_batches: field 'num_mini_batches' must be >= 1, got 0"),
    ("rm", ["--logging_steps", "0"], "--logging_steps: field 'logging_steps' must be >= 1, got 0"),
    ("ppo", ["--max_completion_length", "0"], "--max_completion_length: field 'max_completion_length' must be >= 1, got 0"),
    ("grpo", ["--beta=-1"], "--beta: field 'beta' must be >= 0, got -1.0"),
    ("dpo", ["--beta", "0"], "--beta: field 'beta' must be > 0, got 0.0"),
    ("ppo", ["--kl_coef", "nan"], "--kl_coef: field 'kl_coef' must be a finite number, got nan"),
    ("sft", ["--learning_rate=-0.001"], "--learning_rate: field 'learning_rate' must be > 0, got -0.001"),
    ("sft", ["--max_steps", "0"], "--max_steps: field 'max_steps' must be -1 (from num_train_epochs) or >= 1, got 0"),
    ("sft", ["--seed", "true"], "--seed: field 'seed' expects int, got 'true'"),
    ("grpo", ["--reward_funcs", "5"], "--reward_funcs: field 'reward_funcs': 5 is not a reward name"),
    ("grpo", ["--reward_weights", "1,nan"], "--reward_weights: field 'reward_weights': nan is not a finite number"),
    ("grpo", ["--reward_on_error", "skip"], "--reward_on_error: field 'reward_on_error' must be `raise` or a finite number"),
    ("grpo", ["--epsilon", "1"], "--epsilon: field 'epsilon' must be in (0, 1), got 1.0"),
    ("ppo", ["--gamma", "1.5"], "--gamma: field 'gamma' must be in [0, 1], got 1.5"),
    ("sft", ["--tiny_num_heads", "3"], "--tiny_num_heads: field 'tiny_hidden_size' must be >= 1 and divisible by tiny_num_heads (3)"),
    ("sft", ["--max_length", "16", "--max_prompt_length", "16"], "--max_prompt_length: field 'max_prompt_length' must be"),
    ("sft", ["--seed"], "posttrain sft: argument --seed: expected one argument"),
])
def test_bad_flag_values(workspace, stage, args, words):
    assert words in _reject(workspace, stage, *args)


@pytest.mark.parametrize("stage,text,words", [
    ("sft", "seed: true\n", ":1: field 'seed' expects int, got True"),
    ("rm", "seed: 1.5\n", ":1: field 'seed' expects int, got 1.5"),
    ("dpo", "learning_rate: true\n", ":1: field 'learning_rate' expects float, got True"),
    ("ppo", "bf16: false\nkl_coef: .nan\n", ":2: field 'kl_coef' must be a finite number, got nan"),
    ("sft", "lr_scheduler_type: [cosine]\n", ":1: field 'lr_scheduler_type' expects str, got ['cosine']"),
    ("grpo", "reward_funcs: [exact_match, 3]\n", ":1: field 'reward_funcs': 3 is not a reward name"),
    ("ppo", "reward_weights: [1, true]\n", ":1: field 'reward_weights': True is not a finite number"),
    ("grpo", "seed: 1\nseed: 2\n", ":2: field 'seed' is given twice (first on line 1)"),
    ("dpo", "- seed\n- beta\n", ".yaml: expected a mapping of field: value, got a YAML list"),
    ("sft", "just text\n", ".yaml: expected a mapping of field: value, got a YAML str"),
    ("rm", "seed: [1, 2\n", ": invalid YAML"),
    ("grpo", b"seed: 1\nname: caf\xe9\n", ":2: the config file is not UTF-8 text (byte 0xe9)"),
])
def test_bad_yaml(workspace, stage, text, words):
    assert words in _reject(workspace, stage, yaml_text=text)


def test_reward_on_error_takes_a_yaml_number(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset_name: d.jsonl\nreward_on_error: 0\nreward_weights: [1]\n")
    cfg = load_config("grpo", str(config), {})
    assert cfg.reward_on_error == "0" and cfg.reward_weights == [1.0]


def test_output_dir_that_is_a_file(workspace):
    root, data = workspace
    target = root / "a_file"
    target.write_text("x")
    line = _reject(workspace, "sft", out=target)
    assert "--output_dir: field 'output_dir'" in line and "is a file" in line
    assert target.read_text() == "x"
    line = _reject(workspace, "sft", out=target / "below")
    assert "cannot be created" in line and "is a file" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere: permissions are not checked")
def test_read_only_output_parent(workspace):
    root, _ = workspace
    parent = root / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        line = _reject(workspace, "dpo", out=parent / "run")
    finally:
        parent.chmod(0o755)
    assert "output_dir" in line and "not writable" in line


def test_unwritable_output_parent_as_the_check_sees_it(workspace, monkeypatch):
    """The same check where the test runs as root (for whom os.access is always true): os.access says no."""
    import posttrain.config

    root, _ = workspace
    parent = root / "denied"
    parent.mkdir()
    real = os.access
    monkeypatch.setattr(posttrain.config.os, "access", lambda p, mode: Path(p) != parent and real(p, mode))
    line = _reject(workspace, "rm", out=parent / "deep" / "run")
    assert f"cannot be created ({str(parent)!r} is not writable)" in line
    line = _reject(workspace, "rm", out=parent)
    assert "output_dir" in line and "is not writable" in line


@pytest.mark.parametrize("stage,name", [("sft", "model_name_or_path"), ("dpo", "ref_model_name_or_path"),
                                        ("ppo", "reward_model_name_or_path"), ("ppo", "critic_model_name_or_path"),
                                        ("grpo", "ref_model_name_or_path")])
def test_model_folder_that_does_not_exist(workspace, stage, name):
    root, _ = workspace
    empty = root / f"no_config_{stage}_{name}"
    empty.mkdir()
    for path in (root / "no_such_model", empty):
        line = _reject(workspace, stage, f"--{name}", path)
        assert f"--{name}: field {name!r}: {str(path)!r} is not a local model folder (no config.json); " \
               "posttrain never downloads models" in line


@pytest.mark.parametrize("stage", ["rm", "dpo", "ppo", "grpo"])
def test_tiny_is_only_for_sft(workspace, stage):
    line = _reject(workspace, stage, "--model_name_or_path", "tiny")
    assert line.endswith("'tiny' is not a local model folder (no config.json); posttrain never downloads models; "
                         "only posttrain sft builds the embedded tiny model"), line


@pytest.mark.parametrize("name", ["dataset_name", "eval_dataset_name"])
def test_data_that_does_not_exist(workspace, name):
    root, _ = workspace
    line = _reject(workspace, "sft", f"--{name}", root / "missing.jsonl")
    assert f"--{name}: field {name!r}" in line and "missing.jsonl" in line and "does not exist" in line


def test_config_file_that_does_not_exist(workspace):
    root, _ = workspace
    assert "nope.yaml: config file not found" in _reject(workspace, "sft", "--config", root / "nope.yaml")


def test_no_command_and_a_bad_choice_are_one_line():
    for argv in ([], ["nope"], ["data", "nope", "--output_dir", "x"]):
        code, err = run_main(argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("posttrain: error: "), err


def test_help_still_works():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        cli.main(["grpo", "--help"])
    assert info.value.code == 0
    assert out.getvalue().startswith("usage: posttrain grpo") and "--num_generations" in out.getvalue()
