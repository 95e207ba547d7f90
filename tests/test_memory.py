"""The pre-flight memory estimate: its parts against real models, and its total against a measured run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain import memory
from posttrain.config import load_config
from posttrain.models import apply_lora, load_causal_lm

REPO = Path(__file__).resolve().parents[1]


def _saved_activation_bytes(layer, hidden: int, position_embeddings, bf16: bool, tokens: tuple[int, int]) -> int:
    """Bytes of the (non-parameter) tensors autograd saves in one decoder layer's forward."""
    weights = {p.data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = (tuple(t.shape), storage.nbytes())
        return t

    B, S = tokens
    x = torch.randn(B, S, hidden, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        layer(x, attention_mask=None, position_embeddings=position_embeddings,
              position_ids=torch.arange(S)[None].expand(B, S))
    # a bf16 copy of a weight (autocast's cache) is 2-D with no token dimension: counted with the weights
    return sum(n for ptr, (shape, n) in saved.items()
               if ptr not in weights and not (len(shape) == 2 and shape[0] != B * S))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("family", ["qwen2", "llama_gqa"])
def test_layer_activation_formula_equals_the_tensors_autograd_saves(family, bf16):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if family == "qwen2":
        config = Qwen2Config(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=160)
    else:
        config = LlamaConfig(vocab_size=97, hidden_size=96, num_hidden_layers=1, num_attention_heads=6,
                             num_key_value_heads=2, intermediate_size=200)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    B, S = 3, 20
    x = torch.zeros(B, S, config.hidden_size)
    position_embeddings = model.model.rotary_emb(x, torch.arange(S)[None].expand(B, S))
    measured = _saved_activation_bytes(model.model.layers[0], config.hidden_size, position_embeddings, bf16, (B, S))
    shape = memory.model_shape(config)
    assert memory.layer_activation_bytes(shape, bf16) * B * S == measured


def test_model_shape_counts_the_parameters_and_lora_adapters_of_the_real_model(tiny_qwen):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_qwen)
    model = load_causal_lm(str(tiny_qwen))
    shape = memory.model_shape(config, lora_r=4)
    assert shape.params == sum(p.numel() for p in model.parameters())
    peft_model = apply_lora(model, 4, 8, "all-linear")
    assert shape.lora_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    only_q = memory.model_shape(config, lora_r=4, lora_targets="q_proj")
    assert only_q.lora_params == 4 * (config.hidden_size + config.hidden_size) * config.num_hidden_layers


def _estimate(tiny_qwen, arith_data, tmp_path, stage="sft", **fields):
    data = arith_data["preference" if stage == "dpo" else "sft"]
    base = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(data), "output_dir": str(tmp_path)}
    return memory.estimate(load_config(stage, None, {**base, **{k: str(v) for k, v in fields.items()}}))["bytes"]


def test_estimate_parts_follow_lora_checkpointing_fsdp_and_the_reference(tiny_qwen, arith_data, tmp_path, monkeypatch):
    full = _estimate(tiny_qwen, arith_data, tmp_path)
    params = sum(p.numel() for p in load_causal_lm(str(tiny_qwen)).parameters())
    assert full["weights"] == 4 * params and full["gradients"] == 4 * params and full["optimizer"] == 8 * params
    lora = _estimate(tiny_qwen, arith_data, tmp_path, use_peft="true", lora_r=4)
    assert lora["weights"] == full["weights"] and 0 < lora["gradients"] < full["gradients"] / 4
    assert lora["optimizer"] == 2 * lora["gradients"]
    checkpointed = _estimate(tiny_qwen, arith_data, tmp_path, gradient_checkpointing="true")
    assert checkpointed["activations"] < full["activations"]
    doubled = _estimate(tiny_qwen, arith_data, tmp_path, per_device_train_batch_size=16)
    assert doubled["activations"] == 2 * full["activations"]
    # DPO: chosen + rejected rows and a reference copy; none with LoRA (the base with adapters off serves)
    dpo = _estimate(tiny_qwen, arith_data, tmp_path, "dpo")
    assert dpo["reference"] == full["weights"] and dpo["activations"] == 2 * full["activations"]
    assert "reference" not in _estimate(tiny_qwen, arith_data, tmp_path, "dpo", use_peft="true")
    monkeypatch.setenv("WORLD_SIZE", "4")
    sharded = _estimate(tiny_qwen, arith_data, tmp_path, "dpo", fsdp="true")
    assert sharded["weights"] == dpo["weights"] / 4 and sharded["optimizer"] == dpo["optimizer"] / 4
    assert sharded["reference"] == dpo["reference"] / 4 and sharded["activations"] == dpo["activations"]


def test_rm_estimate_is_of_the_scalar_model_without_logits(tiny_qwen, arith_data, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    rm = _estimate(tiny_qwen, arith_data, tmp_path, "rm")
    config = AutoConfig.from_pretrained(tiny_qwen)
    config.num_labels = 1
    params = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
    assert rm["weights"] == 4 * params and "logits" not in rm


def test_grpo_estimate_counts_the_group_and_the_rollout_kv_cache(tiny_qwen, arith_data, tmp_path):
    fields = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(arith_data["prompts"]),
              "output_dir": str(tmp_path), "per_device_train_batch_size": "2", "max_prompt_length": "16",
              "max_completion_length": "8"}
    four = memory.estimate(load_config("grpo", None, {**fields, "num_generations": "4"}))["bytes"]
    eight = memory.estimate(load_config("grpo", None, {**fields, "num_generations": "8"}))["bytes"]
    assert eight["activations"] == 2 * four["activations"] and eight["kv_cache"] == 2 * four["kv_cache"]
    no_ref = memory.estimate(load_config("grpo", None, {**fields, "beta": "0"}))["bytes"]
    assert "reference" in four and "reference" not in no_ref


def test_the_table_is_printed_as_the_run_claims_its_output_folder(tiny_qwen, arith_data, tmp_path, capsys):
    from posttrain.training import setup_run, start_output

    cfg = load_config("sft", None, {"model_name_or_path": str(tiny_qwen), "dataset_name": str(arith_data["sft"]),
                                    "output_dir": str(tmp_path / "out")})
    setup_run(cfg)
    assert capsys.readouterr().err == ""  # nothing yet: a run refused for bad data still says one line
    start_output(cfg, {})
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "memory estimate (sft, per device):" and err[-1].startswith("  total")
    assert any(line.startswith("  optimizer") for line in err)
    missing = load_config("sft", None, {"model_name_or_path": str(tmp_path / "absent"),
                                        "dataset_name": str(arith_data["sft"]), "output_dir": str(tmp_path)})
    assert memory.report(missing) is None  # the loader reports the missing folder, not the estimate


def test_estimate_is_within_30_percent_of_the_measured_peak_of_sft_and_dpo(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory_estimate.py"), "--stage", "sft", "dpo"],
                          capture_output=True, text=True, timeout=1500,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    assert [r["stage"] for r in results] == ["sft", "dpo"]
    for r in results:
        assert 0.7 <= r["ratio"] <= 1.3, r
        assert r["measured_mib"] > 200, "the model must dominate the baseline"


def test_a_run_that_does_not_fit_stops_with_one_line_naming_what_to_change(tiny_qwen, arith_data, tmp_path):
    from posttrain.errors import UserError

    cfg = load_config("sft", None, {"model_name_or_path": str(tiny_qwen), "dataset_name": str(arith_data["sft"]),
                                    "output_dir": str(tmp_path), "gradient_checkpointing": "true"})
    memory.check_fits(cfg, 2 * 2**30, 3 * 2**30, "cuda:0")  # fits: nothing happens
    with pytest.raises(UserError) as err:
        memory.check_fits(cfg, 5 * 2**30, 3 * 2**30, "cuda:0")
    message = str(err.value)
    assert "\n" not in message and "5.0 GiB" in message and "3.0 GiB free" in message
    assert "per_device_train_batch_size" in message and "use_peft" in message and "fsdp" in message
    assert "gradient_checkpointing" not in message  # already on


def test_ppo_estimate_counts_a_separate_critic_and_the_reward_model(tiny_qwen, arith_data, tmp_path):
    fields = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(arith_data["prompts"]),
              "output_dir": str(tmp_path), "reward_model_name_or_path": str(tiny_qwen)}
    separate = memory.estimate(load_config("ppo", None, fields))["bytes"]
    shared = memory.estimate(load_config("ppo", None, {**fields, "critic": "shared"}))["bytes"]
    scalar = memory.model_shape(__import__("transformers").AutoConfig.from_pretrained(tiny_qwen), scalar=True).params
    assert separate["critic"] == 16 * scalar and "critic" not in shared
    assert separate["reward_model"] == 4 * scalar and separate["reference"] == separate["weights"]
    assert separate["activations"] == 2 * shared["activations"]  # the critic's own forward (same trunk shape)
