"""README.md model card of every run's output folder, and the summary printed when a run ends.

The card says what the folder holds and how it was made: base model, stage,
data, the stage's hyper-parameters, the final logged metrics, the exact
command, and code that loads it (transformers for full weights, peft for an
adapter-only folder). Its YAML front matter follows the Hugging Face Hub's
model-card metadata (library_name, base_model, tags).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import yaml

from posttrain.metrics import PLOT_KEYS

COMMON_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "num_train_epochs", "max_steps", "max_length", "max_prompt_length",
                 "max_grad_norm", "seed", "bf16")
STAGE_FIELDS = {
    "sft": ("completion_only_loss", "assistant_only_loss"),
    "rm": ("center_rewards_coefficient", "eval_split"),
    "dpo": ("beta", "loss_type", "label_smoothing", "logps_normalization", "rpo_alpha", "precompute_ref_log_probs"),
    "cpo": ("beta", "loss_type", "label_smoothing", "cpo_alpha", "simpo_gamma"),
    "orpo": ("beta",),
    "ppo": ("kl_coef", "kl_estimator", "target_kl_coef", "num_ppo_epochs", "num_mini_batches", "epsilon",
            "cliprange_value", "vf_coef", "gamma", "lam", "critic", "reward_funcs", "temperature", "max_completion_length"),
    "grpo": ("beta", "loss_type", "num_generations", "num_iterations", "epsilon", "epsilon_high", "scale_rewards",
             "reward_funcs", "temperature", "max_completion_length"),
    "rloo": ("beta", "kl_estimator", "kl_in_reward", "advantage_estimator", "loss_type", "num_generations",
             "num_iterations", "epsilon", "reward_funcs", "temperature", "max_completion_length"),
    "online_dpo": ("beta", "loss_type", "reward_funcs", "missing_eos_penalty", "temperature", "max_completion_length"),
}
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_adapter")
# bookkeeping keys of a log record that are not results
NOT_RESULTS = ("step", "epoch", "elapsed_s", "wall_s", "learning_rate")


def stage_of(cfg) -> str:
    """The stage of a config, from its class (SFTConfig -> sft, OnlineDPOConfig -> online_dpo)."""
    from posttrain.config import STAGE_CONFIGS

    return next((stage for stage, cls in STAGE_CONFIGS.items() if type(cfg) is cls),
                type(cfg).__name__.removesuffix("Config").lower())


def hyper_parameters(cfg) -> dict:
    """The config values that shaped this stage's training, in a fixed order."""
    names = COMMON_FIELDS + STAGE_FIELDS.get(stage_of(cfg), ()) + (LORA_FIELDS if cfg.use_peft else ())
    return {name: getattr(cfg, name) for name in names if hasattr(cfg, name)}


def adapter_only(cfg) -> bool:
    return bool(cfg.use_peft and not cfg.merge_adapter)


def _adapter_base(output_dir: Path) -> str:
    return json.loads((output_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def loading_code(cfg, short: bool = False) -> str:
    """Python that loads the saved model from output_dir; ``short``: the two-line form printed at the end of a run."""
    path = cfg.output_dir
    scalar = stage_of(cfg) == "rm"
    auto = "AutoModelForSequenceClassification" if scalar else "AutoModelForCausalLM"
    if adapter_only(cfg):
        labels = ", num_labels=1" if scalar else ""
        if short:
            return f"from peft import AutoPeft{auto.removeprefix('Auto')}\n" \
                   f"model = AutoPeft{auto.removeprefix('Auto')}.from_pretrained({path!r}{labels})"
        lines = ["from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", "",
                 f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
                 f"base = {auto}.from_pretrained({_adapter_base(Path(path))!r}{labels})"]
        if scalar:
            lines.append("base.config.pad_token_id = tokenizer.pad_token_id")
        lines.append(f"model = PeftModel.from_pretrained(base, {path!r})")
        return "\n".join(lines)
    if short:
        return f"from transformers import {auto}\nmodel = {auto}.from_pretrained({path!r})"
    lines = [f"from transformers import {auto}, AutoTokenizer", "",
             f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
             f"model = {auto}.from_pretrained({path!r})"]
    if scalar:
        lines.append("# reward of a text: model(**tokenizer(text, return_tensors='pt')).logits[0, 0]")
    return "\n".join(lines)


def command_line() -> str:
    """The command that started this process, shell-quoted."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "posttrain":
        argv = ["python", "-m", "posttrain", *argv[1:]]
    elif argv and Path(argv[0]).name == "posttrain":
        argv[0] = "posttrain"
    return shlex.join(argv)


def _value(value) -> str:
    return f"`{json.dumps(value)}`"


def model_card(cfg, summary: dict, title: str) -> str:
    """The README.md text of output_dir."""
    stage, out = stage_of(cfg), Path(cfg.output_dir)
    real_base = cfg.model_name_or_path != "tiny"
    meta = {"library_name": "peft" if adapter_only(cfg) else "transformers"}
    if real_base:
        meta["base_model"] = cfg.model_name_or_path
    meta["tags"] = ["posttrain", stage] + (["lora"] if cfg.use_peft else [])
    base = cfg.model_name_or_path if real_base else "the embedded tiny Qwen2 model (`tiny`)"
    if cfg.use_peft:
        holds = (f"a LoRA adapter (peft format) on `{_adapter_base(out)}`" if adapter_only(cfg) else
                 f"merged full weights; the LoRA adapter itself is in `adapter/` (base `{_adapter_base(out / 'adapter')}`)")
    else:
        holds = "full weights in Hugging Face format"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {title} (posttrain {stage})", "",
             f"Trained with `posttrain {stage}`. This folder holds {holds}.", "",
             f"- base model: {base if not real_base else f'`{base}`'}",
             f"- stage: `{stage}`",
             f"- data: `{cfg.dataset_name}`"]
    if getattr(cfg, "eval_dataset_name", ""):
        lines.append(f"- eval data: `{cfg.eval_dataset_name}`")
    lines += ["", "## Hyper-parameters", "", "| name | value |", "| --- | --- |"]
    lines += [f"| {name} | {_value(value)} |" for name, value in hyper_parameters(cfg).items()]
    final = summary.get("final") or {}
    lines += ["", "## Final metrics", "", f"At step {final.get('step', 0)} (the last logged line of metrics.jsonl); "
              f"wall time {summary.get('wall_s')} s.", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {_value(value)} |" for key, value in final.items() if key not in NOT_RESULTS]
    for key, value in (summary.get("report") or {}).items():
        lines.append(f"| report/{key} | {_value(value)} |")
    lines += ["", "## Command", "", "```bash", command_line(), "```", "",
              "## Loading", "", "```python", loading_code(cfg), "```", "", _posttrain_use(stage, cfg.output_dir), ""]
    return "\n".join(lines)


def _posttrain_use(stage: str, output_dir: str) -> str:
    path = shlex.quote(output_dir)
    if stage == "rm":
        return f"With posttrain: `posttrain ppo --reward_model_name_or_path {path}` (or grpo)."
    return f"With posttrain: `posttrain generate --model_name_or_path {path} --prompt TEXT`, or `--model_name_or_path {path}` for the next stage."


def write_model_card(cfg, summary: dict, title: str) -> Path:
    path = Path(cfg.output_dir) / "README.md"
    path.write_text(model_card(cfg, summary, title), encoding="utf-8")
    return path


def run_summary(cfg, summary: dict) -> str:
    """A few lines for stdout once the progress bar is gone: results, where the model is, how to load it."""
    final = summary.get("final") or {}
    shown = [f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and k not in NOT_RESULTS and (k in PLOT_KEYS or k.startswith("eval/"))]
    out = cfg.output_dir
    if cfg.use_peft:
        holds = "LoRA adapter" if adapter_only(cfg) else f"merged weights; LoRA adapter in {Path(out) / 'adapter'}"
    else:
        holds = "full weights"
    code = "\n".join("    " + line for line in loading_code(cfg, short=True).splitlines())
    return (f"posttrain {stage_of(cfg)}: done, {final.get('step', 0)} steps in {summary.get('wall_s')} s"
            + (f"; {', '.join(shown)}" if shown else "") + "\n"
            f"  saved to {out} ({holds}); model card {Path(out) / 'README.md'}\n"
            f"  load it:\n{code}")
