"""Load policy, reference, reward and value models from local folders; build `tiny`.

Every model goes through the same transformers loading path: the embedded tiny
model is a Qwen2 config plus a character-level tokenizer trained here with the
`tokenizers` library, both written with ``save_pretrained`` and read back with
``AutoModelForCausalLM`` / ``AutoTokenizer`` like any real checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from posttrain import distributed
from posttrain.distributed import device
from posttrain.errors import UserError
from posttrain.losses import chunked_head_logps, entropy_from_logits, selective_log_softmax

PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"

# ChatML, as Qwen2 uses it: <|im_start|>role\ncontent<|im_end|>\n
# ChatML, with tools in the Hermes / Qwen2.5 layout: the schemas in a system turn, an assistant's tool calls as
# <tool_call>{json}</tool_call>, tool results as <tool_response> blocks of one user turn. Without tools or tool
# messages it renders exactly the plain ChatML turns.
CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n' }}{% endif %}"
    "{{ '<tools>\n' }}{% for tool in tools %}{{ tool | tojson + '\n' }}{% endfor %}"
    "{{ '</tools>\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}{% set call = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>{\"name\": \"' + call['name'] + '\", \"arguments\": ' + (call['arguments'] | default({})) | tojson + '}</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Qwen2's pre-tokenizer pattern: \p{N} isolates every digit, so no merge can join digits
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_tokenizer(corpus: list[str], special_tokens: list[str], split: str):
    """A `tokenizers` byte-level BPE trained on ``corpus`` with no merges: one token per byte, plus the specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(special_tokens), special_tokens=special_tokens,
                                  initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator(list(corpus), trainer)
    return core


def build_tiny_tokenizer(corpus: list[str], output_dir: str | Path):
    """A byte-level BPE in Qwen2's own layout, trained on the corpus with no merges.

    With no merges every ASCII character is one token, which keeps digits
    separate and is what lets a 0.8M-parameter model learn column addition.
    It uses Qwen2's pre-tokenizer and byte-level alphabet, so transformers'
    Qwen2 tokenizer class (which AutoTokenizer picks for a qwen2 config)
    rebuilds exactly this tokenizer from the saved vocabulary.
    """
    from transformers import PreTrainedTokenizerFast

    core = byte_level_tokenizer(corpus, [PAD, EOS, IM_START], QWEN2_SPLIT)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer


def build_tiny_model(corpus: list[str], output_dir: str | Path, seed: int = 0, hidden_size: int = 128,
                     num_layers: int = 3, num_heads: int = 4, intermediate_size: int = 512) -> Path:
    """Write a randomly initialised tiny Qwen2 model and its tokenizer to output_dir."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    output_dir = Path(output_dir)
    tokenizer = build_tiny_tokenizer(corpus, output_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(output_dir))
    return output_dir


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: str, field: str) -> str | None:
    """The base model folder of a peft adapter folder (adapter_config.json); None for a plain model folder."""
    import json

    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        return None
    try:
        base = json.loads(file.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{field}: {file} is not a readable peft adapter config (no base_model_name_or_path)") from None
    if not isinstance(base, str) or not (Path(base) / "config.json").is_file():
        raise UserError(f"{field}: {path!r} is a LoRA adapter whose base model {base!r} is not a local model folder "
                        f"(base_model_name_or_path in {ADAPTER_CONFIG}); posttrain never downloads models")
    return base


def _merge_adapter_folder(model, path: str, field: str):
    """``model`` (the adapter's base) with the adapter of folder ``path`` merged into its weights.

    A causal LM's adapter also fits the trunk of a reward model or critic built
    on the same base (its new head is not adapted); a reward model's adapter
    carries a score head that a causal LM has no place for.
    """
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(path)
    if config.task_type == "SEQ_CLS" and not is_scalar_model(model):
        raise UserError(f"{field}: {path!r} is a reward model's LoRA adapter, not a causal language model")
    if config.task_type != "SEQ_CLS" and is_scalar_model(model):
        config.task_type = None  # the plain peft wrapper: adapters on the trunk, nothing for generation
    return PeftModel.from_pretrained(model, path, config=config).merge_and_unload()


def _check_dir(path: str, field: str, allow_pickle: bool = False) -> None:
    """A local model folder whose weights are safetensors (pickle weights only with ``allow_pickle``)."""
    folder = Path(path)
    if (folder / ADAPTER_CONFIG).is_file():  # an adapter folder: its base is checked where it is loaded
        adapter_base(path, field)
        return
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise UserError(f"{field}: {path!r} is not a local model folder (no config.json); "
                        "posttrain never downloads models")
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise UserError(f"{field}: {path!r} holds only pickle weights ({', '.join(pickled[:3])}), which can run code "
                        "when loaded; convert them to safetensors, or set allow_pickle: true for a folder you trust")
    raise UserError(f"{field}: {path!r} has no model weights (*.safetensors)")


def load_tokenizer(path: str, field: str = "model_name_or_path", chat_template_path: str = "", eos_token: str = ""):
    """AutoTokenizer of a local folder, with a pad token chosen when it has none.

    The pad is a distinct existing special token where one exists (unk, else a
    bos that is not the eos), and eos only as a last resort: transformers'
    sequence-classification head pools at the last token that is not the pad
    id, so a pad equal to eos would hide each row's final EOS from it.
    """
    from transformers import AutoTokenizer

    _check_dir(path, field, allow_pickle=True)  # (the weights are checked where they are loaded)
    base = adapter_base(path, field)
    tokenizer = AutoTokenizer.from_pretrained(path if base is None or (Path(path) / "tokenizer_config.json").is_file()
                                              else base)
    if tokenizer.pad_token is None:
        spare = [t for t in (tokenizer.unk_token, tokenizer.bos_token) if t is not None and t != tokenizer.eos_token]
        tokenizer.pad_token = (spare or [tokenizer.eos_token])[0]
    if chat_template_path:
        apply_chat_template_file(tokenizer, chat_template_path)
    if eos_token and eos_token != tokenizer.eos_token:  # TRL's eos_token: an existing token becomes the EOS
        token_id = tokenizer.convert_tokens_to_ids(eos_token)
        if token_id is None or (token_id == tokenizer.unk_token_id and eos_token != tokenizer.unk_token):
            raise UserError(f"eos_token: {eos_token!r} is not a token of {path}'s vocabulary")
        tokenizer.eos_token = eos_token
    return tokenizer


def apply_chat_template_file(tokenizer, path: str) -> None:
    """Set the tokenizer's chat template from a Jinja file (config field `chat_template_path`).

    It replaces the tokenizer's own template, or gives one to a tokenizer that has none;
    ``save_pretrained`` then writes it into the trained model's folder.
    """
    try:
        template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise UserError(f"chat_template_path: cannot read {path!r} ({reason})") from None
    if not template.strip():
        raise UserError(f"chat_template_path: {path!r} is empty")
    tokenizer.chat_template = template


def load_options(cfg) -> dict:
    """The load-time options of a stage config (dtype, attn_implementation) for ``load_causal_lm`` / ``load_scalar_model``."""
    return {"dtype": cfg.dtype, "attn_implementation": cfg.attn_implementation}


def _from_pretrained_options(dtype: str, attn_implementation: str) -> dict:
    if attn_implementation == "flash_attention_2" and device().type != "cuda":
        raise UserError("attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa or eager here")
    options = {"dtype": {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[dtype]}
    return {**options, "attn_implementation": attn_implementation} if attn_implementation else options


def load_causal_lm(path: str, field: str = "model_name_or_path", trainable: bool = True, allow_pickle: bool = False,
                   dtype: str = "float32", attn_implementation: str = ""):
    """AutoModelForCausalLM, float32 unless ``dtype`` says otherwise (bf16 runs use autocast over fp32 master
    weights); never remote code.

    A LoRA adapter folder (``merge_adapter: false``) loads its base and merges the adapter into it.
    """
    from transformers import AutoModelForCausalLM

    base = adapter_base(path, field)
    _check_dir(base or path, field, allow_pickle)
    model = AutoModelForCausalLM.from_pretrained(base or path, use_safetensors=not allow_pickle, trust_remote_code=False,
                                                 **_from_pretrained_options(dtype, attn_implementation))
    if base is not None:
        model = _merge_adapter_folder(model, path, field)
    model = model.to(device())
    return model.train() if trainable else freeze(model)


def load_scalar_model(path: str, field: str, trainable: bool = True, allow_pickle: bool = False,
                      dtype: str = "float32", attn_implementation: str = ""):
    """A reward model or critic: AutoModelForSequenceClassification with num_labels=1.

    From a causal-LM checkpoint the trunk is reused and the scalar head `score`
    starts at zero, so a new critic predicts 0 everywhere. A LoRA adapter folder
    loads its base and merges the adapter (and a reward model's trained head) into it.
    """
    from transformers import AutoModelForSequenceClassification, logging

    base = adapter_base(path, field)
    _check_dir(base or path, field, allow_pickle)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "newly initialized score weights" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base or path, num_labels=1, use_safetensors=not allow_pickle, trust_remote_code=False,
            **_from_pretrained_options(dtype, attn_implementation))
    finally:
        logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if not _was_trained_as_scalar(path):
        nn.init.zeros_(model.score.weight)
    if base is not None:
        model = _merge_adapter_folder(model, path, field)
    model.to(device())
    return model.train() if trainable else freeze(model)


def require_scalar_head(path: str, field: str) -> None:
    """Refuse a reward model folder without a trained scalar head: one UserError line naming what it holds.

    load_scalar_model starts a causal LM's head at zero (right for a new critic), so a policy folder given
    as the reward model would score every completion 0 and the run would train on nothing.
    """
    import json

    if _was_trained_as_scalar(path):
        return
    if (Path(path) / ADAPTER_CONFIG).is_file():
        task = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("task_type") or "none"
        holds = f"a LoRA adapter (task_type {task}"
    else:
        architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
        kind = "a causal LM" if any("CausalLM" in a for a in architectures) else "a model"
        holds = f"{kind} ({', '.join(architectures) or 'no architectures in config.json'}"
    raise UserError(f"{field}: {path} is {holds}, no scalar score head); train one with `posttrain rm`")


def _was_trained_as_scalar(path: str) -> bool:
    import json

    if (Path(path) / ADAPTER_CONFIG).is_file():  # a reward model's adapter carries its trained head
        return json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("task_type") == "SEQ_CLS"
    config = json.loads((Path(path) / "config.json").read_text())
    return any("SequenceClassification" in a for a in config.get("architectures") or [])


def disable_dropout(model: nn.Module) -> nn.Module:
    """Switch every dropout off while keeping train mode (which gradient checkpointing needs).

    Log-probs of a rollout, of a DPO pair and of the reference must come from
    the same deterministic function, or the PPO ratio is not 1 before any
    update and the KL at initialisation is not 0. nn.Dropout layers get p = 0;
    attention modules keep their rate in a float attribute (`attention_dropout`
    in Llama/Qwen2/Mistral), set to 0 too. The saved config is left as it was.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def is_scalar_model(model) -> bool:
    """A reward model or critic (a sequence-classification model with its `score` head)."""
    return hasattr(unwrap_peft(model), "score")


def apply_lora(model, r: int, alpha: int, target_modules: str, dropout: float = 0.0):
    """Wrap ``model`` in peft LoRA adapters; everything else is frozen.

    A reward model (sequence classification) trains its new `score` head in
    full beside the adapters (``modules_to_save``): a frozen zero head would
    score every sequence 0.
    """
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    scalar = is_scalar_model(model)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                        task_type="SEQ_CLS" if scalar else "CAUSAL_LM", modules_to_save=["score"] if scalar else None)
    return get_peft_model(model, config)


def unsharded_replica(model):
    """A CPU copy of ``model``'s architecture (transformers model + the same LoRA layers) to gather sharded weights into.

    Built from the live model's own config, so a reward model's pad id and a
    resized vocabulary come along; every weight is then loaded from the gathered state.
    """
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    live = unwrap_peft(model)
    auto = AutoModelForSequenceClassification if is_scalar_model(model) else AutoModelForCausalLM
    base = auto.from_config(copy.deepcopy(live.config), dtype=torch.float32)
    return get_peft_model(base, copy.deepcopy(model.peft_config["default"]))


def prepare_for_training(model, cfg):
    """Activation checkpointing, LoRA, then DDP / FSDP2 under torchrun, as the config asks; returns the model to train."""
    if getattr(cfg, "padding_free", False):
        check_padding_free(model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if cfg.use_peft:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
        if getattr(cfg, "disable_dropout", False):  # the LoRA branches' dropout too (see disable_dropout)
            disable_dropout(model)
    return distributed.wrap(model, cfg.fsdp, cfg.bf16)


def load_policy_and_reference(cfg, need_reference: bool = True):
    """Tokenizer, trainable policy (LoRA-wrapped with use_peft) and frozen reference.

    The reference is ``ref_model_name_or_path`` or else the starting policy.
    It is None when not needed (GRPO with beta 0) and with LoRA when no
    separate reference is named: then the base with adapters off serves.
    """
    tokenizer = load_tokenizer(cfg.model_name_or_path, chat_template_path=cfg.chat_template_path)
    policy = load_causal_lm(cfg.model_name_or_path, allow_pickle=cfg.allow_pickle, **load_options(cfg))
    if cfg.disable_dropout:
        disable_dropout(policy)
    policy = prepare_for_training(policy, cfg)
    ref = None
    if need_reference and (cfg.ref_model_name_or_path or not cfg.use_peft):
        ref = load_frozen_model(cfg, cfg.ref_model_name_or_path or cfg.model_name_or_path, "ref_model_name_or_path",
                                check_packing=bool(cfg.ref_model_name_or_path))
    return tokenizer, policy, ref


def load_frozen_model(cfg, path: str, field: str, check_packing: bool = True):
    """A frozen causal LM (reference, teacher) loaded as the run loads its policy, wrapped for torchrun
    (FSDP2 shards it too); a padding_free run checks that its attention keeps packed rows apart."""
    model = load_causal_lm(path, field, trainable=False, allow_pickle=cfg.allow_pickle, **load_options(cfg))
    if check_packing and getattr(cfg, "padding_free", False):
        check_padding_free(model)
    return distributed.wrap(model, cfg.fsdp, cfg.bf16, frozen=True)


@contextlib.contextmanager
def reference_mode(policy, ref_model):
    """Yield the model that computes reference log-probs.

    With LoRA and no separate reference, the reference is the base model with
    the adapters switched off: no second copy of the weights.
    """
    if ref_model is not None:
        yield ref_model
    elif hasattr(policy, "disable_adapter"):
        with policy.disable_adapter():
            yield policy
    else:
        raise ValueError("no reference model and the policy has no adapters to disable")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as `generate` derives them: (B, L).

    Left-padded rows then score exactly like unpadded ones, also for models with
    absolute position embeddings (GPT-2 style); right padding leaves 0..L-1 as is.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


# families whose causal-LM forward is exactly lm_head(last_hidden_state[:, kept]): the chunked head gives their
# very logits (Gemma-2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling, ... are not in it)
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma",
    "starcoder2", "olmo", "olmo2", "smollm3", "gpt_neox", "glm4", "stablelm",
})


def chunkable_head(model) -> nn.Linear | None:
    """The LM head when log-probs may be computed from the trunk's hidden states in chunks, else None.

    That needs a plain ``nn.Linear`` head (not a LoRA-adapted one) applied to
    the last hidden state with nothing after it (PLAIN_HEAD_MODEL_TYPES), with
    whole (not FSDP2-sharded DTensor) weights.
    """
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or distributed.is_sharded(model):
        return None
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or hasattr(head.weight, "to_local"):
        return None
    return head


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0,
                return_entropy: bool = False, return_hidden: bool = False, entropy_grad: bool = False,
                temperature: float = 1.0, position_ids: torch.Tensor | None = None, score_mask: torch.Tensor | None = None):
    """Log-probability of each next token under ``model``, at sampling temperature ``temperature``.

    Returns (B, L-1) where position t scores input_ids[:, t+1]; with
    ``logits_to_keep = K`` only the last K positions are scored (B, K), which
    skips the prompt's logits entirely when completions sit at the right end.
    Logits are divided by ``temperature`` before the log-softmax, so RL scores
    the very distribution softmax(z/T) its rollouts were sampled from.
    ``return_entropy`` adds the (B, K) entropy of that distribution (detached
    unless ``entropy_grad``); ``return_hidden`` adds the last hidden states
    (B, L, H) for a value head on the same trunk. ``position_ids`` replaces the
    positions derived from the mask (packed rows restart at 0; the mask may then be None).
    ``score_mask`` (B, L-1), where given, names the positions a loss reads (SFT's
    completion tokens, DPO's response tokens): the head runs on those alone and
    every other position is 0, so prompt and padding cost no LM-head work.

    The (B, K, V) logits are never held: the forward runs through the root
    module (where DDP hooks in) with the head applied to no position, and
    ``losses.chunked_head_logps`` applies the head to the trunk's last hidden
    states a chunk of positions at a time, forward and backward. Models that
    ``chunkable_head`` rejects take the logits from the forward, FSDP2 ones
    among them (their head's weights are whole only inside the root's forward).
    """
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    targets = input_ids[:, 1:] if not logits_to_keep else input_ids[:, -logits_to_keep:]
    head = chunkable_head(model)
    if head is None:
        out = _logps_from_logits(model, input_ids, attention_mask, position_ids, targets, logits_to_keep,
                                 return_entropy, return_hidden, entropy_grad, temperature)
        if score_mask is None:
            return out
        parts = list(out) if isinstance(out, tuple) else [out]
        scored_parts = 1 + return_entropy  # the hidden states, if returned, stay whole
        parts[:scored_parts] = [p.masked_fill(~score_mask.bool(), 0.0) for p in parts[:scored_parts]]
        return parts[0] if len(parts) == 1 else tuple(parts)
    captured = []
    trunk = unwrap_peft(model).base_model
    hook = trunk.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
    finally:
        hook.remove()
    last_hidden = captured[-1]  # (B, L, H), after the final norm: what the head reads
    scored = last_hidden[:, :-1] if not logits_to_keep else last_hidden[:, -(logits_to_keep + 1):-1]
    where = None if score_mask is None else score_mask.bool()
    out = chunked_head_logps(scored if where is None else scored[where], head.weight, head.bias,
                             targets if where is None else targets[where], temperature, return_entropy=return_entropy,
                             entropy_grad=entropy_grad and torch.is_grad_enabled())
    result = list(out) if return_entropy else [out]
    if where is not None:  # back to (B, K) with zeros where nothing is scored
        result = [_scatter_scored(values, where) for values in result]
    if return_hidden:
        result.append(last_hidden)
    return result[0] if len(result) == 1 else tuple(result)


def _scatter_scored(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    full = values.new_zeros(where.shape)
    full[where] = values
    return full


def _logps_from_logits(model, input_ids, attention_mask, position_ids, targets, logits_to_keep, return_entropy,
                       return_hidden, entropy_grad, temperature):
    """token_logps from the (B, K, V) logits the model's own forward returns."""
    keep = {"logits_to_keep": logits_to_keep + 1} if logits_to_keep else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, output_hidden_states=return_hidden, **keep)
    logits = out.logits[:, :-1]  # (B, K, V): the last position predicts beyond the input
    if temperature != 1.0:
        logits = logits / temperature
    result = [selective_log_softmax(logits, targets)]
    if return_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            result.append(entropy_from_logits(logits if entropy_grad else logits.detach()))
    if return_hidden:
        result.append(out.hidden_states[-1])
    return result[0] if len(result) == 1 else tuple(result)


def unwrap_peft(model) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def scalar_head(model) -> nn.Module:
    """The `score` head of a sequence-classification model (through a peft wrapper too)."""
    return unwrap_peft(model).score


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position scalar of a sequence-classification model: (B, L).

    The transformers forward applies the `score` head at every position and
    then pools to one; a critic needs them all, so they are taken from the head
    as it runs. The forward goes through the model itself, which is what lets
    DDP and FSDP2 (hooked on the root module) gather weights and reduce gradients.
    """
    captured = []
    hook = scalar_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        hook.remove()
    return captured[-1].squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, for left or right padding. (B,)"""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask * positions).argmax(-1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score of each sequence, read at its last non-padding token. (B,)"""
    values = token_values(model, input_ids, attention_mask)
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


@torch.no_grad()
def check_padding_free(model: nn.Module) -> None:
    """Refuse ``padding_free`` (UserError) for a model whose attention does not keep packed rows apart.

    Two short rows run packed into one sequence (positions restarting at 0, no
    attention mask) and then one at a time must give the same last hidden
    states. Families that take no position_ids (ALiBi: Bloom, MPT) or
    attention kernels that get no mask from transformers let the second row
    see the first, and are caught here, before any training.
    """
    param = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(7, device=param.device) * 5 + 3) % vocab  # rows of 3 and 4 arbitrary tokens
    rows = (ids[:3], ids[3:])
    positions = torch.cat([torch.arange(len(row), device=param.device) for row in rows])
    was_training = model.training
    model.eval()  # no dropout
    try:
        packed = model(input_ids=ids[None], position_ids=positions[None], attention_mask=None, use_cache=False,
                       output_hidden_states=True).hidden_states[-1][0]
        alone = torch.cat([model(input_ids=row[None], use_cache=False, output_hidden_states=True).hidden_states[-1][0]
                           for row in rows])
    except (TypeError, ValueError) as err:
        raise UserError(f"padding_free: {type(model).__name__} cannot run packed rows ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}); "
                        "set padding_free: false") from None
    finally:
        model.train(was_training)
    if not torch.allclose(packed.float(), alone.float(), rtol=1e-3, atol=1e-4):
        gap = float((packed.float() - alone.float()).abs().max())
        raise UserError(f"padding_free: {type(model).__name__} (attention {model.config._attn_implementation}) lets "
                        f"packed rows see each other (outputs differ by {gap:.2g} from the rows run alone); it cannot "
                        "honour packed position_ids, set padding_free: false")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prepare_model(path: str, cfg, corpus_fn=None) -> str:
    """Resolve model_name_or_path: build `tiny` into a temporary folder, else the folder itself.

    The tiny model is a deterministic function of the seed and the corpus, so
    every rank (and a resumed run) builds the very same one; nothing is
    written to output_dir before the data and config have been checked.
    """
    if path != "tiny":  # (checked where it is loaded)
        return path
    import atexit
    import shutil
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="posttrain-tiny-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    build_tiny_model(corpus_fn(), target, seed=cfg.seed, hidden_size=cfg.tiny_hidden_size,
                     num_layers=cfg.tiny_num_layers, num_heads=cfg.tiny_num_heads,
                     intermediate_size=cfg.tiny_intermediate_size)
    return str(target)
