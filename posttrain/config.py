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
    save_to_disk folder, or a hub snapshot folder: files named by split (data/train-00000-of-00003.parquet), one
    folder of those per config (main/, socratic/), or configs and splits listed in its README.md `configs:` block."""
    dataset_config: str = ""
    """The config of a hub snapshot folder that has several (gsm8k: main | socratic), for dataset_name and
    eval_dataset_name; empty: the folder's only (or default) config. Sources without configs ignore it."""
    dataset_train_split: str = "train"
    """The split of dataset_name to train on (any split it has: train_sft, test_prefs, ...), when it is a
    DatasetDict or hub snapshot folder."""
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
    """Learning-rate schedule after warm-up: cosine | linear | constant | cosine_with_min_lr (the same as cosine)."""
    min_lr_rate: float = 0.0
    """The cosine / linear decay ends at this fraction of learning_rate (TRL: lr_scheduler_kwargs min_lr_rate)."""
    warmup_ratio: float = 0.0
    """Fraction of the total steps spent warming the learning rate up from 0."""
    warmup_steps: float = 0.0
    """Warm-up steps; overrides warmup_ratio when > 0. A value in (0, 1) is a fraction of the total steps, as in transformers."""
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
    save_strategy: str = "steps"
    """steps: checkpoints every save_steps | epoch: one at the end of each epoch (sft, rm, dpo) | no: none
    (a SIGTERM still saves one to resume from)."""
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
    """Run forward and backward under bfloat16 autocast (weights and optimizer stay fp32); PPO and GRPO rollouts
    also sample under it, so the tokens are drawn from the distribution their log-probs are scored under."""
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
    run_name: str = ""
    """A name for the run, recorded in config.yaml and summary.json."""
    dtype: str = "float32"
    """dtype of the weights as loaded: float32 | bfloat16 (weights and optimizer state in bf16) | auto (the
    checkpoint's own). bf16 autocast over fp32 weights is `bf16: true` instead."""
    attn_implementation: str = ""
    """Attention kernel passed to from_pretrained: sdpa | eager | flash_attention_2 (CUDA only); empty: transformers' default."""


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
    """Prompt/completion rows: the loss on the completion tokens only (False: on the prompt tokens too), as in TRL.
    It does not apply to `messages` rows (see assistant_only_loss)."""
    assistant_only_loss: bool = True
    """`messages` rows: the loss on the assistant turns only (False: on every token of the conversation), as in TRL
    (whose default is False). It does not apply to prompt/completion rows (see completion_only_loss)."""
    dataset_text_field: str = "text"
    """The column of plain-text rows (no messages, prompt or completion): language modelling, the loss on every
    token, EOS appended."""
    eos_token: str = ""
    """A token of the tokenizer's vocabulary to use as its EOS (appended to text completions, saved with the
    tokenizer); empty: the tokenizer's own."""
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
    loss_type: list = field(default_factory=lambda: ["sigmoid"])
    """sigmoid (DPO) | ipo (IPO) | hinge (SLiC) | robust (robust DPO) | bco_pair (BCO) | apo_zero (APO) |
    sppo_hard (SPPO) | nca_pair (NCA) | exo_pair (EXO); several (`--loss_type sigmoid bco_pair`) add up,
    weighted by loss_weights, as in TRL."""
    loss_weights: list = field(default_factory=list)
    """One weight per loss_type, for a combination of several (empty: all 1)."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped: conservative DPO (sigmoid), robust DPO (robust),
    the target distribution of exo_pair (which needs it > 0; EXO uses 1e-3)."""
    logps_normalization: str = ""
    """sum: log π(y|x), the standard DPO. mean: per-token average (length-normalised), for every loss type
    of the run. Empty: mean for ipo alone (its target 1/(2β) assumes averaged log-ratios), sum otherwise."""
    precompute_ref_log_probs: bool = False
    """Score the whole dataset with the reference once before training, then release the reference model."""
    rpo_alpha: float = 0.0
    """Weight of the length-normalised NLL of the chosen response added to the loss (RPO); guards against falling chosen log-probs."""
    max_completion_length: int = 0
    """Longest chosen / rejected response in tokens, which keep their first tokens (0: only max_length bounds them)."""


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
    eos_token: str = ""
    """A token of the tokenizer's vocabulary to use as its EOS (appended to text responses, saved with the
    tokenizer); empty: the tokenizer's own."""


@dataclass
class ReferenceFreePairsConfig(PaddingFreeConfig, DropoutConfig, CommonConfig):
    eval_dataset_name: str = ""
    """Held-out preference pairs: eval loss, rewards/accuracies and rewards/margins."""
    max_completion_length: int = 0
    """Longest chosen / rejected response in tokens, which keep their first tokens (0: only max_length bounds them)."""


@dataclass
class CPOConfig(ReferenceFreePairsConfig):
    """posttrain cpo: the dpo recipe with CPO's reference-free loss (and SimPO's as loss_type simpo), TRL's CPOConfig."""

    beta: float = 0.1
    """Inverse temperature β of the reward β·log π(y) (no reference model); SimPO's paper tunes it per model, β >= 2."""
    loss_type: str = "sigmoid"
    """sigmoid (CPO) | hinge | ipo | simpo (SimPO: mean token log-probs and the margin simpo_gamma); ipo and simpo
    score mean token log-probs, sigmoid and hinge summed ones, as TRL."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped (sigmoid and simpo)."""
    cpo_alpha: float = 1.0
    """Weight of the NLL of the chosen responses (CPO's behaviour-cloning term; 0: SimPO's loss alone)."""
    simpo_gamma: float = 0.5
    """loss_type simpo: the target reward margin γ, in -log σ(β·(mean log π(y_w) - mean log π(y_l)) - γ)."""


@dataclass
class ORPOConfig(ReferenceFreePairsConfig):
    """posttrain orpo: the dpo recipe with ORPO's loss, the chosen responses' NLL plus λ·odds-ratio term, TRL's ORPOConfig."""

    beta: float = 0.1
    """λ, the weight of the odds-ratio term -log σ(log odds(y_w) - log odds(y_l)) added to the NLL."""


@dataclass
class RewardConfig:
    reward_funcs: list = field(default_factory=lambda: ["exact_match"])
    """Rule rewards: built-ins exact_match, think_format, TRL's accuracy_reward (exact match on `answer` or `solution`)
    and think_format_reward, or `module:function` / `module.function` of your own. Not given, with a
    reward_model_name_or_path: none (the reward model alone)."""
    reward_weights: list = field(default_factory=list)
    """Weight per reward source (funcs first, then the reward model); empty means all 1."""
    reward_model_name_or_path: str = ""
    """A trained reward model folder, added to the reward sources (scored on prompt + completion)."""
    reward_clip: float = 0.0
    """Clip the weighted sum of the reward sources to [-reward_clip, reward_clip] before advantages; 0: no
    clipping, as in TRL (a reward model's scores reach the advantages unsaturated)."""
    reward_on_error: str = "raise"
    """A reward function that fails or returns a non-number for a row: `raise`, or a number to score that row with."""
    reward_timeout_s: float = 0.0
    """Report a reward function or model that takes longer than this many seconds per batch (0: no limit)."""
    missing_eos_penalty: float = 0.0
    """Subtract this from the reward of completions that hit max_completion_length without EOS (after
    reward_clip), as TRL's option of that name does."""


@dataclass
class RolloutConfig:
    max_completion_length: int = 64
    """Most new tokens sampled per completion; with an environment or tools, every model and tool token of a
    trajectory counts."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    top_k: int = 0
    """Sample from the top-k tokens only (0: all). As in TRL, log-probs are still of the untruncated softmax(z/T)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this probability (1: all). As in TRL, the
    scored distribution stays the untruncated softmax(z/T)."""
    min_p: float = 0.0
    """Sample only tokens with at least min_p times the top token's probability (0: off). As in TRL, the scored
    distribution stays the untruncated softmax(z/T)."""
    repetition_penalty: float = 1.0
    """Must be 1.0: a penalty would make the sampled distribution differ from the scored softmax(z/T)."""
    log_completions: bool = False
    """Append the last rollout's prompts, completions and rewards to output_dir/completions.jsonl at each logging step (rank 0)."""
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
class EnvironmentConfig:
    environment: str = ""
    """Multi-turn rollouts: `module:Class` of an environment, one instance per trajectory (a no-argument
    constructor; reset(**row) -> str | None, a first observation appended to the prompt; its public methods are
    the model's tools; an optional get_reward() -> float is a reward source of weight 1). Reward functions then
    receive `environments=`, one instance per completion, and `completions` is the model's last turn."""
    tools: list = field(default_factory=list)
    """Plain functions the model may call, as `module:function` (typed arguments, Google-style docstring)."""
    max_turns: int = 4
    """Most rounds of tool calls per trajectory (each followed by one more model turn)."""
    max_tool_response_length: int = 256
    """Tool results are cut to this many tokens (0: whole)."""
    tool_timeout_s: float = 10.0
    """A tool call still running after this many seconds answers the model with an error (0: no limit)."""
    tool_call_parser: str = "auto"
    """How tool calls are read from a model turn: hermes (<tool_call>{json}</tool_call>, Qwen), llama3_json,
    `module:function` (text -> list of posttrain.environments.ToolCall), or auto (from the chat template)."""


@dataclass
class PPOConfig(EnvironmentConfig, DropoutConfig, RolloutConfig, RewardConfig, CommonConfig):
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
    """Per-token KL estimator in the reward: k1 | k2 | k3 | k3_plus (in a reward, the same as k3)."""
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
    whiten_rewards: bool = False
    """Scale the per-token rewards (KL penalty and score) to unit variance over the rollout batch before GAE,
    without centring them (TRL's whiten_rewards)."""
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
    stop_token: str = "eos"
    """Where completions stop: eos (the tokenizer's EOS), the only value."""


@dataclass
class GRPOConfig(EnvironmentConfig, DropoutConfig, RolloutConfig, RewardConfig, CommonConfig):
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW."""
    ref_model_name_or_path: str = ""
    """Frozen reference for the KL term; empty means the starting policy. Not loaded when beta is 0."""
    num_generations: int = 8
    """Completions sampled per prompt (the group size G)."""
    beta: float = 0.04
    """Weight of the KL to the reference (kl_estimator): a loss term, or with kl_in_reward a reward penalty
    (0: no reference model is loaded)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator (Schulman 2020): k1 | k2 | k3 | k3_plus (k3's value with k2's gradient)."""
    kl_in_reward: bool = False
    """Subtract beta·KL from the reward before the advantages (PPO / RLOO style: the completion's summed KL, or
    for reinforce_pp each token's) instead of adding it to the loss (GRPO style)."""
    use_bias_correction_kl: bool = False
    """Weight k3 by the ratio π/π_old: the same KL value, but the unbiased gradient of KL(π||π_ref)
    (DeepSeek-V3.2). False: differentiate k3 as in the GRPO paper."""
    loss_type: str = "grpo"
    """grpo | bnpo | dr_grpo | dapo: how per-token losses are averaged; cispo (MiniMax-M1: clipped, detached
    ratio times log-prob), sapo (soft gate for the clip), rloo (TRL RLOO's clipped ratio of whole completions)
    (see docs/papers.md)."""
    advantage_estimator: str = "grpo"
    """grpo (group-normalised reward) | rloo (minus the mean of the other G-1) | reinforce_pp (REINFORCE++:
    returns whitened over the global batch) | reinforce_pp_baseline (group mean subtracted first) | remax (minus
    the reward of the prompt's greedy completion)."""
    scale_rewards: str = "group"
    """group | batch | none (Dr. GRPO): what the group-centred reward is divided by (TRL's true: group, false:
    none). advantage_estimator grpo only."""
    normalize_advantages: bool = False
    """Whiten the advantages over the global batch, (A - mean) / (std + 1e-4), as TRL's RLOO option does
    (advantage_estimator grpo, rloo or remax; reinforce_pp whitens already)."""
    importance_sampling_level: str = "token"
    """token: one ratio per token; sequence: GSPO's one ratio per completion, exp(mean token log-ratio)."""
    epsilon: float = 0.2
    """Lower clip range of the ratio."""
    epsilon_high: float = 0.0
    """Upper clip range (clip-higher, DAPO); 0 means the same as epsilon. For loss_type cispo, the bound of the
    ratio itself (TRL's ε_max; ScaleRL uses 5.0), which cispo needs."""
    delta: float = 0.0
    """Two-sided clipping (INTELLECT-2): bound the ratio by delta for negative advantages too (> 1; 0: off)."""
    clip_ratio_c: float = 0.0
    """Dual-clip PPO (Ye et al. 2020): a negative advantage's loss is at most -clip_ratio_c·A (> 1, e.g. 3; 0: off)."""
    cispo_two_sided: bool = False
    """loss_type cispo: also bound the ratio below, at 1 - epsilon (default: upper bound only, as MiniMax-M1)."""
    sapo_temperature_pos: float = 1.0
    """loss_type sapo: temperature of the soft gate for positive advantages."""
    sapo_temperature_neg: float = 1.05
    """loss_type sapo: temperature of the soft gate for other advantages."""
    num_iterations: int = 1
    """Optimisation passes over each rollout batch (old log-probs cached at rollout)."""
    filter_zero_std_groups: bool = False
    """Drop groups whose rewards are all equal (no learning signal); counted in frac_reward_zero_std."""
    mask_truncated_completions: bool = False
    """Completions cut at max_completion_length contribute no loss."""


@dataclass
class RLOOConfig(GRPOConfig):
    """posttrain rloo: the grpo recipe with TRL RLOOTrainer's defaults and semantics."""

    num_generations: int = 2
    """Completions sampled per prompt (the group size G; TRL's RLOO default 2)."""
    beta: float = 0.05
    """Weight of the KL to the reference, subtracted from each completion's reward (0: no reference model)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: k1 (log π - log π_ref, RLOO's and TRL's) | k2 | k3 | k3_plus."""
    kl_in_reward: bool = True
    """Subtract beta·(the completion's summed KL) from its reward (RLOO); false: add beta·KL to the loss instead."""
    advantage_estimator: str = "rloo"
    """rloo (reward minus the mean of the other G-1 of its group), or any of posttrain grpo's."""
    loss_type: str = "rloo"
    """rloo: the clipped ratio of whole completions, exp(Σ token log-ratios), averaged over completions (TRL's
    RLOOTrainer); or any of posttrain grpo's loss types."""


@dataclass
class OnlineDPOConfig(DropoutConfig, RolloutConfig, RewardConfig, CommonConfig):
    """posttrain online_dpo: DPO on pairs sampled from the current policy and judged by the reward sources."""

    ref_model_name_or_path: str = ""
    """Frozen reference model; empty means the starting policy (model_name_or_path)."""
    per_device_train_batch_size: int = 8
    """Prompts per micro-batch on each process (2 completions each, one pair); a step samples
    per_device_train_batch_size x gradient_accumulation_steps prompts per process (TRL's count)."""
    beta: float = 0.1
    """Inverse temperature β of the implicit reward β·log(π/π_ref); higher stays closer to the reference (IPO: its τ)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) | ipo (IPO), on each pair's summed completion log-probs."""
    temperature: float = 0.9
    """Sampling temperature of the two completions (log-probs are scored at temperature 1, as in TRL)."""
    max_completion_length: int = 64
    """Most new tokens sampled per completion (TRL: max_new_tokens); prompts are cut to max_length minus this."""
    reward_funcs: list = field(default_factory=lambda: ["exact_match"])
    """The judge: rule rewards (as in grpo: exact_match, think_format, TRL's accuracy_reward and think_format_reward,
    `module:function`), summed with reward_weights, plus reward_model_name_or_path; the higher total is chosen,
    a tie chooses the first sampled. Not given, with a reward_model_name_or_path: none (the reward model alone)."""


@dataclass
class KTOConfig(PaddingFreeConfig, DropoutConfig, CommonConfig):
    """posttrain kto: Kahneman-Tversky Optimization on rows labelled desirable or undesirable."""

    ref_model_name_or_path: str = ""
    """Frozen reference model; empty means the starting policy (model_name_or_path)."""
    beta: float = 0.1
    """Inverse temperature β of the implicit reward β·log(π/π_ref); higher stays closer to the reference."""
    loss_type: str = "kto"
    """kto (KTO, with the KL reference point z0) | apo_zero_unpaired (unpaired APO-zero: no reference point)."""
    desirable_weight: float = 1.0
    """λ_D, the weight of the desirable rows' losses; with unequal counts keep λ_D·n_D / (λ_U·n_U) in [1, 4/3] (KTO Eq. 8)."""
    undesirable_weight: float = 1.0
    """λ_U, the weight of the undesirable rows' losses."""


@dataclass
class DistillConfig(DropoutConfig, SFTConfig):
    """posttrain distill: on-policy distillation and GKD from a frozen teacher (TRL GKDConfig's fields and defaults)."""

    teacher_model_name_or_path: str = ""
    """The frozen teacher (a local model folder); it must share the student's tokenizer. Required."""
    lmbda: float = 0.5
    """Fraction of micro-batches trained on completions the student samples for their prompts (on-policy, GKD's λ);
    the others use the dataset's completions (or, with seq_kd, the teacher's)."""
    beta: float = 0.5
    """Generalised JSD interpolation β in [0, 1]: 0 is the forward KL(teacher || student), 1 the reverse
    KL(student || teacher) of on-policy distillation, 0.5 the Jensen-Shannon divergence."""
    teacher_top_k: int = 0
    """Bound the loss's memory by the teacher's k most likely tokens per position: teacher and student are both
    renormalised over those k and compared there (0: the whole vocabulary, as in TRL)."""
    seq_kd: bool = False
    """Sequence-level KD: the micro-batches that are not on-policy train on completions the teacher samples
    instead of the dataset's."""
    max_completion_length: int = 128
    """Most new tokens sampled per on-policy (or seq_kd) completion (TRL: max_new_tokens)."""
    temperature: float = 0.9
    """Sampling temperature of the student's (and seq_kd teacher's) completions; the loss compares the
    untempered distributions, as TRL's GKDTrainer does."""
    top_k: int = 0
    """Sample from the top-k tokens only (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this probability (1: all)."""
    min_p: float = 0.0
    """Sample only tokens with at least min_p times the top token's probability (0: off)."""
    rollout_engine: str = "hf"
    """What samples completions: `hf` (transformers generate with the KV cache), or `module:factory` of your own."""
    generation_cache: str = "dynamic"
    """KV cache of `hf` sampling: dynamic, or static (preallocated, compiled by torch.compile; CUDA only)."""


STAGE_CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig,
                 "rloo": RLOOConfig}
STAGE_CONFIGS["online_dpo"] = OnlineDPOConfig
STAGE_CONFIGS["kto"] = KTOConfig
STAGE_CONFIGS["distill"] = DistillConfig
STAGE_CONFIGS.update({"cpo": CPOConfig, "orpo": ORPOConfig})
PREFERENCE_STAGES = ("dpo", "cpo", "orpo")  # the dpo recipe; cpo and orpo load no reference model
RL_STAGES = ("ppo", "grpo", "rloo", "online_dpo")


@functools.lru_cache(maxsize=None)
def _class_bodies(path: str) -> dict:
    """Each top-level class of a source file -> its body, from one parse of the file (not one per class)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    return {node.name: node.body for node in tree.body if isinstance(node, ast.ClassDef)}


def field_docs(cls) -> dict[str, str]:
    """Map each field to the string literal under it, walking the class hierarchy."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        body = _class_bodies(inspect.getsourcefile(klass)).get(klass.__qualname__)
        if body is None:  # not a top-level class of its file
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
        if name in ("reward_funcs", "tools", "loss_type"):
            if not isinstance(item, str) or _number_or_str(item) != item:
                what = {"reward_funcs": "a reward name", "tools": "a module:function name"}.get(name, "a loss type")
                raise UserError(f"{source}: field {name!r}: {shown(item)} is not {what}")
            out.append(item)
        elif name in ("reward_weights", "loss_weights"):
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


def load_config(stage: str, config_file: str | None, overrides: dict[str, str], check_paths: bool = False,
                given: dict | None = None):
    """Build a stage's config: dataclass defaults, then YAML, then flags; then ``validate`` it.

    Each given field remembers where it came from (``file.yaml:LINE`` or ``--field``), so
    every message names it. ``check_paths`` (the command line) also checks the files and
    folders the run reads and writes, before anything is written. TRL's names are read
    through ``TRL_ALIASES`` and ``TRL_UNSUPPORTED``, in YAML keys and flags alike. ``given``, when passed, is
    filled with each field the user set -> where.
    """
    cls = STAGE_CONFIGS[stage]
    values, sources = {}, {}
    if config_file:
        loaded, lines = _read_yaml(config_file)
        layer = [(key, value, f"{config_file}:{lines.get(str(key), 1)}") for key, value in loaded.items()]
        _apply(stage, layer, values, sources, yaml_file=True)
    _apply(stage, [(key, value, f"--{key}") for key, value in overrides.items()], values, sources)
    if values.get("reward_model_name_or_path") and "reward_funcs" not in sources:
        # a reward model and no rule named: score with the model alone, as TRL does (exact_match needs `answer`)
        values["reward_funcs"] = []
    if values.get("environment") and "reward_funcs" not in sources:
        # an environment and no rule named: its get_reward scores, as in TRL (exact_match needs `answer`)
        values["reward_funcs"] = []
    cfg = cls(**values)
    validate(stage, cfg, sources, check_paths=check_paths)
    if given is not None:
        given.update(sources)
    return cfg


def _apply(stage: str, given: list[tuple], values: dict, sources: dict, yaml_file: bool = False) -> None:
    """Set ``values`` / ``sources`` from one layer of (key, value, where): a field, a TRL alias of one
    (its value converted), or a TRL name posttrain does not support (an error, or a notice when harmless)."""
    cls = STAGE_CONFIGS[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    set_by: dict[str, str] = {}  # field -> the key that set it in this layer
    for key, value, where in given:
        name = key
        alias = TRL_ALIASES.get(key) if isinstance(key, str) else None
        if alias and alias[0] in names and (alias[2] is None or stage in alias[2]):
            name = alias[0]
            value = alias[1](value, where) if alias[1] else value
        elif key not in names:
            if isinstance(key, str) and key in TRL_UNSUPPORTED:
                _trl_unsupported(stage, key, value, where)
                continue
            raise UserError(unknown_field_message(stage, key, None if not yaml_file else where))
        value = coerce(cls, name, value, where)
        if name in set_by and set_by[name] != key and values[name] != value:
            raise UserError(f"{where}: {key} and {set_by[name]} both set posttrain's {name}, to different values; "
                            "give one of them")
        set_by[name] = key
        values[name], sources[name] = value, where


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


# ------------------------------------------------------------------ TRL's names

def _negated(value, where):
    """disable_tqdm -> progress."""
    return not coerce(CommonConfig, "progress", value, where)


def _scale_rewards(value, where):
    """TRL's scale_rewards also takes true (group) and false (none)."""
    text = str(value).lower()
    return {"true": "group", "false": "none"}.get(text, value) if isinstance(value, (str, bool)) else value


def _lr_scheduler_type(value, where):
    """transformers' constant_with_warmup is posttrain's constant (which warms up for warmup_steps / warmup_ratio)."""
    return "constant" if value == "constant_with_warmup" else value


def _fsdp(value, where):
    """transformers' `--fsdp "full_shard auto_wrap"` is posttrain's FSDP2 per decoder layer; other modes are refused."""
    if isinstance(value, str) and value.strip() and value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
        if "full_shard" not in value.split() or set(value.split()) - {"full_shard", "auto_wrap"}:
            raise UserError(f"{where}: field 'fsdp': {value!r} is not supported; posttrain's fsdp is FSDP2 full "
                            "sharding per decoder layer: --fsdp true (or full_shard auto_wrap)")
        return True
    return False if isinstance(value, str) and not value.strip() else value


def _min_lr_rate(value, where):
    """`lr_scheduler_kwargs '{"min_lr_rate": 0.1}'` -> min_lr_rate."""
    import json

    try:
        kwargs = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise UserError(f"{where}: lr_scheduler_kwargs must be a JSON object such as '{{\"min_lr_rate\": 0.1}}', got {value!r}")
    if "min_lr" in kwargs:
        raise UserError(f"{where}: lr_scheduler_kwargs min_lr is not supported; give min_lr_rate (min_lr / learning_rate)")
    if set(kwargs) - {"min_lr_rate"}:
        raise UserError(f"{where}: lr_scheduler_kwargs {', '.join(sorted(set(kwargs) - {'min_lr_rate'}))} not supported; "
                        "only min_lr_rate")
    return kwargs.get("min_lr_rate", 0.0)


# TRL / transformers name -> (posttrain field, value conversion or None, stages or None for every stage that has the
# field). Applied to YAML keys and flags alike; a name mapping to itself only converts TRL's values.
TRL_ALIASES: dict = {
    "torch_dtype": ("dtype", None, None),
    "activation_checkpointing": ("gradient_checkpointing", None, None),
    "disable_tqdm": ("progress", _negated, None),
    "lr_scheduler_kwargs": ("min_lr_rate", _min_lr_rate, None),
    "lr_scheduler_type": ("lr_scheduler_type", _lr_scheduler_type, None),
    "fsdp": ("fsdp", _fsdp, None),
    "scale_rewards": ("scale_rewards", _scale_rewards, ("grpo", "rloo")),
    "cliprange": ("epsilon", None, ("ppo",)),
    "response_length": ("max_completion_length", None, ("ppo",)),
    "sft_model_path": ("model_name_or_path", None, ("ppo",)),
    "reward_model_path": ("reward_model_name_or_path", None, ("ppo", "online_dpo")),
    "max_new_tokens": ("max_completion_length", None, ("online_dpo", "distill")),
    "exp_name": ("run_name", None, ("ppo",)),
}

ANY = None  # every value is harmless: a notice, never an error
_VLLM = "posttrain samples with transformers generate; plug in a serving engine with rollout_engine module:factory"
_HUB = "posttrain never uploads; upload output_dir yourself (e.g. `hf upload REPO output_dir`)"
_EVAL = "posttrain's in-training evaluation is eval_dataset_name (see README)"
_LOADER = "posttrain tokenises the dataset once up front and uses no loader workers"
_DDP = "posttrain sets up DDP / FSDP2 itself under torchrun"
_ADAMW = "posttrain trains with torch AdamW, betas (0.9, 0.999), eps 1e-8"
_QUANT = "quantised loading is not supported; use dtype bfloat16 (with use_peft for adapters)"
_NO = "not supported"

# TRL / transformers name posttrain has no field for -> (values that are posttrain's behaviour already, or ANY;
# what to use instead). A listed value (or any value, for ANY) is ignored with a notice; any other is an error.
TRL_UNSUPPORTED: dict = {
    # transformers TrainingArguments
    "accelerator_config": ((), "launch with torchrun; posttrain reads no accelerate config"),
    "adam_beta1": ((0.9,), _ADAMW), "adam_beta2": ((0.999,), _ADAMW), "adam_epsilon": ((1e-8,), _ADAMW),
    "optim": (("adamw_torch", "adamw_torch_fused"), _ADAMW), "optim_args": ((), _ADAMW),
    "optim_target_modules": ((), _ADAMW),
    "auto_find_batch_size": ((False,), "set per_device_train_batch_size"),
    "average_tokens_across_devices": ((True,), "posttrain's losses are token means over the global batch"),
    "batch_eval_metrics": ((False,), _EVAL), "bf16_full_eval": ((False,), _EVAL), "fp16_full_eval": ((False,), _EVAL),
    "eval_accumulation_steps": (ANY, _EVAL), "eval_delay": ((0, 0.0), _EVAL), "eval_do_concat_batches": (ANY, _EVAL),
    "eval_on_start": ((False,), _EVAL), "eval_use_gather_object": (ANY, _EVAL), "include_for_metrics": ((), _EVAL),
    "per_device_eval_batch_size": (ANY, _EVAL), "prediction_loss_only": (ANY, _EVAL), "label_names": ((), _EVAL),
    "metric_for_best_model": ((), _EVAL), "greater_is_better": ((), _EVAL),
    "load_best_model_at_end": ((False,), "posttrain saves the final model; pick a checkpoint-STEP folder yourself"),
    "data_seed": ((), "posttrain's seed also orders the data"),
    "full_determinism": ((False,), "runs are deterministic in seed on one process already"),
    "dataloader_drop_last": ((False,), "sft, rm and dpo use every row of each epoch"),
    "dataloader_num_workers": (ANY, _LOADER), "dataloader_persistent_workers": (ANY, _LOADER),
    "dataloader_pin_memory": (ANY, _LOADER), "dataloader_prefetch_factor": (ANY, _LOADER),
    "dataloader_multiprocessing_context": (ANY, _LOADER), "dataloader_in_order": (ANY, _LOADER),
    "remove_unused_columns": (ANY, "posttrain keeps the columns it needs; a prompt row's other fields reach reward functions"),
    "length_column_name": (ANY, "posttrain measures lengths itself (group_by_length)"),
    "train_sampling_strategy": (("random",), "use group_by_length true for length-grouped batches"),
    "ddp_backend": (ANY, _DDP), "ddp_broadcast_buffers": (ANY, _DDP), "ddp_bucket_cap_mb": (ANY, _DDP),
    "ddp_find_unused_parameters": (ANY, _DDP), "ddp_static_graph": (ANY, _DDP), "ddp_timeout": (ANY, _DDP),
    "local_rank": (ANY, "posttrain reads LOCAL_RANK from torchrun's environment"),
    "parallelism_config": ((), "use --fsdp true under torchrun"),
    "deepspeed": ((), "use --fsdp true under torchrun (FSDP2 shards weights, gradients and optimizer state)"),
    "fsdp_config": ((), "posttrain's --fsdp shards per decoder layer and takes no config"),
    "debug": (("",), _NO),
    "do_train": (ANY, "posttrain always trains"), "do_eval": (ANY, _EVAL),
    "do_predict": ((False,), "use posttrain eval / posttrain generate"),
    "enable_jit_checkpoint": (ANY, "posttrain always saves a checkpoint on SIGTERM"),
    "fp16": ((False,), "use bf16 (bfloat16 autocast) or dtype bfloat16"),
    "tf32": ((False,), "posttrain keeps fp32 matmuls in full precision; use bf16 for speed"),
    "gradient_checkpointing_kwargs": (ANY, "posttrain checkpoints every decoder layer with transformers' defaults"),
    "activation_checkpointing_kwargs": (ANY, "posttrain checkpoints every decoder layer with transformers' defaults"),
    "push_to_hub": ((False,), _HUB), "hub_model_id": ((), _HUB), "hub_strategy": ((), _HUB), "hub_token": ((), _HUB),
    "hub_private_repo": ((), _HUB), "hub_always_push": ((), _HUB), "hub_revision": ((), _HUB),
    "ignore_data_skip": ((False,), "a resumed run always continues at the saved data position"),
    "include_num_input_tokens_seen": (("no", False), "num_tokens is logged for sft"),
    "label_smoothing_factor": ((0, 0.0), "dpo: use label_smoothing"),
    "use_liger_kernel": ((False,), "posttrain computes log-probs over chunks of positions itself"),
    "liger_kernel_config": ((), "posttrain computes log-probs over chunks of positions itself"),
    "log_level": (ANY, "posttrain prints one line per problem"), "log_level_replica": (ANY, "only rank 0 logs"),
    "log_on_each_node": (ANY, "only rank 0 logs"),
    "logging_nan_inf_filter": (ANY, "non-finite steps are skipped and counted in nonfinite_steps"),
    "logging_first_step": ((False,), "posttrain logs every logging_steps and the last step; use logging_steps 1"),
    "logging_strategy": (("steps",), "posttrain logs every logging_steps"),
    "neftune_noise_alpha": ((), "no embedding noise (NEFTune) in posttrain; drop the flag"),
    "project": ((), "metrics go to output_dir/metrics.jsonl and plots/"),
    "trackio_space_id": ((), "metrics go to output_dir/metrics.jsonl and plots/"),
    "trackio_bucket_id": ((), "metrics go to output_dir/metrics.jsonl and plots/"),
    "trackio_static_space_id": ((), "metrics go to output_dir/metrics.jsonl and plots/"),
    "restore_callback_states_from_checkpoint": ((False,), "posttrain has no callbacks"),
    "save_on_each_node": ((False,), "rank 0 saves"),
    "save_only_model": ((False,), "checkpoints hold the optimizer state so that a run resumes exactly"),
    "skip_memory_metrics": (ANY, "summary.json records peak_rss_mb"),
    "torch_compile": ((False,), _NO), "torch_compile_backend": ((), _NO), "torch_compile_mode": ((), _NO),
    "torch_empty_cache_steps": (ANY, "posttrain leaves the CUDA cache to torch"),
    "use_cache": (ANY, "training forwards never use the KV cache; rollouts always do"),
    "use_cpu": ((False,), "posttrain uses CUDA when there is a GPU; run with CUDA_VISIBLE_DEVICES= for the CPU"),
    # TRL's model, script and dataset arguments
    "model_revision": (("main",), "posttrain reads local model folders only"),
    "trust_remote_code": ((False,), "posttrain never runs code from a model folder"),
    "model_init_kwargs": ((), "use dtype and attn_implementation"),
    "load_in_4bit": ((False,), _QUANT), "load_in_8bit": ((False,), _QUANT), "bnb_4bit_quant_type": (ANY, _QUANT),
    "use_bnb_nested_quant": ((False,), _QUANT), "bnb_4bit_quant_storage": (ANY, _QUANT),
    "use_rslora": ((False,), _NO), "use_dora": ((False,), _NO), "lora_modules_to_save": ((), _NO),
    "lora_target_parameters": ((), "use lora_target_modules"), "lora_task_type": (ANY, "posttrain picks it per stage"),
    "dataset_streaming": ((False,), "posttrain reads local files whole"),
    "datasets": ((), "give one local file or datasets folder as dataset_name"),
    "dataset_text_field": (("text",), "plain-text rows are posttrain sft's; rm and dpo read chosen / rejected, ppo and grpo prompt"),
    "dataset_kwargs": ((), _NO), "dataset_num_proc": (ANY, _LOADER), "ignore_bias_buffers": (ANY, _DDP),
    "shuffle_dataset": ((True,), "posttrain always shuffles, in seed"),
    # SFT, DPO, reward
    "packing": ((False,), "use padding_free true (rows concatenated without padding)"),
    "packing_strategy": ((), "use padding_free true"), "eval_packing": ((), _EVAL),
    "pad_to_multiple_of": (ANY, "padding never changes posttrain's losses"),
    "pad_token": ((), "posttrain picks a distinct pad token itself (see README)"),
    "truncation_mode": ((), "posttrain truncates by its own policy (README, Truncation)"),
    "loss_type": (("nll",), "posttrain sft trains with the NLL"),
    "activation_offloading": ((False,), "use gradient_checkpointing"),
    "router_aux_loss_coef": ((), _NO),
    "precompute_ref_batch_size": (ANY, "the reference is scored one micro-batch at a time"),
    "loss_weights": ((), _NO), "ld_alpha": ((), _NO), "f_divergence_type": ((), _NO), "f_alpha_divergence_coef": ((), _NO),
    "use_weighting": ((False,), _NO), "discopop_tau": ((), _NO),
    "sync_ref_model": ((False,), "the reference stays the starting policy (or ref_model_name_or_path)"),
    "ref_model_mixup_alpha": (ANY, "only with sync_ref_model, which posttrain does not support"),
    "ref_model_sync_steps": (ANY, "only with sync_ref_model, which posttrain does not support"),
    # GRPO and PPO
    "use_vllm": ((False,), _VLLM), **{name: ((), _VLLM) for name in (
        "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex", "vllm_server_base_url",
        "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization",
        "vllm_max_model_length", "vllm_tensor_parallel_size", "vllm_importance_sampling_correction",
        "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
        "vllm_importance_sampling_cap")},
    "use_transformers_continuous_batching": ((False,), _VLLM), "transformers_continuous_batching_config": ((), _VLLM),
    "use_transformers_paged": ((False,), _VLLM), "cache_implementation": (ANY, "rollouts use transformers' default KV cache"),
    "ds3_gather_for_generation": (ANY, "only with deepspeed, which posttrain does not support"),
    "generation_batch_size": ((), "one rollout batch (per_device_train_batch_size prompts x num_generations) per step"),
    "steps_per_generation": ((), "one rollout batch per optimizer step; use num_iterations to reuse it"),
    "generation_kwargs": ((), "use temperature, top_k, top_p and min_p"), "chat_template_kwargs": ((), _NO),
    "cast_lm_head_to_fp32": ((False,), "log-probs are taken in fp32 from fp32 weights unless dtype is bfloat16"),
    "num_generations_eval": (ANY, "the in-training evaluation is greedy, one completion per prompt"),
    "reward_clip_range": ((), "use reward_clip c (the symmetric range [-c, c])"), "vespo_k_pos": ((), _NO),
    "vespo_lambda_pos": ((), _NO), "vespo_k_neg": ((), _NO), "vespo_lambda_neg": ((), _NO),
    "multi_objective_aggregation": ((), "rewards are summed with reward_weights, then group-normalised"),
    "top_entropy_quantile": ((1, 1.0), _NO), "entropy_coef": ((0, 0.0), "only posttrain ppo has an entropy bonus"),
    "use_adaptive_entropy": ((False,), _NO), "entropy_coef_min": (ANY, _NO), "entropy_coef_max": (ANY, _NO),
    "entropy_coef_delta": (ANY, _NO), "entropy_target": (ANY, _NO), "max_tool_calling_iterations": ((), _NO),
    "off_policy_mask_threshold": ((), _NO), "log_multimodal": (ANY, "text only"),
    "num_completions_to_print": (ANY, "use log_completions (completions.jsonl)"), "log_unique_prompts": (ANY, "use log_completions"),
    "log_completions_hub_repo": ((), _HUB),
    "total_episodes": ((), "use max_steps (rollout batches of per_device_train_batch_size prompts per process) or num_train_epochs"),
    "local_rollout_forward_batch_size": (ANY, "rollouts are scored one batch at a time"),
    "num_sample_generations": (ANY, "use log_completions (completions.jsonl)"),
    "stop_token_id": ((), "completions stop at the tokenizer's EOS; set eos_token in the model folder"),
    "model_adapter_name": ((), _NO), "ref_adapter_name": ((), _NO),
    # GKD
    "teacher_model_init_kwargs": ((), "the teacher is loaded with dtype and attn_implementation, as the student"),
    # CPO and ORPO
    "generate_during_eval": ((False,), "sample from output_dir with posttrain generate"),
    "is_encoder_decoder": ((False,), "posttrain trains causal language models"),
    "padding_value": (ANY, "padding never changes posttrain's losses"),
    "alpha": ((0, 0.0), "AlphaPO's reward shape is not supported; posttrain cpo's rewards are β·log π(y)"),
}


# ------------------------------------------------------------------ TRL's defaults

# TRL's trainer configs (SFTConfig, RewardConfig, DPOConfig, GRPOConfig, RLOOConfig, KTOConfig, experimental OnlineDPOConfig,
# GKDConfig, CPOConfig, ORPOConfig) and
# ModelConfig: their defaults where posttrain's differ. bf16 None is `not fp16`, i.e. true (trl/trainer/base_config.py);
# lora_target_modules None is peft's per-model list (q_proj, v_proj for Llama / Qwen2).
_TRL_TRAINER_DEFAULTS = {
    "eval_strategy": "no", "lr_scheduler_type": "linear", "num_train_epochs": 3.0, "save_steps": 500,
    "save_total_limit": None, "gradient_checkpointing": True, "bf16": True, "lora_dropout": 0.05, "lora_target_modules": None,
}
# stage -> field -> TRL 1.16's default, for each field whose posttrain default differs (tests/test_trl_cli.py reads
# TRL's classes to keep this true). posttrain keeps its own (the demo is tuned to them) and start_output prints, once,
# the ones a run left at default (trl_default_notice). TRL 1.16 has no PPO trainer: ppo compares with transformers'
# TrainingArguments, which TRL's trainers extend.
TRL_DEFAULTS: dict = {
    "sft": {**_TRL_TRAINER_DEFAULTS, "max_length": 1024, "assistant_only_loss": False},
    "rm": {**_TRL_TRAINER_DEFAULTS, "max_length": 1024},
    "dpo": {**_TRL_TRAINER_DEFAULTS, "max_length": 1024, "learning_rate": 1e-6},
    "grpo": {**_TRL_TRAINER_DEFAULTS, "max_completion_length": 512, "beta": 0.0, "loss_type": "dapo",
             "use_bias_correction_kl": True, "disable_dropout": False},
    "rloo": {**_TRL_TRAINER_DEFAULTS, "max_completion_length": 512, "disable_dropout": False},
    "online_dpo": {**_TRL_TRAINER_DEFAULTS, "learning_rate": 5e-7},
    # trl.experimental.gkd.GKDConfig (an SFTConfig): lmbda, beta and temperature are posttrain's too
    "distill": {**_TRL_TRAINER_DEFAULTS, "max_length": 1024, "assistant_only_loss": False},
    "cpo": {**_TRL_TRAINER_DEFAULTS, "max_length": 1024, "learning_rate": 1e-6},  # trl.experimental's CPOConfig
    "orpo": {**_TRL_TRAINER_DEFAULTS, "max_length": 1024, "learning_rate": 1e-6},  # trl.experimental's ORPOConfig
    "ppo": {"eval_strategy": "no", "learning_rate": 5e-5, "lr_scheduler_type": "linear", "num_train_epochs": 3.0,
            "logging_steps": 500, "save_steps": 500, "save_total_limit": None, "lora_dropout": 0.05, "lora_target_modules": None},
}
TRL_DEFAULTS["kto"] = {**_TRL_TRAINER_DEFAULTS, "max_length": 1024, "learning_rate": 1e-6}  # trl.KTOConfig
# what the notice calls the source of a stage's table: (in each item, in its head); TRL otherwise
_TRL_DEFAULTS_SOURCE = {"ppo": ("transformers", "transformers' TrainingArguments' (TRL 1.16 has no PPO trainer)")}
# fields that change nothing unless another is on: a notice about them only then
_TRL_DEFAULTS_APPLY = {"lora_dropout": "use_peft", "lora_target_modules": "use_peft"}


def _shown(value) -> str:
    """A value as a flag takes it (true / false, not True / False)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def trl_default_notice(stage: str, cfg, given) -> str:
    """One line naming the fields a run left at posttrain's default where TRL's differs, `field=posttrain_value
    (TRL: trl_value)`, or '' when there is none. ``given``: the fields the user set (YAML or flags, TRL names included)."""
    source, head = _TRL_DEFAULTS_SOURCE.get(stage, ("TRL", "TRL's"))
    differ = [f"{name}={_shown(getattr(cfg, name))} ({source}: {_shown(theirs)})"
              for name, theirs in TRL_DEFAULTS[stage].items()
              if name not in given and getattr(cfg, name) != theirs
              and (name not in _TRL_DEFAULTS_APPLY or getattr(cfg, _TRL_DEFAULTS_APPLY[name]))]
    if not differ:
        return ""
    return f"posttrain: note: posttrain's defaults where {head} differ (set a field to change it): " + ", ".join(differ)


def _same(value, accepted) -> bool:
    """A TRL value (a flag's string or a YAML value) equals one posttrain behaves as."""
    try:
        if isinstance(accepted, bool):
            return str(value).lower() in (("true", "1", "yes") if accepted else ("false", "0", "no", "none", ""))
        if isinstance(accepted, (int, float)):
            return not isinstance(value, bool) and float(value) == float(accepted)
    except (TypeError, ValueError):
        return False
    return str(value) == accepted


def _trl_unsupported(stage: str, key: str, value, where: str) -> None:
    """A TRL name posttrain has no field for: a one-line notice when the value changes nothing, else a UserError."""
    import sys

    accepted, instead = TRL_UNSUPPORTED[key]
    if accepted is ANY:
        print(f"posttrain: note: {where}: {key} is ignored ({instead})", file=sys.stderr)
    elif any(_same(value, a) for a in accepted):
        print(f"posttrain: note: {where}: {key} {value} is posttrain's behaviour already; ignored", file=sys.stderr)
    else:
        raise UserError(f"{where}: posttrain {stage} does not support {key}" + (f" {value}" if accepted else "") +
                        f"; {instead}")


def trl_flags(stage: str) -> dict[str, str]:
    """TRL names a stage's command line also takes: alias or unsupported name -> its target field (or itself)."""
    names = {f.name for f in dataclasses.fields(STAGE_CONFIGS[stage])}
    flags = {k: v[0] for k, v in TRL_ALIASES.items() if v[0] in names and (v[2] is None or stage in v[2]) and k not in names}
    flags.update({k: k for k in TRL_UNSUPPORTED if k not in names})
    return flags


# `accelerate launch` options, which TRL's command line passes on to accelerate (`--accelerate_config` is TRL's name of
# its --config_file); posttrain is launched by torchrun and reads none of them
ACCELERATE_LAUNCH_OPTIONS = (
    "accelerate_config", "config_file", "num_processes", "num_machines", "machine_rank", "main_process_ip",
    "main_process_port", "multi_gpu", "gpu_ids", "mixed_precision", "same_network", "rdzv_backend", "rdzv_conf",
    "num_cpu_threads_per_process", "dynamo_backend", "use_deepspeed", "use_fsdp", "deepspeed_config_file", "zero_stage",
    "max_restarts", "monitor_interval", "main_training_function",
)


def launcher_message(stage: str, flag: str) -> str:
    """The line for an accelerate launcher option given to a stage: launch with torchrun (README, Scaling)."""
    config = "; a YAML file of fields is --config" if flag.endswith(("config_file", "accelerate_config")) else ""
    return (f"{flag} is an accelerate launcher option, and posttrain {stage} is launched with torchrun instead: "
            f"torchrun --standalone --nproc_per_node N -m posttrain {stage} ... (README: Scaling){config}")


def unknown_field_message(stage: str, key, where: str | None = None, also: tuple = ()) -> str:
    """`--key: unknown field ...` (a flag) or `where: unknown field 'key' ...` (YAML), with the closest
    valid field (or name in ``also``, e.g. the `config` flag)."""
    names = [f.name for f in dataclasses.fields(STAGE_CONFIGS[stage])] + list(also)
    text = str(key)
    if text in ACCELERATE_LAUNCH_OPTIONS:
        return launcher_message(stage, f"--{text}" if where is None else f"{where}: {text}")
    match = difflib.get_close_matches(text, names, n=1)
    flag = where is None
    head = f"--{text}: unknown field for posttrain {stage}" if flag else f"{where}: unknown field {text!r} for posttrain {stage}"
    if match:
        return f"{head}; did you mean {'--' if flag else ''}{match[0]}?"
    owners = [s for s, c in STAGE_CONFIGS.items() if text in {f.name for f in dataclasses.fields(c)}]
    if owners:
        return f"{head} (it is a field of posttrain {' / '.join(owners)})"
    if text in TRL_ALIASES and TRL_ALIASES[text][2]:
        target, _, stages = TRL_ALIASES[text]
        return f"{head} (TRL's {text} is posttrain {' / '.join(stages)}'s {target})"
    return f"{head} (see posttrain {stage} --help)"


_CHOICES = {
    "lr_scheduler_type": ("cosine", "linear", "constant", "cosine_with_min_lr"),
    "save_strategy": ("steps", "epoch", "no"),
    "dtype": ("float32", "bfloat16", "auto"),
    "attn_implementation": ("", "sdpa", "eager", "flash_attention_2"),
    "logps_normalization": ("sum", "mean"),
    "kl_estimator": ("k1", "k2", "k3", "k3_plus"),
    "advantage_estimator": ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"),
    "importance_sampling_level": ("token", "sequence"),
    "critic": ("separate", "shared"),
    "generation_cache": ("dynamic", "static"),
    "scale_rewards": ("group", "batch", "none"),
    "eval_strategy": ("no", "steps", "epoch"),
}
_LOSS_TYPES = {"dpo": ("sigmoid", "ipo", "hinge"), "grpo": ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "rloo")}
_LOSS_TYPES["rloo"] = _LOSS_TYPES["grpo"]
_LOSS_TYPES["online_dpo"] = ("sigmoid", "ipo")
_LOSS_TYPES["kto"] = ("kto", "apo_zero_unpaired")
_LOSS_TYPES["dpo"] += ("robust", "bco_pair", "apo_zero", "sppo_hard", "nca_pair", "exo_pair")
_LOSS_TYPES["cpo"] = ("sigmoid", "hinge", "ipo", "simpo")


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
    "warmup_steps": _ge(0),
    "min_lr_rate": _within(0, 1, closed_high=True),
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
    "beta": {"dpo": _gt(0), "grpo": _ge(0), "rloo": _ge(0), "online_dpo": _gt(0), "distill": _within(0, 1, closed_high=True),
             "cpo": _gt(0), "orpo": _gt(0)},
    "lmbda": _within(0, 1, closed_high=True),
    "teacher_top_k": _ge(0),
    "label_smoothing": _within(0, 0.5),
    "rpo_alpha": _ge(0),
    "center_rewards_coefficient": _ge(0),
    "temperature": _gt(0),
    "top_k": _ge(0),
    "max_completion_length": {"ppo": _ge(1), "grpo": _ge(1), "rloo": _ge(1), "dpo": _ge(0), "cpo": _ge(0), "orpo": _ge(0),
                              "online_dpo": _ge(1), "distill": _ge(1)},
    "cpo_alpha": _ge(0),
    "simpo_gamma": _ge(0),
    "top_p": (lambda v, cfg: 0 < v <= 1, "in (0, 1]"),
    "min_p": _within(0, 1),
    "repetition_penalty": (lambda v, cfg: v == 1.0, "1.0 (a penalty would make the sampled distribution differ from "
                           "the scored softmax(z/T))"),
    "stop_token": (lambda v, cfg: v == "eos", "eos (completions stop at the tokenizer's EOS)"),
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
    "delta": (lambda v, cfg: v == 0 or v > 1, "0 (off) or > 1 (a bound below 1 would clip unchanged tokens)"),
    "clip_ratio_c": (lambda v, cfg: v == 0 or v > 1, "0 (off) or > 1 (Ye et al. use 3)"),
    "sapo_temperature_pos": _gt(0),
    "sapo_temperature_neg": _gt(0),
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
    "max_turns": _ge(0),
    "max_tool_response_length": _ge(0),
    "tool_timeout_s": _ge(0),
}
# kto
_RANGES["beta"] = {**_RANGES["beta"], "kto": _gt(0)}
_RANGES["desirable_weight"] = _ge(0)
_RANGES["undesirable_weight"] = _ge(0)
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
        cfg.logps_normalization = "mean" if set(cfg.loss_type) == {"ipo"} else "sum"
    for name, valid in _CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in valid:
            raise UserError(f"{_field(name, sources)}: {getattr(cfg, name)!r} is not one of {', '.join(valid)}")
    if stage in _LOSS_TYPES:
        for loss_type in cfg.loss_type if isinstance(cfg.loss_type, list) else [cfg.loss_type]:  # dpo's is TRL's list
            if loss_type not in _LOSS_TYPES[stage]:
                raise UserError(f"{_field('loss_type', sources)}: {loss_type!r} is not one of {', '.join(_LOSS_TYPES[stage])}")
    if stage == "dpo":
        _check_dpo_loss_types(cfg, sources)
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
    if stage in RL_STAGES and cfg.save_strategy == "epoch":
        raise UserError(f"{_field('save_strategy', sources)}: epoch applies to sft, rm and dpo; posttrain {stage} "
                        "saves every save_steps rollout batches")
    if stage in RL_STAGES and cfg.reward_weights:
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
    if stage in ("grpo", "rloo"):
        _check_critic_free(cfg, sources)
    if check_paths:
        _check_paths(cfg, sources)


def _check_dpo_loss_types(cfg, sources: dict | None) -> None:
    """A list of DPO loss types (TRL's loss_type list) with its weights; exo_pair's target needs label_smoothing > 0."""
    if not cfg.loss_type:
        raise UserError(f"{_field('loss_type', sources)}: give at least one loss type")
    if cfg.loss_weights and len(cfg.loss_weights) != len(cfg.loss_type):
        raise UserError(f"{_field('loss_weights', sources)} has {len(cfg.loss_weights)} values for "
                        f"{len(cfg.loss_type)} loss types ({', '.join(cfg.loss_type)})")
    if "exo_pair" in cfg.loss_type and cfg.label_smoothing <= 0:
        raise UserError(f"{_field('label_smoothing', sources)}: loss_type exo_pair needs label_smoothing > 0 "
                        "(its target distribution; the EXO paper uses 1e-3)")


def _check_critic_free(cfg, sources: dict | None) -> None:
    """The combinations of advantage estimator, policy loss and KL placement that have a meaning."""
    token_advantages = cfg.advantage_estimator.startswith("reinforce_pp")
    if cfg.advantage_estimator != "grpo" and sources and "scale_rewards" in sources:
        raise UserError(f"{_field('scale_rewards', sources)} applies to advantage_estimator grpo, not "
                        f"{cfg.advantage_estimator} (see normalize_advantages)")
    if cfg.normalize_advantages and token_advantages:
        raise UserError(f"{_field('normalize_advantages', sources)}: {cfg.advantage_estimator} whitens its advantages already")
    if cfg.loss_type == "rloo" and token_advantages:
        raise UserError(f"{_field('loss_type', sources)}: rloo needs one advantage per completion; "
                        f"{cfg.advantage_estimator} gives one per token")
    if cfg.loss_type == "rloo" and cfg.importance_sampling_level != "token":
        raise UserError(f"{_field('importance_sampling_level', sources)}: loss_type rloo has a ratio per completion already")
    if cfg.loss_type == "cispo" and cfg.epsilon_high <= 1:
        raise UserError(f"{_field('epsilon_high', sources)}: loss_type cispo needs epsilon_high > 1, the bound of its "
                        f"ratio itself (TRL's ε_max, e.g. 5.0), got {cfg.epsilon_high}")
    if (cfg.delta or cfg.clip_ratio_c) and cfg.loss_type in ("cispo", "sapo"):
        name = "delta" if cfg.delta else "clip_ratio_c"
        raise UserError(f"{_field(name, sources)} applies to the clipped losses, not loss_type {cfg.loss_type}")
    if cfg.kl_in_reward and cfg.use_bias_correction_kl:
        raise UserError(f"{_field('use_bias_correction_kl', sources)} corrects a KL loss term; kl_in_reward puts the KL in the reward")
    if cfg.advantage_estimator == "remax" and cfg.rollout_engine != "hf":
        raise UserError(f"{_field('advantage_estimator', sources)}: remax samples its greedy baseline with rollout_engine hf")


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


_MODEL_FIELDS = ("model_name_or_path", "ref_model_name_or_path", "reward_model_name_or_path", "critic_model_name_or_path",
                 "teacher_model_name_or_path")
_DATA_FIELDS = ("dataset_name", "eval_dataset_name")


def _check_paths(cfg, sources: dict | None) -> None:
    """Models and data the run reads exist locally; output_dir is (or can be made) a writable folder."""
    if hasattr(cfg, "teacher_model_name_or_path") and not cfg.teacher_model_name_or_path:
        raise UserError("field 'teacher_model_name_or_path' is required for `posttrain distill` (the frozen teacher)")
    for name in _MODEL_FIELDS:
        path = getattr(cfg, name, "")
        tiny = name == "model_name_or_path" and path == "tiny"
        if not path or (tiny and hasattr(cfg, "tiny_hidden_size")):
            continue
        if not Path(path, "config.json").is_file() and not Path(path, "adapter_config.json").is_file():
            hint = "; only posttrain sft builds the embedded tiny model" if tiny else ""
            raise UserError(f"{_field(name, sources)}: {path!r} is not a local model folder (no config.json); "
                            f"posttrain never downloads models{hint}")
        if name == "reward_model_name_or_path":
            from posttrain.models import require_scalar_head

            require_scalar_head(path, _field(name, sources))  # a causal LM would score every completion 0
    for name in _DATA_FIELDS:
        path = getattr(cfg, name, "")
        if path and not Path(path).exists():
            raise UserError(f"{_field(name, sources)}: {path!r} does not exist (a .jsonl, .jsonl.gz, .json, .parquet "
                            "or .csv file, a folder holding one, a datasets save_to_disk folder or a hub snapshot folder)")
        if path:
            from posttrain.data import split_files

            split = cfg.dataset_train_split if name == "dataset_name" else cfg.dataset_test_split
            split_files(path, split, _field(name, sources), cfg.dataset_config)  # layout, config, split, before any model loads
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
