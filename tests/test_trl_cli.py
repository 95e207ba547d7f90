"""TRL command lines work with posttrain: TRL's names as aliases, its unsupported flags as one-line errors
(or notices where they change nothing), and the command lines of TRL's own documentation run one step."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from posttrain import cli, config, training
from posttrain.config import STAGE_CONFIGS, TRL_ALIASES, TRL_UNSUPPORTED, load_config
from posttrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def parse(stage: str, *argv: str):
    """A stage's config from a command line, without running it (and without checking paths)."""
    args, extras = cli.build_parser().parse_known_args([stage, *argv])
    assert not extras, extras
    config_file, overrides = cli._split_stage_args(args)
    return load_config("rm" if stage == "reward" else stage, config_file, overrides)


def has_field(stage: str, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(STAGE_CONFIGS[stage])}


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# ===================================================================== TRL's documented command lines

# flags of other posttrain branches (eval, packing): kept where this posttrain has the field
LATER = {"sft": [("eval_strategy", "steps"), ("eval_steps", "100")], "dpo": [("eval_strategy", "steps"), ("eval_steps", "50")],
         "reward": [("eval_strategy", "steps"), ("eval_steps", "50")]}


def later_flags(stage: str) -> list[str]:
    target = "rm" if stage == "reward" else stage
    return [arg for name, value in LATER.get(stage, []) if has_field(target, name) for arg in (f"--{name}", value)]


def doc_command(stage: str, model: Path, data: dict, out: Path) -> list[str]:
    """trl/scripts/{sft,dpo,reward,grpo}.py's command lines (and TRL's PPO example), with local paths, max_steps 1,
    and the flags posttrain refuses replaced as its error message says (see test_refused_doc_flags_say_what_to_use)."""
    if stage == "sft":  # --packing -> padding_free (packing branch); --push_to_hub -> upload output_dir yourself
        return ["sft", "--model_name_or_path", model, "--dataset_name", data["sft"], "--learning_rate", "2.0e-5",
                "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8",
                "--gradient_checkpointing", "--eos_token", "<|im_end|>", "--use_peft", "--lora_r", "32", "--lora_alpha", "16",
                "--output_dir", out, "--max_steps", "1", *later_flags("sft")]
    if stage == "dpo":
        return ["dpo", "--dataset_name", data["preference"], "--model_name_or_path", model, "--learning_rate", "5.0e-7",
                "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--max_steps", "1000",
                "--gradient_accumulation_steps", "8", "--output_dir", out, "--no_remove_unused_columns",
                "--use_peft", "--lora_r", "32", "--lora_alpha", "16", "--max_steps", "1", *later_flags("dpo")]
    if stage == "reward":
        return ["reward", "--model_name_or_path", model, "--dataset_name", data["preference"], "--output_dir", out,
                "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--gradient_accumulation_steps", "1",
                "--remove_unused_columns", "False", "--gradient_checkpointing", "True", "--learning_rate", "1.0e-5",
                "--logging_steps", "25", "--max_length", "2048", "--max_steps", "1", *later_flags("reward")]
    if stage == "grpo":  # --use_vllm -> rollout_engine module:factory (the default hf engine here)
        return ["grpo", "--model_name_or_path", model, "--dataset_name", data["prompts"], "--reward_funcs", "accuracy_reward",
                "--output_dir", out, "--per_device_train_batch_size", "2", "--num_generations", "2",
                "--max_completion_length", "4", "--learning_rate", "1e-6", "--logging_steps", "1", "--scale_rewards", "false",
                "--top_p", "0.95", "--log_completions", "--max_steps", "1"]
    # TRL's PPO example: --total_episodes -> max_steps
    return ["ppo", "--dataset_name", data["prompts"], "--learning_rate", "3e-6", "--output_dir", out,
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--model_name_or_path", model,
            "--sft_model_path", model, "--missing_eos_penalty", "1.0", "--reward_funcs", "exact_match",
            "--response_length", "4", "--cliprange", "0.3", "--whiten_rewards", "--stop_token", "eos",
            "--num_ppo_epochs", "1", "--max_steps", "1"]


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward", "grpo", "ppo"])
def test_trl_doc_command_lines_run_one_step(stage, tiny_qwen, arith_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(doc_command(stage, tiny_qwen, arith_data, out) + ["--progress", "false"], capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    [line] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 1 and math.isfinite(line["loss"])
    saved = (out / "config.yaml").read_text()
    if stage == "reward":  # `posttrain reward` is posttrain rm: a scalar head was trained
        assert "SequenceClassification" in (out / "config.json").read_text()
        assert "remove_unused_columns is ignored" in err
    if stage == "dpo":
        assert "remove_unused_columns is ignored" in err
    if stage == "ppo":
        assert "epsilon: 0.3" in saved and "cliprange_value: 0.2" in saved and "max_completion_length: 4" in saved
        assert "whiten_rewards: true" in saved
    if stage == "grpo":
        assert "scale_rewards: none" in saved and "top_p: 0.95" in saved
        rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
        assert len(rows) == 2 * 2 and {r["step"] for r in rows} == {1}
        assert all(set(r) == {"step", "prompt", "completion", "reward"} and r["reward"] in (0.0, 1.0) for r in rows)


@pytest.mark.parametrize("stage,flag,value,instead", [
    ("sft", "packing", None, "padding_free"),
    ("sft", "push_to_hub", None, "upload output_dir yourself"),
    ("grpo", "use_vllm", None, "rollout_engine module:factory"),
    ("ppo", "total_episodes", "10000", "max_steps"),
    ("sft", "fp16", None, "bf16"),
])
def test_refused_doc_flags_say_what_to_use(stage, flag, value, instead, capsys):
    code, err = run([stage, "--dataset_name", "d.jsonl", f"--{flag}", *([value] if value else [])], capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(f"posttrain: error: --{flag}: posttrain {stage} does not support {flag}") and instead in line


# ===================================================================== aliases

@pytest.mark.parametrize("stage,argv,field,value", [
    ("ppo", ["--cliprange", "0.3"], "epsilon", 0.3),
    ("ppo", ["--response_length", "7"], "max_completion_length", 7),
    ("ppo", ["--sft_model_path", "m"], "model_name_or_path", "m"),
    ("ppo", ["--reward_model_path", "r"], "reward_model_name_or_path", "r"),
    ("ppo", ["--exp_name", "run7"], "run_name", "run7"),
    ("sft", ["--torch_dtype", "bfloat16"], "dtype", "bfloat16"),
    ("sft", ["--disable_tqdm"], "progress", False),
    ("sft", ["--disable_tqdm", "false"], "progress", True),
    ("sft", ["--activation_checkpointing"], "gradient_checkpointing", True),
    ("sft", ["--no_gradient_checkpointing"], "gradient_checkpointing", False),
    ("dpo", ["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'], "min_lr_rate", 0.1),
    ("dpo", ["--lr_scheduler_type", "constant_with_warmup"], "lr_scheduler_type", "constant"),
    ("sft", ["--fsdp", "full_shard auto_wrap"], "fsdp", True),
    ("grpo", ["--scale_rewards", "true"], "scale_rewards", "group"),
    ("grpo", ["--scale_rewards", "false"], "scale_rewards", "none"),
    ("grpo", ["--scale_rewards", "batch"], "scale_rewards", "batch"),
    ("reward", ["--max_length", "100"], "max_length", 100),
])
def test_alias_sets_its_field(stage, argv, field, value):
    cfg = parse(stage, "--dataset_name", "d.jsonl", *argv)
    assert getattr(cfg, field) == value
    if argv[0] == "--cliprange":  # the policy clip, not the value clip
        assert cfg.cliprange_value == 0.2


def test_yaml_keys_take_the_same_aliases(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("dataset_name: d.jsonl\ncliprange: 0.25\nresponse_length: 9\nwhiten_rewards: true\n")
    cfg = load_config("ppo", str(path), {})
    assert (cfg.epsilon, cfg.max_completion_length, cfg.whiten_rewards) == (0.25, 9, True)
    path.write_text("dataset_name: d.jsonl\nscale_rewards: false\n")
    assert load_config("grpo", str(path), {}).scale_rewards == "none"
    path.write_text("dataset_name: d.jsonl\npush_to_hub: true\n")
    with pytest.raises(UserError, match=r"ppo\.yaml:2: posttrain grpo does not support push_to_hub"):
        load_config("grpo", str(path), {})


def test_alias_and_its_field_together_are_an_error():
    with pytest.raises(UserError, match=r"^--epsilon: epsilon and cliprange both set posttrain's epsilon, to different values"):
        parse("ppo", "--dataset_name", "d.jsonl", "--cliprange", "0.3", "--epsilon", "0.2")


def test_alias_of_another_stage_is_unknown_with_a_hint(capsys):
    code, err = run(["grpo", "--dataset_name", "d.jsonl", "--cliprange", "0.3"], capsys)
    assert code == 2 and "TRL's cliprange is posttrain ppo's epsilon" in err


def test_aliases_are_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    assert "(TRL: --cliprange)" in " ".join(capsys.readouterr().out.split())


# ===================================================================== unsupported flags

def test_every_unsupported_name_is_refused_or_noticed():
    """Table-driven: a value posttrain does not behave as is an error naming the flag; a listed (or any, for
    harmless flags) value is a notice."""
    for name, (accepted, instead) in TRL_UNSUPPORTED.items():
        stage = next(s for s in STAGE_CONFIGS if not has_field(s, name))
        if accepted is config.ANY:
            load_config(stage, None, {"dataset_name": "d.jsonl", name: "x"})
            continue
        with pytest.raises(UserError, match=rf"^--{name}: posttrain {stage} does not support {name}"):
            load_config(stage, None, {"dataset_name": "d.jsonl", name: "not-a-posttrain-value"})
        for value in accepted:
            load_config(stage, None, {"dataset_name": "d.jsonl", name: str(value)})


@pytest.mark.parametrize("argv", [
    ["--push_to_hub"], ["--hub_model_id", "me/model"], ["--use_vllm"], ["--vllm_mode", "server"], ["--fp16"],
    ["--tf32", "true"], ["--neftune_noise_alpha", "5"], ["--deepspeed", "ds.json"], ["--use_liger_kernel"], ["--packing"],
    ["--optim", "adafactor"], ["--torch_compile"], ["--load_in_4bit"], ["--load_in_8bit"],
    ["--dataset_streaming"], ["--logging_first_step"], ["--trust_remote_code"], ["--adam_beta2", "0.95"],
    ["--logging_strategy", "epoch"], ["--use_cpu"],
], ids=lambda argv: argv[0])
def test_unsupported_flag_is_one_line_exit_2(argv, capsys):
    code, err = run(["grpo", "--dataset_name", "d.jsonl", *argv], capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    name = argv[0][2:]
    assert line.startswith(f"posttrain: error: --{name}: posttrain grpo does not support {name}")
    assert "unrecognized" not in line


@pytest.mark.parametrize("stage,argv,words", [
    ("grpo", ["--repetition_penalty", "1.1"], "scored softmax"),
    ("ppo", ["--stop_token", "none"], "eos"),
    ("grpo", ["--save_strategy", "epoch"], "sft, rm and dpo"),
    ("sft", ["--fsdp", "shard_grad_op"], "full sharding"),
    ("sft", ["--lr_scheduler_kwargs", '{"num_cycles": 2}'], "only min_lr_rate"),
    ("sft", ["--lr_scheduler_kwargs", '{"min_lr": 1e-6}'], "min_lr / learning_rate"),
    ("sft", ["--dtype", "float16"], "float32, bfloat16, auto"),
])
def test_values_posttrain_cannot_honour_are_refused(stage, argv, words, capsys):
    code, err = run([stage, "--dataset_name", "d.jsonl", *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_harmless_flags_are_accepted_with_one_notice_each(capsys):
    cfg = parse("sft", "--dataset_name", "d.jsonl", "--do_train", "--logging_strategy", "steps",
                "--dataloader_num_workers", "4", "--no_remove_unused_columns", "--fp16", "false", "--seed", "3")
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 5 and all(n.startswith("posttrain: note: --") for n in notes)
    assert cfg.seed == 3 and cfg.bf16 is False


def test_every_trl_and_transformers_field_is_handled():
    """Systematic: each field of TrainingArguments and of TRL's SFT / DPO / reward / GRPO / RLOO / GKD configs, model and
    script arguments is a posttrain field, an alias, in TRL_UNSUPPORTED, or a field another branch adds."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    later = {"eval_strategy", "eval_steps", "dataset_train_split", "dataset_test_split", "report_to", "lora_dropout",
             "merge_adapter", "padding_free"}
    ours = {f.name for cls in STAGE_CONFIGS.values() for f in dataclasses.fields(cls)}
    theirs = set()
    from trl.experimental.gkd import GKDConfig  # posttrain distill
    from trl.experimental.online_dpo import OnlineDPOConfig

    for cls in (transformers.TrainingArguments, trl.SFTConfig, trl.DPOConfig, trl.RewardConfig, trl.GRPOConfig, trl.RLOOConfig,
                OnlineDPOConfig, GKDConfig, trl.ModelConfig, trl.ScriptArguments):
        theirs |= {f.name for f in dataclasses.fields(cls)}
    for stage in ("cpo", "orpo"):  # TRL 1.16 keeps them under trl.experimental
        theirs |= {f.name for f in dataclasses.fields(getattr(pytest.importorskip(f"trl.experimental.{stage}"),
                                                               f"{stage.upper()}Config"))}
    missing = theirs - ours - set(TRL_ALIASES) - set(TRL_UNSUPPORTED) - later
    assert not missing, sorted(missing)


# ===================================================================== rewards

def test_trl_reward_names_and_dotted_paths_resolve():
    import user_rewards

    from posttrain.rewards import resolve_reward_func

    accuracy = resolve_reward_func("accuracy_reward")
    assert accuracy(["q"] * 3, [" 12", "7", "x"], solution=["12", None, "y"], answer=[None, "7", "x"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="row 2"):
        accuracy(["q"] * 2, ["1", "2"], answer=["1", None])
    think = resolve_reward_func("think_format_reward")
    assert think([""] * 4, ["<think>a</think>b", "x<think>a</think>", "<think>a<think>b</think>", "<think>open"]) == \
        [1.0, 0.0, 0.0, 0.0]
    assert resolve_reward_func("user_rewards.length") is user_rewards.length
    assert resolve_reward_func("user_rewards:length") is user_rewards.length


# ===================================================================== schedules

def lrs(stage_argv: list[str], steps: int) -> list[float]:
    from posttrain.optim import build_optimizer, scheduler_for

    cfg = parse("sft", "--dataset_name", "d.jsonl", "--learning_rate", "1e-3", *stage_argv)
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = build_optimizer([("w", weight)], cfg.learning_rate, 0.0)
    scheduler = scheduler_for(cfg, optimizer, steps)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_steps_and_cosine_with_min_lr_by_hand():
    # 10 steps, 2 of warm-up ((s+1)/3), then cosine from 1e-3 down to 0.1 x 1e-3 over the 8 others
    got = lrs(["--warmup_steps", "2", "--lr_scheduler_type", "cosine_with_min_lr",
               "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'], 10)
    cosine = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    want = [1e-3 / 3, 2e-3 / 3] + [1e-3 * (0.1 + 0.9 * c) for c in cosine]
    assert got == pytest.approx(want, rel=1e-9)
    assert got[6] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way through the decay
    # warmup_steps overrides warmup_ratio; a fraction below 1 is a share of the total steps (ceil(0.25 x 10) = 3)
    assert lrs(["--warmup_steps", "2", "--warmup_ratio", "0.5", "--lr_scheduler_type", "constant"], 4) == \
        pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    assert lrs(["--warmup_steps", "0.25", "--lr_scheduler_type", "constant"], 10)[:4] == \
        pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])
    # min_lr_rate floors a linear decay too: 0.5 + 0.5 x (1 - k/4)
    assert lrs(["--lr_scheduler_type", "linear", "--min_lr_rate", "0.5"], 4) == pytest.approx([1e-3, 0.875e-3, 0.75e-3, 0.625e-3])


def test_logged_learning_rates_follow_the_schedule(tiny_qwen, arith_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(["sft", "--model_name_or_path", tiny_qwen, "--dataset_name", arith_data["sft"], "--output_dir", out,
                     "--max_steps", "4", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
                     "--warmup_steps", "2", "--lr_scheduler_type", "cosine_with_min_lr", "--min_lr_rate", "0.1",
                     "--run_name", "lr-check", "--progress", "false"], capsys)
    assert code == 0, err
    logged = [json.loads(x)["learning_rate"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    # after optimizer step s the schedule stands at step s: 2/3, then the decay at progress 0, 1/2, 1
    assert logged == pytest.approx([2e-3 / 3, 1e-3, 1e-3 * (0.1 + 0.9 * 0.5), 1e-4])
    assert json.loads((out / "summary.json").read_text())["run_name"] == "lr-check"
    assert "run_name: lr-check" in (out / "config.yaml").read_text()


def test_save_strategy_epoch_and_no(tiny_qwen, tmp_path, capsys):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(4)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["sft", "--model_name_or_path", tiny_qwen, "--dataset_name", data, "--per_device_train_batch_size", "2",
              "--num_train_epochs", "3", "--progress", "false"]
    code, err = run([*common, "--output_dir", tmp_path / "epoch", "--save_strategy", "epoch", "--save_total_limit", "5"], capsys)
    assert code == 0, err  # 2 steps an epoch: checkpoints at the ends of epochs 1 and 2, the final model after 3
    assert sorted(p.name for p in (tmp_path / "epoch").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    code, err = run([*common, "--output_dir", tmp_path / "no", "--save_strategy", "no", "--save_steps", "1"], capsys)
    assert code == 0, err
    assert not list((tmp_path / "no").glob("checkpoint-*")) and (tmp_path / "no" / "model.safetensors").is_file()


# ===================================================================== PPO's whiten_rewards

def test_whiten_rewards_scales_token_rewards_as_whiten_does():
    from posttrain.losses import whiten
    from posttrain.recipes.ppo import shape_rewards

    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    plain = shape_rewards(scores, kl, mask, kl_coef=0.5)
    assert plain.flatten().tolist() == pytest.approx([-0.05, -0.1 + 1.0, 0.0, -0.15 - 2.0, 0.0, 0.0])
    values = [-0.05, 0.9, -2.15]  # the masked token rewards, by hand: unit variance, mean kept
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2 + 1e-8)
    want = [(v - mean) / std + mean for v in values]
    whitened = shape_rewards(scores, kl, mask, kl_coef=0.5, whiten_rewards=True)
    assert [whitened[0, 0], whitened[0, 1], whitened[1, 0]] == pytest.approx(want, rel=1e-5)
    assert whitened[0, 2] == 0 and whitened[1, 1] == 0 and whitened[1, 2] == 0
    assert torch.allclose(whitened, whiten(plain, mask, shift_mean=False))


# ===================================================================== models and sampling

def test_dtype_and_attn_implementation_at_load(tiny_qwen):
    from posttrain.models import load_causal_lm, load_scalar_model

    assert {p.dtype for p in load_causal_lm(str(tiny_qwen), dtype="bfloat16").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_causal_lm(str(tiny_qwen), dtype="auto").parameters()} == {torch.float32}  # as saved
    model = load_scalar_model(str(tiny_qwen), "model_name_or_path", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(UserError, match="^attn_implementation: flash_attention_2 needs a CUDA GPU"):
        load_causal_lm(str(tiny_qwen), attn_implementation="flash_attention_2")


def test_eos_token_must_be_in_the_vocabulary(tiny_qwen):
    from posttrain.data import encode_response
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_qwen), eos_token="<|im_start|>")
    assert tokenizer.eos_token == "<|im_start|>"
    assert encode_response(tokenizer, "1+1=", "2")[-1] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(UserError, match="eos_token: '<nope>' is not a token"):
        load_tokenizer(str(tiny_qwen), eos_token="<nope>")


def test_dpo_max_completion_length_truncates_each_response():
    from posttrain.data import truncate_pair

    chosen, rejected = truncate_pair([1, 2, 3], [4, 5, 6, 7], [8, 9], max_length=100, max_prompt_length=50,
                                     max_completion_length=3)
    assert (chosen.prompt_ids, chosen.completion_ids, rejected.completion_ids) == ([1, 2, 3], [4, 5, 6], [8, 9])
    assert parse("dpo", "--dataset_name", "d.jsonl").max_completion_length == 0  # off unless asked for


def test_top_p_and_min_p_reach_sampling(tiny_qwen):
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.rollout import generate, sampling_config

    config = sampling_config(4, 1.0, False, 0, 1, 0, 1, top_p=0.9, min_p=0.05)
    assert (config.top_p, config.min_p) == (0.9, 0.05)
    assert sampling_config(4, 1.0, False, 0, 1, 0, 1).min_p is None
    tokenizer = load_tokenizer(str(tiny_qwen))
    model = load_causal_lm(str(tiny_qwen), trainable=False)
    prompts = [tokenizer("12+34=")["input_ids"], tokenizer("7+8=")["input_ids"]]
    greedy = generate(model, tokenizer, prompts, 6, greedy=True).completions
    torch.manual_seed(0)
    # a nucleus this small keeps only the top token, and min_p 1 only tokens as likely as it: both are greedy
    assert generate(model, tokenizer, prompts, 6, top_p=1e-6).completions == greedy
    assert generate(model, tokenizer, prompts, 6, min_p=1.0).completions == greedy


# ===================================================================== item 7: templates and bf16

def test_template_that_raises_is_one_line_naming_file_and_line(model_families, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="},
                          {"role": "assistant", "content": "3"}]}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = run(["sft", "--model_name_or_path", model_families["mistral"], "--dataset_name", data,
                     "--output_dir", tmp_path / "out", "--max_steps", "1"], capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert re.match(rf"posttrain: error: {re.escape(str(data))}:2: the chat template rejects these messages: "
                    r"Conversation roles must alternate", line), line


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx2", "fma"})
    training.warn_slow_cpu_bf16.cache_clear()
    for _ in range(2):
        with training.autocast(True):
            pass
    with training.autocast(False):
        pass
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("posttrain: warning: bf16 autocast on this CPU") and "slower than fp32" in line
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    training.warn_slow_cpu_bf16.cache_clear()
    with training.autocast(True):
        pass
    assert capsys.readouterr().err == ""
    training.warn_slow_cpu_bf16.cache_clear()


def test_cpu_flags_reads_this_machine():
    flags = training.cpu_flags()
    assert isinstance(flags, set) and (not Path("/proc/cpuinfo").exists() or flags)


# ===================================================================== item 10: help texts

# "seed" only as the random seed: never source documents ("seed format", "seed documents")
FORBIDDEN = [r"background document", r"\bseed[- ](document|format|file|example|data)s?\b", r"\btutorial", r"\bAI\b",
             r"\bAI assistant\b", r"\bLLM-generated\b"]


def help_texts(capsys) -> dict[str, str]:
    texts = {}
    for command in ["", *cli.STAGES, "reward", "generate", "eval", "data", "demo", "report"]:
        with pytest.raises(SystemExit) as stop:
            cli.main([command, "--help"] if command else ["--help"])
        assert stop.value.code == 0
        texts[command or "posttrain"] = capsys.readouterr().out
    return texts


def test_help_and_docstrings_name_no_forbidden_words_or_missing_files(capsys):
    files = [*sorted((REPO / "posttrain").rglob("*.py")), *sorted((REPO / "configs").glob("*.yaml")), REPO / "README.md"]
    sources = {str(p.relative_to(REPO)): p.read_text() for p in files}
    for where, text in {**help_texts(capsys), **sources}.items():
        for pattern in FORBIDDEN:
            assert not re.search(pattern, text, re.IGNORECASE), (where, pattern)
        for path in re.findall(r"\b((?:docs|configs|benchmarks|tests)/[\w./-]+\.(?:md|yaml|py))", text):
            assert (REPO / path).exists(), (where, path)


def test_every_command_has_a_description():
    commands = cli.build_parser().commands
    for name in ("generate", "eval", "data", "demo", "report", *cli.STAGES):
        assert commands[name].description and len(commands[name].description) > 20, name


def test_demo_takes_num_threads():
    import inspect

    from posttrain.demo import run_demo

    args = cli.build_parser().parse_args(["demo", "--quick", "--num_threads", "2"])
    assert args.num_threads == 2
    assert "num_threads" in inspect.signature(run_demo).parameters
