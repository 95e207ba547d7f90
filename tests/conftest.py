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
