"""One config dataclass per stage; YAML supplies values and flags override YAML.

Each field is documented once, by the string literal directly under it; that
string is the ``--help`` text (read with ``ast``, so it is never duplicated).
Derived values (global batch, total steps) are computed in ``derived()``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.errors import UserError


@dataclass
class CommonConfig:
    model_name_or_path: str = "tiny"
    """Local Hugging Face model folder, or `tiny` to build the embedded tiny Qwen2 model."""
    dataset_name: str = ""
    """Training data: a local .jsonl, .jsonl.gz, .json, .parquet or .csv file, a folder holding one, a datasets
    save_to_disk folder, or a hub snapshot folder with files named by split (data/train-00000-of-00003.parquet)."""
    dataset_train_split: str = "train"
    """The split of dataset_name to train on, when it is a DatasetDict or hub snapshot folder."""
    dataset_test_split: str = "test"
    """The split evaluated: of eval_dataset_name, or of dataset_name when eval_dataset_name is empty and it has one."""
    eval_strategy: str = "steps"
    """When held-out data is evaluated: steps (every eval_steps) | epoch (at each epoch's end) | no; eval/... keys in metrics.jsonl."""
    eval_steps: int = 0
    """Evaluate every this many optimizer steps with eval_strategy steps (0: every logging_steps), and at the last step."""
    output_dir: str = "runs/out"
    """Where the config, metrics, plots, checkpoints and final model are written."""
    seed: int = 42
    """Seed for initialisation, data order and sampling."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    lr_scheduler_type: str = "cosine"
    """Learning-rate schedule after warm-up: cosine | linear | constant."""
    warmup_ratio: float = 0.0
    """Fraction of the total steps spent warming the learning rate up from 0."""
    per_device_train_batch_size: int = 8
    """Rows per micro-batch on each process (pairs for rm/dpo, prompts for ppo/grpo)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    num_train_epochs: float = 1.0
    """Passes over the dataset (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means derive from num_train_epochs."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    max_length: int = 512
    """Longest prompt + completion in tokens; longer rows are truncated (see README, Truncation)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens; longer prompts keep their last tokens."""
    group_by_length: bool = False
    """Batch rows of similar length together: less padding, but each batch is a biased sample."""
    logging_steps: int = 10
    """Write a line to metrics.jsonl every this many optimizer steps."""
    save_steps: int = 0
    """Save a resumable checkpoint-STEP/ every this many steps (0: only the final model)."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints (oldest deleted first)."""
    resume_from_checkpoint: str = ""
    """A checkpoint-STEP folder, or `latest` for the newest one in output_dir."""
    overwrite_output_dir: bool = False
    """Allow an output_dir that holds another run's checkpoints or final model (they are replaced)."""
    max_nonfinite_steps: int = 10
    """Stop after this many optimizer steps in a row with a non-finite loss or gradient (each is skipped)."""
    allow_pickle: bool = False
    """Load model folders whose weights are pickle files (pytorch_model.bin); only for folders you trust."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower on tiny models)."""
    bf16: bool = False
    """Run forward and backward under bfloat16 autocast (weights and optimizer stay fp32)."""
    use_peft: bool = False
    """Train LoRA adapters instead of all weights (the reference is the base with adapters off); a reward model
    trains its adapters and its `score` head, a separate PPO critic every weight."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names to adapt, or `all-linear`."""
    lora_dropout: float = 0.0
    """Dropout on the input of each LoRA branch (off anyway where disable_dropout is true)."""
    merge_adapter: bool = True
    """With use_peft: true writes merged full weights to output_dir and the peft adapter to output_dir/adapter/;
    false writes only the adapter (adapter_config.json, adapter_model.safetensors) to output_dir."""
    fsdp: bool = False
    """Under torchrun, shard weights, gradients and optimizer state with FSDP2 (per decoder layer) instead of DDP."""
    chat_template_path: str = ""
    """A Jinja chat template file to use instead of (or where there is no) the tokenizer's own."""
    num_threads: int = 0
    """torch CPU threads (0: leave torch's default)."""
    progress: bool = True
    """Show a progress bar."""
    report_to: list = field(default_factory=lambda: ["none"])
    """Where metrics go besides metrics.jsonl (always written): none | jsonl | tensorboard (output_dir/runs/) | wandb."""


@dataclass
class TinyModelConfig:
    tiny_hidden_size: int = 128
    """Hidden size of the embedded tiny Qwen2 model (model_name_or_path: tiny)."""
    tiny_num_layers: int = 3
    """Decoder layers of the embedded tiny model."""
    tiny_num_heads: int = 4
    """Attention heads of the embedded tiny model."""
    tiny_intermediate_size: int = 512
    """MLP width of the embedded tiny model."""


@dataclass
class DropoutConfig:
    disable_dropout: bool = True
    """Switch the trained model's dropout off, so every log-prob (or score) of a sample is one deterministic function."""


@dataclass
class PaddingFreeConfig:
    padding_free: bool = False
    """Pack each micro-batch's rows into one sequence with no padding (positions restart at 0 on each row and
    attention stays within it): no compute on pad tokens, and no pad token needed. A model whose attention
    mixes packed rows is refused at start-up."""


@dataclass
class SFTConfig(PaddingFreeConfig, TinyModelConfig, CommonConfig):
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""
    completion_only_loss: bool = True
    """Compute the loss on completion / assistant tokens only (False: on every token)."""
    eval_dataset_name: str = ""
    """Held-out SFT rows (loss and perplexity), and prompts with `answer` fields (greedy exact-match accuracy)."""
    eval_max_rows: int = 256
    """Rows of the held-out data evaluated."""


@dataclass
class DPOConfig(PaddingFreeConfig, DropoutConfig, CommonConfig):
    eval_dataset_name: str = ""
    """Held-out preference pairs: eval loss, rewards/accuracies and rewards/margins."""
    ref_model_name_or_path: str = ""
    """Frozen reference model; empty means the starting policy (model_name_or_path)."""
    beta: float = 0.1
    """Inverse temperature β of the implicit reward β·log(π/π_ref); higher stays closer to the reference."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) | ipo (IPO) | hinge (SLiC)."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped (conservative DPO); sigmoid only."""
    logps_normalization: str = ""
    """sum: log π(y|x), the standard DPO. mean: per-token average (length-normalised).
    Empty: mean for ipo (its target 1/(2β) assumes averaged log-ratios), sum otherwise."""
    precompute_ref_log_probs: bool = False
    """Score the whole dataset with the reference once before training, then release the reference model."""
    rpo_alpha: float = 0.0
    """Weight of the length-normalised NLL of the chosen response added to the loss (RPO); guards against falling chosen log-probs."""


@dataclass
class RMConfig(PaddingFreeConfig, DropoutConfig, CommonConfig):
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    center_rewards_coefficient: float = 0.0
    """Weight of the (r_chosen + r_rejected)² penalty that keeps rewards centred at 0."""
    eval_dataset_name: str = ""
    """Held-out preference pairs; empty means dataset_name's dataset_test_split, else eval_split of the training pairs."""
    eval_split: float = 0.05
    """Fraction of the training pairs held out when there is no eval_dataset_name or test split."""


@dataclass
class RewardConfig:
    reward_funcs: list = field(default_factory=lambda: ["exact_match"])
    """Rule rewards: built-ins exact_match, think_format, or `module:function` of your own."""
    reward_weights: list = field(default_factory=list)
    """Weight per reward source (funcs first, then the reward model); empty means all 1."""
    reward_model_name_or_path: str = ""
    """A trained reward model folder, added to the reward sources (scored on prompt + completion)."""
    reward_clip: float = 3.0
    """Clip the summed sequence reward to [-reward_clip, reward_clip] (0 disables)."""
    reward_on_error: str = "raise"
    """A reward function that fails or returns a non-number for a row: `raise`, or a number to score that row with."""
    reward_timeout_s: float = 0.0
    """Report a reward function or model that takes longer than this many seconds per batch (0: no limit)."""


@dataclass
class RolloutConfig:
    max_completion_length: int = 64
    """Most new tokens sampled per completion."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    top_k: int = 0
    """Sample from the top-k tokens only (0: all)."""
    rollout_engine: str = "hf"
    """What samples completions: `hf` (transformers generate with the KV cache), or `module:factory` of your own."""
    generation_cache: str = "dynamic"
    """KV cache of `hf` rollouts: dynamic (grows per token; a group's prompt is prefilled once), or static
    (preallocated, with the forward compiled by torch.compile; CUDA only)."""
    eval_dataset_name: str = ""
    """Held-out prompts: mean reward of greedy completions (and exact-match accuracy where rows have `answer`)."""
    eval_max_rows: int = 256
    """Rows of the held-out prompts evaluated."""


@dataclass
class PPOConfig(DropoutConfig, RolloutConfig, RewardConfig, CommonConfig):
    learning_rate: float = 3e-6
    """Peak learning rate of AdamW (actor and critic)."""
    critic_learning_rate: float = 0.0
    """Learning rate of a separate critic (0: same as learning_rate)."""
    critic: str = "separate"
    """separate: a critic model of its own; shared: a value head on the actor's trunk (one model copy fewer)."""
    ref_model_name_or_path: str = ""
    """Frozen reference for the KL penalty; empty means the starting policy."""
    critic_model_name_or_path: str = ""
    """Initialise a separate critic from here; empty: the reward model if given, else the policy."""
    kl_coef: float = 0.05
    """Coefficient of the per-token KL penalty in the reward."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 | k2 | k3."""
    target_kl_coef: float = 0.0
    """Adaptive KL controller target (Ziegler et al.): move kl_coef so the KL per sequence nears this; 0 disables."""
    kl_horizon: int = 10000
    """Horizon of the adaptive KL controller, in samples."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    whiten_advantages: bool = True
    """Whiten advantages over each rollout batch."""
    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Mini-batches per pass over a rollout batch."""
    epsilon: float = 0.2
    """Clip range of the policy ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value update (0 disables)."""
    vf_coef: float = 0.1
    """Weight of the value loss (with a shared critic, the scale at which it reaches the trunk)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    target_kl: float = 0.0
    """Stop a rollout batch's epochs early once approx KL exceeds this (0 disables)."""
    missing_eos_penalty: float = 0.0
    """Subtract this from the score of completions that hit max_completion_length without EOS."""


@dataclass
class GRPOConfig(DropoutConfig, RolloutConfig, RewardConfig, CommonConfig):
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW."""
    ref_model_name_or_path: str = ""
    """Frozen reference for the KL term; empty means the starting policy. Not loaded when beta is 0."""
    num_generations: int = 8
    """Completions sampled per prompt (the group size G)."""
    beta: float = 0.04
    """Weight of the k3 KL term to the reference (0: no reference model is loaded)."""
    use_bias_correction_kl: bool = False
    """Weight k3 by the ratio π/π_old: the same KL value, but the unbiased gradient of KL(π||π_ref)
    (DeepSeek-V3.2). False: differentiate k3 as in the GRPO paper."""
    loss_type: str = "grpo"
    """grpo | bnpo | dr_grpo | dapo: how per-token losses are averaged (see docs/papers.md)."""
    scale_rewards: str = "group"
    """group | batch | none (Dr. GRPO): what the group-centred reward is divided by."""
    epsilon: float = 0.2
    """Lower clip range of the ratio."""
    epsilon_high: float = 0.0
    """Upper clip range (clip-higher, DAPO); 0 means the same as epsilon."""
    num_iterations: int = 1
    """Optimisation passes over each rollout batch (old log-probs cached at rollout)."""
    filter_zero_std_groups: bool = False
    """Drop groups whose rewards are all equal (no learning signal); counted in frac_reward_zero_std."""
    mask_truncated_completions: bool = False
    """Completions cut at max_completion_length contribute no loss."""


STAGE_CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig}


def field_docs(cls) -> dict[str, str]:
    """Map each field to the string literal under it, walking the class hierarchy."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _field_type(cls, name: str):
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


@functools.lru_cache(maxsize=None)
def _kinds(cls) -> dict:
    """field -> its type (str, int, float, bool or list), resolved once per class."""
    return {f.name: _field_type(cls, f.name) for f in dataclasses.fields(cls)}


def coerce(cls, name: str, value, source: str):
    """Convert a YAML or command-line value to the field's type, or raise UserError.

    Command-line values are strings; YAML values keep their YAML type, which must fit
    the field: no bool for an int or float, no fraction for an int, no list for a string.
    """
    kind = _kinds(cls)[name]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is list or typing.get_origin(kind) is list:
            return _coerce_list(name, value, source)
        if kind is str:
            if isinstance(value, str):
                return value
            if name in _NUMBER_STRINGS and isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ValueError
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            return int(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{source}: field {name!r} expects {kind.__name__}, got {value!r}") from None


# str fields whose value may be a number (YAML `reward_on_error: 0` is the string "0")
_NUMBER_STRINGS = ("reward_on_error",)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce_list(name: str, value, source: str) -> list:
    """A list field from a YAML list, or from `a,b,c` (a flag, or a YAML string); items checked by kind."""
    if isinstance(value, list):
        items, shown = list(value), repr
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        items, shown = [v.strip() for v in str(value).split(",") if v.strip()], str
    else:
        raise UserError(f"{source}: field {name!r} expects a list, got {value!r}")
    out = []
    for item in items:
        if name == "reward_funcs":
            if not isinstance(item, str) or _number_or_str(item) != item:
                raise UserError(f"{source}: field {name!r}: {shown(item)} is not a reward name")
            out.append(item)
        elif name == "reward_weights":
            number = _number_or_str(item) if isinstance(item, str) else item
            if not _is_number(number) or not math.isfinite(number):
                raise UserError(f"{source}: field {name!r}: {shown(item)} is not a finite number")
            out.append(float(number))
        else:
            out.append(_number_or_str(item) if isinstance(item, str) else item)
    return out


def _number_or_str(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def load_config(stage: str, config_file: str | None, overrides: dict[str, str], check_paths: bool = False):
    """Build a stage's config: dataclass defaults, then YAML, then flags; then ``validate`` it.

    Each given field remembers where it came from (``file.yaml:LINE`` or ``--field``), so
    every message names it. ``check_paths`` (the command line) also checks the files and
    folders the run reads and writes, before anything is written.
    """
    cls = STAGE_CONFIGS[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    values, sources = {}, {}
    if config_file:
        loaded, lines = _read_yaml(config_file)
        for key, value in loaded.items():
            where = f"{config_file}:{lines.get(str(key), 1)}"
            if key not in names:
                raise UserError(unknown_field_message(stage, key, where))
            values[key], sources[key] = coerce(cls, key, value, where), where
    for key, value in overrides.items():
        if key not in names:
            raise UserError(unknown_field_message(stage, key))
        values[key], sources[key] = coerce(cls, key, value, f"--{key}"), f"--{key}"
    cfg = cls(**values)
    validate(stage, cfg, sources, check_paths=check_paths)
    return cfg


def _read_yaml(config_file: str) -> tuple[dict, dict[str, int]]:
    """The --config file's mapping and each top-level key's line; every problem is one UserError line."""
    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"{config_file}: config file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{config_file}: cannot read the config file ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{config_file}:{line}: the config file is not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    try:
        loaded = yaml.safe_load(text)
        lines = _yaml_key_lines(text, config_file)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise UserError(f"{config_file}{where}: invalid YAML ({problem})") from None
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict):
        raise UserError(f"{config_file}: expected a mapping of field: value, got a YAML {type(loaded).__name__}")
    return loaded, lines


def _yaml_key_lines(text: str, config_file: str = "") -> dict[str, int]:
    """The line of each top-level key of a YAML mapping (from the parser's marks, so any YAML layout works);
    a key given twice is an error (YAML would silently keep the last one)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    lines: dict = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            if key.value in lines and key.value != "<<":
                raise UserError(f"{config_file}:{key.start_mark.line + 1}: field {key.value!r} is given twice "
                                f"(first on line {lines[key.value]})")
            lines[key.value] = key.start_mark.line + 1
    return lines


def unknown_field_message(stage: str, key, where: str | None = None, also: tuple = ()) -> str:
    """`--key: unknown field ...` (a flag) or `where: unknown field 'key' ...` (YAML), with the closest
    valid field (or name in ``also``, e.g. the `config` flag)."""
    names = [f.name for f in dataclasses.fields(STAGE_CONFIGS[stage])] + list(also)
    text = str(key)
    match = difflib.get_close_matches(text, names, n=1)
    flag = where is None
    head = f"--{text}: unknown field for posttrain {stage}" if flag else f"{where}: unknown field {text!r} for posttrain {stage}"
    if match:
        return f"{head}; did you mean {'--' if flag else ''}{match[0]}?"
    owners = [s for s, c in STAGE_CONFIGS.items() if text in {f.name for f in dataclasses.fields(c)}]
    if owners:
        return f"{head} (it is a field of posttrain {' / '.join(owners)})"
    return f"{head} (see posttrain {stage} --help)"


_CHOICES = {
    "lr_scheduler_type": ("cosine", "linear", "constant"),
    "logps_normalization": ("sum", "mean"),
    "kl_estimator": ("k1", "k2", "k3"),
    "critic": ("separate", "shared"),
    "generation_cache": ("dynamic", "static"),
    "scale_rewards": ("group", "batch", "none"),
    "eval_strategy": ("no", "steps", "epoch"),
}
_LOSS_TYPES = {"dpo": ("sigmoid", "ipo", "hinge"), "grpo": ("grpo", "bnpo", "dr_grpo", "dapo")}


def _ge(low):
    return lambda v, cfg: v >= low, f">= {low}"


def _gt(low):
    return lambda v, cfg: v > low, f"> {low}"


def _within(low, high, closed_high: bool = False):
    """[low, high) or, with closed_high, [low, high]."""
    if closed_high:
        return lambda v, cfg: low <= v <= high, f"in [{low}, {high}]"
    return lambda v, cfg: low <= v < high, f"in [{low}, {high})"


def _open(low, high):
    return lambda v, cfg: low < v < high, f"in ({low}, {high})"


def parse_on_error(value, field: str = "reward_on_error") -> float | None:
    """``reward_on_error``: None for `raise`, else the finite number a failed row is scored with."""
    if isinstance(value, str) and value.strip().lower() == "raise":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise UserError(f"field {field!r} must be `raise` or a finite number to score a failed row with, got {value!r}")
    return number


def _raise_or_number(value, cfg) -> bool:
    try:
        parse_on_error(value)
    except UserError:
        return False
    return True


# The valid range of every numeric field (and reward_on_error): field -> (predicate(value, cfg), "must be ...");
# a dict of stage -> rule where the stages differ. Rules of fields that depend on another field read it from cfg.
_RANGES: dict = {
    "seed": (lambda v, cfg: 0 <= v < 2**32, "in [0, 2**32)"),
    "learning_rate": _gt(0),
    "critic_learning_rate": _ge(0),
    "weight_decay": _ge(0),
    "warmup_ratio": _within(0, 1),
    "per_device_train_batch_size": _ge(1),
    "gradient_accumulation_steps": _ge(1),
    "num_train_epochs": _gt(0),
    "max_steps": (lambda v, cfg: v == -1 or v >= 1, "-1 (from num_train_epochs) or >= 1"),
    "max_grad_norm": _ge(0),
    "max_length": _ge(2),
    "max_prompt_length": (lambda v, cfg: 1 <= v < cfg.max_length, ">= 1 and < max_length ({max_length})"),
    "logging_steps": _ge(1),
    "save_steps": _ge(0),
    "save_total_limit": _ge(0),
    "max_nonfinite_steps": _ge(1),
    "lora_r": _ge(1),
    "lora_alpha": _gt(0),
    "lora_dropout": _within(0, 1),
    "num_threads": _ge(0),
    "tiny_num_heads": _ge(1),
    "tiny_hidden_size": (lambda v, cfg: v >= 1 and cfg.tiny_num_heads >= 1 and v % cfg.tiny_num_heads == 0,
                         ">= 1 and divisible by tiny_num_heads ({tiny_num_heads})"),
    "tiny_num_layers": _ge(1),
    "tiny_intermediate_size": _ge(1),
    "eval_max_rows": _ge(1),
    "eval_steps": _ge(0),
    "eval_split": _within(0, 1),
    "beta": {"dpo": _gt(0), "grpo": _ge(0)},
    "label_smoothing": _within(0, 0.5),
    "rpo_alpha": _ge(0),
    "center_rewards_coefficient": _ge(0),
    "temperature": _gt(0),
    "top_k": _ge(0),
    "max_completion_length": _ge(1),
    "kl_coef": _ge(0),
    "target_kl_coef": _ge(0),
    "kl_horizon": _ge(1),
    "gamma": _within(0, 1, closed_high=True),
    "lam": _within(0, 1, closed_high=True),
    "num_ppo_epochs": _ge(1),
    "num_mini_batches": _ge(1),
    "epsilon": _open(0, 1),
    # the upper clip 1 + epsilon_high has no bound to respect (10 effectively switches it off); 0 means epsilon
    "epsilon_high": _ge(0),
    "cliprange_value": _ge(0),
    "vf_coef": _ge(0),
    "entropy_coef": _ge(0),
    "target_kl": _ge(0),
    "missing_eos_penalty": _ge(0),
    "reward_clip": _ge(0),
    "reward_timeout_s": _ge(0),
    "reward_on_error": (_raise_or_number, "`raise` or a finite number"),
    "num_generations": (lambda v, cfg: v >= 2, ">= 2 (a group needs a baseline)"),
    "num_iterations": _ge(1),
}
# a rule that reads another field: where that one was given, when this one was not
_RANGES_READ = {"max_prompt_length": "max_length", "tiny_hidden_size": "tiny_num_heads"}
# checked only when the user gives the field: the default max_prompt_length (256) is capped by the
# truncation policy when only max_length is lowered
_RANGES_WHEN_GIVEN = ("max_prompt_length",)


def _field(name: str, sources: dict | None) -> str:
    """`--name: field 'name'`, `file.yaml:LINE: field 'name'` or `field 'name'`."""
    where = (sources or {}).get(name)
    return f"{where}: field {name!r}" if where else f"field {name!r}"


def validate(stage: str, cfg, sources: dict | None = None, check_paths: bool = False) -> None:
    """Reject impossible values up front with the field's name; fill in defaults that depend on others.

    ``sources`` maps each given field to where it was given (``file.yaml:LINE`` or ``--field``);
    ``check_paths`` also checks the files and folders the run reads and writes (nothing is written here).
    """
    if stage == "dpo" and not cfg.logps_normalization:
        cfg.logps_normalization = "mean" if cfg.loss_type == "ipo" else "sum"
    for name, valid in _CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in valid:
            raise UserError(f"{_field(name, sources)}: {getattr(cfg, name)!r} is not one of {', '.join(valid)}")
    if stage in _LOSS_TYPES and cfg.loss_type not in _LOSS_TYPES[stage]:
        raise UserError(f"{_field('loss_type', sources)}: {cfg.loss_type!r} is not one of {', '.join(_LOSS_TYPES[stage])}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _kinds(type(cfg))[f.name] is float and not math.isfinite(value):
            raise UserError(f"{_field(f.name, sources)} must be a finite number, got {value!r}")
    for name, rule in _RANGES.items():
        if isinstance(rule, dict):
            rule = rule.get(stage)
        if rule is None or not hasattr(cfg, name):
            continue
        if name in _RANGES_WHEN_GIVEN and sources is not None and name not in sources:
            continue
        check, text = rule
        value = getattr(cfg, name)
        if not check(value, cfg):
            if name in _RANGES_READ and name not in (sources or {}) and _RANGES_READ[name] in (sources or {}):
                sources = {**sources, name: sources[_RANGES_READ[name]]}
            raise UserError(f"{_field(name, sources)} must be {text.format_map(vars(cfg))}, got {value!r}")
    _check_report_to(cfg, sources)
    if not cfg.dataset_name:
        raise UserError(f"field 'dataset_name' is required for `posttrain {stage}`")
    if stage in ("ppo", "grpo") and cfg.reward_weights:
        count = len(cfg.reward_funcs) + bool(cfg.reward_model_name_or_path)
        if len(cfg.reward_weights) != count:
            raise UserError(f"{_field('reward_weights', sources)} has {len(cfg.reward_weights)} values for {count} reward sources")
    if stage == "ppo":
        if cfg.per_device_train_batch_size % cfg.num_mini_batches:
            raise UserError(f"{_field('num_mini_batches', sources)}: {cfg.num_mini_batches} must divide "
                            f"per_device_train_batch_size ({cfg.per_device_train_batch_size})")
        mini = cfg.per_device_train_batch_size // cfg.num_mini_batches
        if mini % cfg.gradient_accumulation_steps:
            raise UserError(f"{_field('gradient_accumulation_steps', sources)}: {cfg.gradient_accumulation_steps} must "
                            f"divide the mini-batch of {mini} rollouts (per_device_train_batch_size / num_mini_batches)")
    if check_paths:
        _check_paths(cfg, sources)


REPORT_TO = ("none", "jsonl", "tensorboard", "wandb")
_REPORT_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _check_report_to(cfg, sources: dict | None) -> None:
    """Known logging backends, whose packages are installed (checked before anything is trained)."""
    import importlib.util

    for name in cfg.report_to:
        if name not in REPORT_TO:
            raise UserError(f"{_field('report_to', sources)}: {name!r} is not one of {', '.join(REPORT_TO)}")
        package = _REPORT_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(f"{_field('report_to', sources)}: {name} is not installed (pip install {package}), "
                            f"or drop it from report_to")


_MODEL_FIELDS = ("model_name_or_path", "ref_model_name_or_path", "reward_model_name_or_path", "critic_model_name_or_path")
_DATA_FIELDS = ("dataset_name", "eval_dataset_name")


def _check_paths(cfg, sources: dict | None) -> None:
    """Models and data the run reads exist locally; output_dir is (or can be made) a writable folder."""
    for name in _MODEL_FIELDS:
        path = getattr(cfg, name, "")
        tiny = name == "model_name_or_path" and path == "tiny"
        if not path or (tiny and hasattr(cfg, "tiny_hidden_size")):
            continue
        if not Path(path, "config.json").is_file() and not Path(path, "adapter_config.json").is_file():
            hint = "; only posttrain sft builds the embedded tiny model" if tiny else ""
            raise UserError(f"{_field(name, sources)}: {path!r} is not a local model folder (no config.json); "
                            f"posttrain never downloads models{hint}")
    for name in _DATA_FIELDS:
        path = getattr(cfg, name, "")
        if path and not Path(path).exists():
            raise UserError(f"{_field(name, sources)}: {path!r} does not exist (a .jsonl, .jsonl.gz, .json, .parquet "
                            "or .csv file, a folder holding one, a datasets save_to_disk folder or a hub snapshot folder)")
        if path:
            from posttrain.data import split_files

            split = cfg.dataset_train_split if name == "dataset_name" else cfg.dataset_test_split
            split_files(path, split, _field(name, sources))  # a folder's layout and split, before any model loads
    out = Path(cfg.output_dir)
    if not cfg.output_dir.strip():
        raise UserError(f"{_field('output_dir', sources)} is empty")
    if out.exists() and not out.is_dir():
        raise UserError(f"{_field('output_dir', sources)}: {cfg.output_dir!r} is a file, not a folder")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{_field('output_dir', sources)}: {cfg.output_dir!r} cannot be created ({str(existing)!r} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == out.absolute() else f"cannot be created ({str(existing)!r} is not writable)"
        raise UserError(f"{_field('output_dir', sources)}: {cfg.output_dir!r} {what}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
