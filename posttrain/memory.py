"""Pre-flight memory estimate: what one device needs for a run, worked out before any weight is loaded.

Every stage gets it from the shared set-up in training.py: on CUDA
``preflight`` (from ``setup_run``, before any weight loads) stops a run whose
estimate exceeds the free device memory, with one line saying what to change;
``report`` (from ``start_output``, as training starts) prints it as a short
table (rank 0, stderr).

The parts, per device:

- weights: every parameter in the dtype it loads in (``load_dtype``: `dtype`,
  for ``auto`` the checkpoint's own torch_dtype); bf16 autocast (`bf16: true`)
  computes in bf16 over fp32 weights and caches a bf16 copy of each trained
  weight while it runs. LoRA adapters are float32 whatever the base's dtype
  (peft upcasts them);
- gradients: trainable parameters only (LoRA: the adapters), in their dtype;
- optimizer state: AdamW's two moments per trainable parameter, in its dtype
  (torch keeps them like the parameter). With fp32 weights being their own
  master copy this is the 4 + 4 + 8 = 16 bytes per trained parameter of the
  ZeRO paper's accounting (Rajbhandari et al., arXiv 1910.02054, §3.1);
  `dtype: bfloat16` trains the bf16 weights themselves, 2 + 2 + 4 = 8 bytes.
  FSDP (ZeRO-3) divides weights, gradients and optimizer state by the world
  size, DDP keeps a second gradient copy in its reduction buckets;
- frozen copies at their load dtype: the reference (`dtype`; none for cpo and
  orpo, whose losses are reference-free, nor for dpo with precompute_ref_log_probs), reward model(s)
  (float32, as rewards.py loads them), and a separate PPO critic (`dtype`,
  trained like the policy);
- activations of one micro-batch (see ``layer_activation_bytes``), for the
  micro-batch rows and the configured length (the longest a row may be: real
  batches are usually shorter), or under gradient checkpointing the layer
  inputs plus one layer's activations being recomputed;
- logits: the LM head and the log-softmax are computed over chunks of
  positions of about 2^25 logits (``losses.head_chunk_tokens``), so one chunk
  is counted (with its gradient), not B x T x V.
  Where ``models.chunkable_head`` refuses the head (a family with soft-capped
  or scaled logits, LoRA on lm_head, an FSDP2-sharded head) the model's own
  (B, T, V) logits and their float32 log-softmax copy are counted instead;
- RL stages: the rollout's KV cache (generation runs under no_grad before
  the update, so the peak is the larger of it and the training activations),
  in the weights' dtype (sampling runs outside autocast).
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import distributed
from posttrain.errors import UserError
from posttrain.losses import head_chunk_tokens
from posttrain.models import PLAIN_HEAD_MODEL_TYPES

FP32, BF16 = 4, 2
LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the `dtype` field's fixed choices
TINY_VOCAB = 259  # the embedded tokenizer: 256 byte symbols + pad, eos, im_start


@dataclass
class ModelShape:
    """What the estimate reads from a model's config (counted on the meta device: no memory, no weights)."""

    params: int
    lora_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: torch.dtype = torch.float32  # of the weights as loaded
    model_type: str = ""
    lora_head: bool = False  # LoRA adapts lm_head (only when named: peft's all-linear leaves the output layer out)

    @property
    def weight_bytes(self) -> int:
        return self.dtype.itemsize


def load_dtype(dtype: str, config) -> torch.dtype:
    """The dtype ``models.load_causal_lm`` / ``load_scalar_model`` load the weights in for the `dtype` field: ``auto``
    is the checkpoint's own (config.json's torch_dtype; float32, the larger guess, when it names none)."""
    if dtype != "auto":
        return LOAD_DTYPES[dtype]
    own = getattr(config, "dtype", None)
    own = getattr(torch, own, None) if isinstance(own, str) else own
    return own if isinstance(own, torch.dtype) and own.is_floating_point else torch.float32


def model_shape(config, scalar: bool = False, lora_r: int = 0, lora_targets: str = "all-linear",
                dtype: str = "float32") -> ModelShape:
    """Parameter counts of the model ``config`` describes, loaded as ``dtype`` (a `dtype` field value); ``lora_r`` > 0
    also counts LoRA's r·(in + out) per adapted linear."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if scalar:
            config = copy.deepcopy(config)
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    lora, lora_head = 0, False
    if lora_r:
        targets = None if lora_targets == "all-linear" else {t.strip() for t in lora_targets.split(",")}
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if not isinstance(module, torch.nn.Linear) or leaf == "score" or (targets is None and leaf == "lm_head"):
                continue
            if targets is None or leaf in targets:
                lora += lora_r * (module.in_features + module.out_features)
                lora_head = lora_head or leaf == "lm_head"
    heads = config.num_attention_heads
    return ModelShape(params, lora, config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size),
                      config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads,
                      config.vocab_size, load_dtype(dtype, config), getattr(config, "model_type", ""), lora_head)


def layer_activation_bytes(shape: ModelShape, bf16: bool) -> int:
    """Bytes one decoder layer keeps for its backward pass, per token (weights and their bf16 copies not counted).

    Korthikanti et al., "Reducing Activation Recomputation in Large
    Transformer Models" (arXiv 2205.05198, §4.1), count the tensors a layer
    saves for its backward: 34·s·b·h bytes for a GPT layer in fp16 with
    dropout, plus 5·a·s²·b for the attention scores. The same count for the
    pre-norm SwiGLU decoder layer of Llama / Qwen2 / Mistral as transformers
    runs it, with dropout off (as every posttrain stage sets it) and fused
    attention (SDPA keeps q, k, v, a log-sum-exp per head and its output,
    never the s x s scores), per token:

    - each RMSNorm (two), in float32: its input, the normalised value and
      1/rms; in fp32 also the output, which the projections read as it is;
    - rotary embedding: cos and sin (2·head_dim, float32);
    - attention: q (h), k and v (2·h_kv), the log-sum-exp (heads, float32),
      SDPA's output (h, which o_proj reads);
    - MLP: gate output, SiLU output, up output and their product (4·i);
    - under bf16 autocast every projection casts its input on its own: q, k, v
      each keep a bf16 copy of the norm's output (3h), gate and up another (2h).

    With 16-bit weights (`dtype: bfloat16`, autocast or not) everything is in
    that dtype but the norms' float32 working: each keeps its input upcast and
    1/rms in float32, the normalised value cast back (h) and its output (h)
    in the weights' dtype; cos and sin follow the weights' dtype too.

    `tests/test_memory.py` checks this count against the tensors autograd
    actually saves.
    """
    h, i, heads = shape.hidden, shape.intermediate, shape.heads
    kv, head_dim = h * shape.kv_heads // heads, h // heads
    attention_mlp = h + 2 * kv + h + 4 * i
    if shape.weight_bytes < FP32:
        fp32_values = 2 * (h + 1) + heads
        return fp32_values * FP32 + (2 * 2 * h + 2 * head_dim + attention_mlp) * shape.weight_bytes
    fp32_values = 2 * (2 * h + 1) + 2 * head_dim + heads + (0 if bf16 else 2 * h)
    compute_values = attention_mlp + (5 * h if bf16 else 0)
    return fp32_values * FP32 + compute_values * compute_bytes(shape, bf16)


def compute_bytes(shape: ModelShape, bf16: bool) -> int:
    """Bytes of one activation value: bf16 under autocast, else the weights' own dtype."""
    return BF16 if bf16 else shape.weight_bytes


def activation_bytes(shape: ModelShape, tokens: int, bf16: bool, checkpointing: bool) -> int:
    """Activations of one micro-batch of ``tokens`` positions kept for the backward pass through the decoder."""
    layer = layer_activation_bytes(shape, bf16)
    if checkpointing:  # each layer keeps only its input (the residual stream, in the weights' dtype); one layer is recomputed
        return tokens * (shape.layers * shape.hidden * shape.weight_bytes + layer)
    return tokens * shape.layers * layer


def logits_bytes(shape: ModelShape, scored_tokens: int, bf16: bool, full: bool = False, head_trained: bool = False) -> int:
    """One chunk of LM-head logits (losses.head_chunk_tokens positions), or with ``full`` all ``scored_tokens`` of them
    (the model's own logits, see ``full_logits``): the head's output (compute dtype), the float32 copy the
    log-softmax reads, and the gradients of both.

    A trained head's chunked backward (``losses.chunked_head_logps``) also sums its weight gradient over the chunks
    in float32: a (V, H) float32 sum where the weights are 16-bit (an fp32 weight's sum is its gradient itself), and
    each chunk's (V, H) product in the compute dtype where that is not float32 (fp32 accumulates in place).
    """
    compute = compute_bytes(shape, bf16)
    positions = scored_tokens if full else min(scored_tokens, head_chunk_tokens(shape.vocab))
    head_gradient = 0
    if head_trained and not full:
        head_gradient = shape.vocab * shape.hidden * ((FP32 if shape.weight_bytes < FP32 else 0) +
                                                      (compute if compute < FP32 else 0))
    return positions * shape.vocab * 2 * (compute + FP32) + head_gradient


def full_logits(cfg, shape: ModelShape) -> bool:
    """Whether ``models.token_logps`` takes the model's own (B, T, V) logits, ``models.chunkable_head`` refusing its
    head: a family whose logits are more than lm_head's output, LoRA on lm_head, or a head FSDP2 shards."""
    return shape.model_type not in PLAIN_HEAD_MODEL_TYPES or shape.lora_head or (cfg.fsdp and distributed.world_size() > 1)


def _read_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def _shape_of(cfg, path: str, scalar: bool = False, lora: bool = False, dtype: str | None = None) -> ModelShape | None:
    """The shape of the model at ``path`` (the embedded tiny model from the tiny_* fields), loaded as ``dtype`` (the
    `dtype` field when None), or None when unreadable."""
    try:
        if path == "tiny" and hasattr(cfg, "tiny_hidden_size"):
            from transformers import Qwen2Config

            config = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=cfg.tiny_hidden_size,
                                 num_hidden_layers=cfg.tiny_num_layers, num_attention_heads=cfg.tiny_num_heads,
                                 num_key_value_heads=cfg.tiny_num_heads, intermediate_size=cfg.tiny_intermediate_size,
                                 tie_word_embeddings=True)
        else:
            if not (Path(path) / "config.json").is_file():
                return None
            config = _read_config(path)
        return model_shape(config, scalar, cfg.lora_r if lora else 0, cfg.lora_target_modules, dtype or cfg.dtype)
    except (OSError, ValueError, KeyError, AttributeError):  # the loader reports a bad folder, not this
        return None


def _stage_of(cfg) -> str:
    from posttrain.config import STAGE_CONFIGS

    return next(stage for stage, cls in STAGE_CONFIGS.items() if type(cfg) is cls)


def estimate(cfg, stage: str | None = None) -> dict | None:
    """Bytes per device of each part of the run (see the module docstring), and a ``total``; None when unreadable."""
    stage = stage or _stage_of(cfg)
    stage = "grpo" if stage == "rloo" else stage  # the grpo recipe with other defaults
    stage = "dpo" if stage == "kto" else stage  # B rows and their B mismatched pairs: dpo's 2B rows, with a reference
    # cpo and orpo: the dpo recipe's pairs, with no reference model (needs_ref below is false for them)
    scalar = stage == "rm"
    policy = _shape_of(cfg, cfg.model_name_or_path, scalar=scalar, lora=cfg.use_peft)
    if policy is None:
        return None
    world = distributed.world_size()
    shard = world if cfg.fsdp else 1
    trained = policy.lora_params if cfg.use_peft else policy.params
    trained_bytes = FP32 if cfg.use_peft else policy.weight_bytes  # peft keeps adapters float32 over a 16-bit base
    autocast_copies = trained * BF16 if cfg.bf16 and trained_bytes == FP32 else 0
    parts: dict[str, float] = {}
    notes: dict[str, str] = {}
    parts["weights"] = (policy.params * policy.weight_bytes + policy.lora_params * FP32) / shard + autocast_copies
    notes["weights"] = f"{_count(policy.params)} params {_name(policy.dtype)}" + \
        (", + LoRA adapters fp32" if cfg.use_peft else "") + (", + bf16 copies under autocast" if autocast_copies else "")
    parts["gradients"] = trained * trained_bytes / shard * (2 if world > 1 and not cfg.fsdp else 1)
    notes["gradients"] = f"{_count(trained)} trained" + (" (LoRA)" if cfg.use_peft else "") + \
        (", + DDP buckets" if world > 1 and not cfg.fsdp else "")
    parts["optimizer"] = 2 * trained * trained_bytes / shard
    notes["optimizer"] = f"AdamW: 2 moments, {_name(torch.float32 if cfg.use_peft else policy.dtype)}"

    # frozen copies and the critic
    ref_path = getattr(cfg, "ref_model_name_or_path", "") or cfg.model_name_or_path
    needs_ref = {"dpo": not getattr(cfg, "precompute_ref_log_probs", False), "ppo": True,
                 "grpo": getattr(cfg, "beta", 0) > 0, "online_dpo": True}.get(stage, False)
    if needs_ref and (getattr(cfg, "ref_model_name_or_path", "") or not cfg.use_peft):
        ref = _shape_of(cfg, ref_path) or policy
        parts["reference"] = ref.params * ref.weight_bytes / shard
        notes["reference"] = f"frozen copy, {_name(ref.dtype)}"
    if getattr(cfg, "reward_model_name_or_path", ""):
        reward = _shape_of(cfg, cfg.reward_model_name_or_path, scalar=True, dtype="float32")  # as rewards.py loads it
        if reward is not None:
            parts["reward_model"] = reward.params * reward.weight_bytes / shard
            notes["reward_model"] = f"frozen, {_name(reward.dtype)}"
    if stage == "distill":
        teacher = _shape_of(cfg, cfg.teacher_model_name_or_path) or policy
        parts["teacher"] = teacher.params * teacher.weight_bytes / shard
        notes["teacher"] = f"frozen, {_name(teacher.dtype)}"
    critic = None
    if stage == "ppo" and cfg.critic == "separate":
        critic_path = cfg.critic_model_name_or_path or cfg.reward_model_name_or_path or cfg.model_name_or_path
        critic = _shape_of(cfg, critic_path, scalar=True) or policy
        parts["critic"] = critic.params * 4 * critic.weight_bytes / shard + \
            (critic.params * BF16 if cfg.bf16 and critic.weight_bytes == FP32 else 0)
        notes["critic"] = f"weights, gradients, AdamW, {_name(critic.dtype)}"

    # one micro-batch: rows x length, and the positions whose logits are scored
    B = cfg.per_device_train_batch_size
    if stage in ("sft", "dpo", "rm", "cpo", "orpo"):
        rows, length = B * (1 if stage == "sft" else 2), cfg.max_length
        scored = rows * length
    elif stage == "distill":  # dataset rows, or prompts with sampled completions
        rollouts = rows = B
        length = max(cfg.max_length, cfg.max_prompt_length + cfg.max_completion_length)
        scored = rows * length
    else:
        length = cfg.max_prompt_length + cfg.max_completion_length
        if stage == "grpo":
            rollouts = B * cfg.num_generations
            rows = math.ceil(rollouts / cfg.gradient_accumulation_steps)
        elif stage == "online_dpo":  # a step samples every micro-batch's pairs at once
            rows = 2 * B
            rollouts = rows * cfg.gradient_accumulation_steps
        else:
            rollouts = B
            rows = max(1, B // cfg.num_mini_batches // cfg.gradient_accumulation_steps)
        scored = rows * cfg.max_completion_length
    tokens = rows * length
    acts = activation_bytes(policy, tokens, cfg.bf16, cfg.gradient_checkpointing)
    if critic is not None:
        acts += activation_bytes(critic, tokens, cfg.bf16, cfg.gradient_checkpointing)
    parts["activations"] = acts
    notes["activations"] = f"{rows} rows x {length} tokens, {policy.layers} layers" + \
        (", checkpointed" if cfg.gradient_checkpointing else "")
    if stage == "distill":  # the student's and the teacher's whole (B, L, V) logits, from the models' own heads
        parts["logits"] = 2 * logits_bytes(policy, scored, cfg.bf16, True, head_trained=not cfg.use_peft)
        notes["logits"] = f"student and teacher: {scored} x {policy.vocab} logits each and their fp32 log-softmax"
    elif not scalar:
        full = full_logits(cfg, policy)
        parts["logits"] = logits_bytes(policy, scored, cfg.bf16, full, head_trained=not cfg.use_peft)
        notes["logits"] = f"{scored} x {policy.vocab} logits and their fp32 log-softmax (the model's own head)" if full \
            else "one chunk of <= 2^25 logits (not B x T x V), with gradients" + \
            (", the head's gradient sum" if not cfg.use_peft and compute_bytes(policy, cfg.bf16) < FP32 else "")
    if stage in ("ppo", "grpo", "online_dpo") or stage == "distill" and (cfg.lmbda > 0 or cfg.seq_kd):
        kv = policy.hidden * policy.kv_heads // policy.heads
        # sampling runs outside autocast, on the weights as loaded: the cache is in their dtype
        parts["kv_cache"] = rollouts * length * policy.layers * 2 * kv * policy.weight_bytes
        notes["kv_cache"] = f"{rollouts} rollouts (generation, before the update)"
    static = sum(v for k, v in parts.items() if k not in ("activations", "logits", "kv_cache"))
    training = parts["activations"] + parts.get("logits", 0)
    parts["total"] = static + max(training, parts.get("kv_cache", 0))
    notes["total"] = f"per device, world size {world}" + (", FSDP" if cfg.fsdp else "")
    return {"bytes": parts, "notes": notes, "stage": stage}


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_table(result: dict) -> str:
    lines = [f"memory estimate ({result['stage']}, per device):"]
    for name, value in result["bytes"].items():
        lines.append(f"  {name:<13}{value / 2**20:>10.1f} MiB  {result['notes'].get(name, '')}")
    return "\n".join(lines)


def preflight(cfg) -> dict | None:
    """Before any weight loads: on CUDA, stop with a UserError when the estimate exceeds the free device memory."""
    if distributed.device().type != "cuda":
        return None
    result = estimate(cfg)
    if result is not None:
        free, _ = torch.cuda.mem_get_info(distributed.device())
        check_fits(cfg, result["bytes"]["total"], free, str(distributed.device()))
    return result


def report(cfg) -> dict | None:
    """Print the estimate's table to stderr (rank 0) as the run starts, once its inputs have all loaded.

    Printed only then, so a run refused for bad input still says one line.
    """
    result = estimate(cfg)
    if result is not None and distributed.is_main():
        print(format_table(result), file=sys.stderr, flush=True)
    return result


def check_fits(cfg, need: float, free: float, device: str) -> None:
    """A one-line UserError when ``need`` bytes exceed the ``free`` bytes of ``device``, naming what would shrink it."""
    if need <= free:
        return
    options = [opt for opt, on in (("a smaller per_device_train_batch_size", True),
                                    ("gradient_checkpointing: true", not cfg.gradient_checkpointing),
                                    ("use_peft: true", not cfg.use_peft),
                                    ("fsdp: true under torchrun", not cfg.fsdp)) if on]
    raise UserError(f"memory: this run needs about {need / 2**30:.1f} GiB per device, {device} has "
                    f"{free / 2**30:.1f} GiB free; set {', or '.join(options)}")
