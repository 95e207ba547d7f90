"""End-to-end tests of the KTO recipe (posttrain.recipes.kto) on the tiny real model: the command line on the demo's
pairs (unpaired), a file of unpaired labelled rows, and the data pieces (unpairing, mismatched KL pairs, bad labels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain import data as D
from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.metrics import read_metrics
from posttrain.models import load_tokenizer
from posttrain.recipes import kto
from posttrain.recipes.kto import response_logps

TRL_KEYS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def first_pairs(arith_data, path: Path, n: int) -> Path:
    path.write_text("\n".join(arith_data["preference"].read_text().splitlines()[:n]) + "\n")
    return path


@torch.no_grad()
def log_ratio_gap(model_dir: Path, start_dir: Path, pairs: Path) -> float:
    """mean log π/π_start of the desirable responses minus that of the undesirable ones, over every row of ``pairs``."""
    tokenizer = load_tokenizer(str(start_dir))
    examples = D.unpaired_examples(D.read_rows(str(pairs)), tokenizer, 512, 256)
    batch = D.collate_unpaired(examples, None, tokenizer.pad_token_id)
    ratio = sum(sign * response_logps(AutoModelForCausalLM.from_pretrained(d).eval(), batch.tokens)
                for sign, d in ((1, model_dir), (-1, start_dir)))
    return float(ratio[batch.label].mean() - ratio[~batch.label].mean())


def test_kto_command_line_on_pairs_raises_desirable_over_undesirable(cli, tiny_qwen, arith_data, tmp_path):
    pairs = first_pairs(arith_data, tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "kto"
    proc = cli("kto", "--model_name_or_path", tiny_qwen, "--dataset_name", pairs, "--output_dir", out, "--max_steps", "3",
               "--per_device_train_batch_size", "16", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
               "--logging_steps", "1", "--num_threads", "1", "--progress", "false", "--undesirable_weight", "1.0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(k in records[-1] for k in TRL_KEYS)
    # step 1: π = π_ref, so r = 0, z0 = 0 and every row's loss is 1 - σ(0) = 0.5
    assert records[0]["loss"] == pytest.approx(0.5) and records[0]["kl"] == 0.0
    assert records[-1]["kl"] >= 0.0 and records[-1]["rewards/margins"] > 0
    assert log_ratio_gap(out, tiny_qwen, pairs) > 0.5  # nats: desirable responses gained on undesirable ones


def test_an_unpaired_file_trains_with_its_labels_and_weights(tiny_qwen, tmp_path):
    rows = [{"prompt": "1+2=", "completion": "3", "label": True}, {"prompt": "2+2=", "completion": "5", "label": False},
            {"prompt": [{"role": "user", "content": "3+4="}], "completion": [{"role": "assistant", "content": "7"}],
             "label": True},
            {"prompt": "5+1=", "completion": "9", "label": False}, {"prompt": "1+1=", "completion": "2", "label": True}]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("kto", None, {"model_name_or_path": str(tiny_qwen), "dataset_name": str(path), "output_dir":
                                    str(tmp_path / "out"), "per_device_train_batch_size": "5", "max_steps": "2",
                                    "logging_steps": "1", "num_threads": "1", "progress": "false",
                                    "desirable_weight": "2.0", "learning_rate": "1e-3"})
    kto.main(cfg)
    first = read_metrics(tmp_path / "out" / "metrics.jsonl")[0]
    # step 1: every row's loss is 0.5, weighted 2 for the 3 desirable rows: (3·2·0.5 + 2·0.5) / 5 = 0.8
    assert first["loss"] == pytest.approx(0.8) and first["rewards/margins"] == 0.0


def test_pairs_unpair_and_kl_pairs_shift_by_one(tiny_qwen, arith_data, tmp_path):
    tokenizer = load_tokenizer(str(tiny_qwen))
    rows = D.read_rows(str(first_pairs(arith_data, tmp_path / "pairs.jsonl", 3)))
    examples = D.unpaired_examples(rows, tokenizer, 512, 256)
    pairs = D.preference_examples(rows, tokenizer, 512, 256)
    assert [e.label for e in examples] == [True] * 3 + [False] * 3  # TRL's unpair_preference_dataset
    assert [e.example for e in examples] == [p.chosen for p in pairs] + [p.rejected for p in pairs]
    shifted = D.mismatched_examples([e.example for e in examples[:3]], 512)
    # prompt i with response i-1, the first with the last's
    assert [(s.prompt_ids, s.completion_ids) for s in shifted] == [
        (examples[i].example.prompt_ids, examples[(i - 1) % 3].example.completion_ids) for i in range(3)]


def test_a_bad_label_names_file_line_and_field(tiny_qwen, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+2=", "completion": "3", "label": true}\n\n{"prompt": "2+2=", "completion": "5", "label": "no"}\n')
    with pytest.raises(UserError) as err:
        D.unpaired_examples(D.read_rows(str(path)), load_tokenizer(str(tiny_qwen)), 512, 256)
    assert str(err.value) == f"{path}:3: field 'label' must be true (desirable) or false (undesirable), got 'no'"
