"""One config dataclass per stage; YAML supplies values and flags override YAML.

Each field is documented once, by the string literal directly under it; that
string is the ``--help`` text (read with ``ast``, so it is never duplicated).
Derived values (global batch, total steps) are computed in ``derived()``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
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
    """Training data: a local .jsonl, .json or .parquet file (or a folder holding one)."""
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
    """Train LoRA adapters instead of all weights (the reference is the base with adapters off)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names to adapt, or `all-linear`."""
    fsdp: bool = False
    """Under torchrun, shard weights, gradients and optimizer state with FSDP2 (per decoder layer) instead of DDP."""
    chat_template_path: str = ""
    """A Jinja chat template file to use instead of (or where there is no) the tokenizer's own."""
    num_threads: int = 0
    """torch CPU threads (0: leave torch's default)."""
    progress: bool = True
    """Show a progress bar."""


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
class SFTConfig(TinyModelConfig, CommonConfig):
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""
    completion_only_loss: bool = True
    """Compute the loss on completion / assistant tokens only (False: on every token)."""
    eval_dataset_name: str = ""
    """Optional prompt file with `answer` fields; accuracy on it is logged at each logging step."""
    eval_max_rows: int = 256
    """Rows of eval_dataset_name used for the in-training accuracy."""


@dataclass
class DPOConfig(DropoutConfig, CommonConfig):
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
class RMConfig(DropoutConfig, CommonConfig):
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    center_rewards_coefficient: float = 0.0
    """Weight of the (r_chosen + r_rejected)² penalty that keeps rewards centred at 0."""
    eval_dataset_name: str = ""
    """Held-out preference pairs; empty means hold out eval_split of the training pairs."""
    eval_split: float = 0.05
    """Fraction of the training pairs held out when eval_dataset_name is empty."""


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
    eval_dataset_name: str = ""
    """Optional prompt file with `answer` fields; greedy accuracy on it is logged at each logging step."""
    eval_max_rows: int = 256
    """Rows of eval_dataset_name used for the in-training accuracy."""


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


def coerce(cls, name: str, value, source: str):
    """Convert a YAML or command-line value to the field's type, or raise UserError."""
    kind = _field_type(cls, name)
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
            if isinstance(value, list):
                return value
            items = [v.strip() for v in str(value).split(",") if v.strip()]
            return [_number_or_str(v) for v in items]
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: field {name!r} expects {kind.__name__}, got {value!r}") from None


def _number_or_str(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def load_config(stage: str, config_file: str | None, overrides: dict[str, str]):
    """Build a stage's config: dataclass defaults, then YAML, then flags."""
    cls = STAGE_CONFIGS[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"{config_file}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{config_file}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{config_file}: expected a mapping of field: value")
        lines = _yaml_key_lines(path)
        for key, value in loaded.items():
            where = f"{config_file}:{lines.get(key, 1)}"
            if key not in names:
                raise UserError(f"{where}: unknown field {key!r} for `posttrain {stage}`")
            values[key] = coerce(cls, key, value, where)
    for key, value in overrides.items():
        if key not in names:
            raise UserError(f"--{key}: unknown field for `posttrain {stage}` (see --help)")
        values[key] = coerce(cls, key, value, f"--{key}")
    cfg = cls(**values)
    validate(stage, cfg)
    return cfg


def _yaml_key_lines(path: Path) -> dict[str, int]:
    lines = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line and not line[0].isspace() and ":" in line and not line.startswith("#"):
            lines.setdefault(line.split(":", 1)[0].strip(), number)
    return lines


_CHOICES = {
    "lr_scheduler_type": ("cosine", "linear", "constant"),
    "logps_normalization": ("sum", "mean"),
    "kl_estimator": ("k1", "k2", "k3"),
    "critic": ("separate", "shared"),
    "scale_rewards": ("group", "batch", "none"),
}
_LOSS_TYPES = {"dpo": ("sigmoid", "ipo", "hinge"), "grpo": ("grpo", "bnpo", "dr_grpo", "dapo")}


def validate(stage: str, cfg) -> None:
    """Reject impossible values up front with the field's name; fill in defaults that depend on others."""
    if stage == "dpo" and not cfg.logps_normalization:
        cfg.logps_normalization = "mean" if cfg.loss_type == "ipo" else "sum"
    for name, valid in _CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in valid:
            raise UserError(f"field {name!r}: {getattr(cfg, name)!r} is not one of {', '.join(valid)}")
    if stage in _LOSS_TYPES and cfg.loss_type not in _LOSS_TYPES[stage]:
        raise UserError(f"field 'loss_type': {cfg.loss_type!r} is not one of {', '.join(_LOSS_TYPES[stage])}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length"):
        if getattr(cfg, name) < 1:
            raise UserError(f"field {name!r} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.dataset_name:
        raise UserError(f"field 'dataset_name' is required for `posttrain {stage}`")
    if stage == "grpo":
        if cfg.num_generations < 2:
            raise UserError("field 'num_generations' must be >= 2 (a group needs a baseline)")
    if stage in ("ppo", "grpo") and cfg.reward_weights:
        sources = len(cfg.reward_funcs) + bool(cfg.reward_model_name_or_path)
        if len(cfg.reward_weights) != sources:
            raise UserError(f"field 'reward_weights' has {len(cfg.reward_weights)} values for {sources} reward sources")
    if stage == "ppo":
        if cfg.num_mini_batches < 1 or cfg.per_device_train_batch_size % cfg.num_mini_batches:
            raise UserError(f"field 'num_mini_batches': {cfg.num_mini_batches} must be >= 1 and divide "
                            f"per_device_train_batch_size ({cfg.per_device_train_batch_size})")
        mini = cfg.per_device_train_batch_size // cfg.num_mini_batches
        if mini % cfg.gradient_accumulation_steps:
            raise UserError(f"field 'gradient_accumulation_steps': {cfg.gradient_accumulation_steps} must divide the "
                            f"mini-batch of {mini} rollouts (per_device_train_batch_size / num_mini_batches)")
    if stage == "dpo" and cfg.beta <= 0:
        raise UserError("field 'beta' must be > 0 for DPO")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
