"""Shared fixtures: real tiny transformers models and real files, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from posttrain.tasks import arith  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def arith_data(tmp_path_factory) -> dict[str, Path]:
    """The arith task at a small size: sft / preference / prompts / eval .jsonl paths."""
    out = tmp_path_factory.mktemp("arith")
    return arith.write_datasets(out, seed=0, num_sft=2000, num_preference=512, num_prompts=512, num_eval=64)


def _corpus(paths: dict[str, Path]) -> list[str]:
    return [line for p in paths.values() for line in p.read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory, arith_data) -> Path:
    """A random tiny Qwen2 (hidden 32, 2 layers) with the embedded character tokenizer."""
    from posttrain.models import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_qwen")
    return build_tiny_model(_corpus(arith_data), out, seed=0, hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_qwen) -> Path:
    """A random tiny Llama saved locally, sharing the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m posttrain ARGS` in a child process, as a user runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


# ------------------------------------------------- real model families (Qwen2, Llama-3, Mistral)

# Qwen2-Instruct: ChatML with a default system turn
QWEN2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama-3-Instruct: header-style turns, each ended by <|eot_id|>, after <|begin_of_text|>
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Mistral-7B-Instruct: <s>[INST] user [/INST]answer</s>..., strictly alternating user/assistant
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
    "{%- else -%}{{- raise_exception('Only user and assistant roles are supported!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Llama-3's pre-tokenizer pattern (digits in groups of up to 3; with no merges every byte is one token anyway)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# family -> (model_type, tie_word_embeddings, key-value heads, special tokens, chat template)
FAMILIES = {
    "qwen2_tied": ("qwen2", True, 2, {}, QWEN2_CHAT_TEMPLATE),
    "qwen2_untied": ("qwen2", False, 1, {}, QWEN2_CHAT_TEMPLATE),
    "llama3": ("llama", False, 1, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                   "extra": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]},
               LLAMA3_CHAT_TEMPLATE),
    "mistral": ("mistral", False, 1, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "extra": []},
                MISTRAL_CHAT_TEMPLATE),
}


def _byte_level_tokenizer(corpus: list[str], specials: dict, split: str):
    """A byte-level BPE with no merges (one token per byte, like posttrain.models.build_tiny_tokenizer)
    carrying the given special tokens and no pad token. Saved with transformers' generic fast
    tokenizer, which AutoTokenizer loads back as is for llama and mistral configs."""
    from transformers import PreTrainedTokenizerFast

    from posttrain.models import byte_level_tokenizer

    named = {k: v for k, v in specials.items() if k != "extra"}
    core = byte_level_tokenizer(corpus, list(named.values()) + specials["extra"], split)
    return PreTrainedTokenizerFast(tokenizer_object=core, additional_special_tokens=specials["extra"],
                                   clean_up_tokenization_spaces=False, model_max_length=1024, **named)


def build_family_model(name: str, corpus: list[str], out: Path, with_template: bool = True) -> Path:
    """A random tiny model of family `name` (hidden 32, 2 layers, 2 heads) with its own tokenizer,
    special tokens and chat template (`with_template=False`: a tokenizer without one)."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models import build_tiny_tokenizer

    model_type, tied, kv_heads, specials, template = FAMILIES[name]
    if model_type == "qwen2":
        tokenizer = build_tiny_tokenizer(corpus, out)  # Qwen2's own layout, pad <|endoftext|>, eos <|im_end|>
    else:
        tokenizer = _byte_level_tokenizer(corpus, specials, LLAMA3_SPLIT)
    tokenizer.chat_template = template if with_template else None
    tokenizer.save_pretrained(str(out))
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=kv_heads, intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out))
    if tokenizer.pad_token is None:  # as Llama-3 / Mistral checkpoints ship: no pad token anywhere
        saved = json.loads((out / "config.json").read_text())
        saved.pop("pad_token_id", None)
        (out / "config.json").write_text(json.dumps(saved, indent=2))
    return out


@pytest.fixture(scope="session")
def model_families(tmp_path_factory, arith_data) -> dict[str, Path]:
    """name -> folder of a random tiny model per real family: qwen2_tied, qwen2_untied (ChatML, pad
    <|endoftext|>), llama3 (Llama-3 headers, eos <|eot_id|>) and mistral ([INST], eos </s>); llama3 and
    mistral have no pad token, in the tokenizer or the config."""
    corpus = _corpus(arith_data)
    return {name: build_family_model(name, corpus, tmp_path_factory.mktemp(name)) for name in FAMILIES}


@pytest.fixture(scope="session")
def no_template_model(tmp_path_factory, arith_data) -> Path:
    """A random tiny Llama whose tokenizer has no chat template at all."""
    return build_family_model("llama3", _corpus(arith_data), tmp_path_factory.mktemp("no_template"),
                              with_template=False)
