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
    x = torch.randn(B, S, hidden, dtype=next(layer.parameters()).dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        layer(x, attention_mask=None, position_embeddings=position_embeddings,
              position_ids=torch.arange(S)[None].expand(B, S))
    # a bf16 copy of a weight (autocast's cache) is 2-D with no token dimension: counted with the weights
    return sum(n for ptr, (shape, n) in saved.items()
               if ptr not in weights and not (len(shape) == 2 and shape[0] != B * S))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("family", ["qwen2", "llama_gqa"])
def test_layer_activation_formula_equals_the_tensors_autograd_saves(family, bf16, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if family == "qwen2":
        config = Qwen2Config(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=160)
    else:
        config = LlamaConfig(vocab_size=97, hidden_size=96, num_hidden_layers=1, num_attention_heads=6,
                             num_key_value_heads=2, intermediate_size=200)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))  # as `dtype: bfloat16` loads it
    B, S = 3, 20
    x = torch.zeros(B, S, config.hidden_size, dtype=getattr(torch, dtype))
    position_embeddings = model.model.rotary_emb(x, torch.arange(S)[None].expand(B, S))
    measured = _saved_activation_bytes(model.model.layers[0], config.hidden_size, position_embeddings, bf16, (B, S))
    shape = memory.model_shape(config, dtype=dtype)
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
    # the frozen base as before plus the fp32 adapters, which alone have gradients
    assert lora["weights"] == full["weights"] + lora["gradients"] and 0 < lora["gradients"] < full["gradients"] / 4
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


# Qwen2-7B's shape (config.json only: the estimate builds the model on the meta device, no weights needed)
QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "tie_word_embeddings": False, "max_position_embeddings": 32768}
# Its parameters, by hand (h 3584, i 18944, 28 layers, V 152064, k/v width 4 heads x 128 = 512):
#   per layer: q 3584·3584 + 3584 bias = 12,848,640; k and v 3584·512 + 512 = 1,835,520 each; o 3584·3584 = 12,845,056;
#              gate, up, down 3·3584·18944 = 203,685,888; two RMSNorms 2·3584 = 7,168      -> 233,057,792
#   28 layers 6,525,618,176 + embeddings and untied lm_head 2·152064·3584 = 1,089,994,752 + final norm 3,584
QWEN2_7B_PARAMS = 7_615_616_512


def _config_folder(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _estimate_of(model: Path, arith_data, tmp_path, stage="sft", **fields) -> dict:
    data = arith_data["preference" if stage == "dpo" else "sft"]
    base = {"model_name_or_path": str(model), "dataset_name": str(data), "output_dir": str(tmp_path / "out")}
    return memory.estimate(load_config(stage, None, {**base, **{k: str(v) for k, v in fields.items()}}))["bytes"]


def test_a_bf16_7b_run_costs_half_the_weight_gradient_and_optimizer_bytes_of_fp32(arith_data, tmp_path):
    model = _config_folder(tmp_path / "qwen2_7b", QWEN2_7B)
    P = QWEN2_7B_PARAMS
    fp32 = _estimate_of(model, arith_data, tmp_path, dtype="float32")
    bf16 = _estimate_of(model, arith_data, tmp_path, dtype="bfloat16")
    assert memory.model_shape(memory._read_config(str(model))).params == P
    # float32: 4 + 4 + 2·4 = 16 bytes a parameter = 121,849,864,192 bytes (113.5 GiB)
    assert (fp32["weights"], fp32["gradients"], fp32["optimizer"]) == (4 * P, 4 * P, 8 * P)
    # bfloat16 weights, their gradients and AdamW's moments (torch keeps them in the parameter's dtype):
    # 2 + 2 + 2·2 = 8 bytes a parameter = 60,924,932,096 bytes (56.7 GiB), half
    assert (bf16["weights"], bf16["gradients"], bf16["optimizer"]) == (2 * P, 2 * P, 4 * P)
    assert bf16["activations"] < fp32["activations"]
    # logits: one chunk, 2^25 // 152064 = 220 positions of bf16 logits, their fp32 copy and both gradients,
    # 220·152064·2·(2 + 4) = 401,448,960 bytes, and the chunked backward's float32 sum of the bf16 head's gradient
    # with each chunk's bf16 product: 152064·3584·(4 + 2) = 3,269,984,256 bytes (fp32 weights sum in place: none)
    assert bf16["logits"] == 401_448_960 + 3_269_984_256 and fp32["logits"] == 220 * 152064 * 2 * (4 + 4)
    # bf16 autocast over fp32 weights: fp32 weights, gradients and moments, plus a bf16 copy of each trained weight
    autocast = _estimate_of(model, arith_data, tmp_path, dtype="float32", bf16="true")
    assert (autocast["weights"], autocast["gradients"], autocast["optimizer"]) == (4 * P + 2 * P, 4 * P, 8 * P)
    # LoRA over a bf16 base: the frozen base in bf16, the adapters (peft keeps them fp32) alone trained
    lora = _estimate_of(model, arith_data, tmp_path, dtype="bfloat16", use_peft="true", lora_r=8)
    adapters = lora["gradients"] / 4
    assert lora["weights"] == 2 * P + 4 * adapters and lora["optimizer"] == 8 * adapters


def test_dtype_auto_costs_the_checkpoints_own_torch_dtype(arith_data, tmp_path):
    P = QWEN2_7B_PARAMS
    bf16_checkpoint = _config_folder(tmp_path / "bf16", {**QWEN2_7B, "torch_dtype": "bfloat16"})
    unnamed = _config_folder(tmp_path / "unnamed", QWEN2_7B)
    assert _estimate_of(bf16_checkpoint, arith_data, tmp_path, dtype="auto") == \
        _estimate_of(bf16_checkpoint, arith_data, tmp_path, dtype="bfloat16")
    assert _estimate_of(bf16_checkpoint, arith_data, tmp_path, dtype="auto")["weights"] == 2 * P
    assert _estimate_of(unnamed, arith_data, tmp_path, dtype="auto")["weights"] == 4 * P  # none named: fp32, the larger
    # the reference of a DPO run loads with the same dtype
    assert _estimate_of(bf16_checkpoint, arith_data, tmp_path, "dpo", dtype="auto")["reference"] == 2 * P


def test_a_bf16_7b_run_that_fits_is_no_longer_refused(arith_data, tmp_path):
    from posttrain.errors import UserError

    model = _config_folder(tmp_path / "qwen2_7b", QWEN2_7B)
    fields = {"per_device_train_batch_size": 1, "max_length": 512, "gradient_checkpointing": "true"}
    free = 80 * 2**30  # a pretend 80 GiB device
    bf16_cfg = load_config("sft", None, {"model_name_or_path": str(model), "dataset_name": str(arith_data["sft"]),
                                         "output_dir": str(tmp_path), "dtype": "bfloat16",
                                         **{k: str(v) for k, v in fields.items()}})
    bf16 = memory.estimate(bf16_cfg)["bytes"]["total"]
    assert 8 * QWEN2_7B_PARAMS < bf16 < free  # about 60.4 GiB (it was 114.4 GiB, as for fp32)
    memory.check_fits(bf16_cfg, bf16, free, "cuda:0")
    fp32 = _estimate_of(model, arith_data, tmp_path, dtype="float32", **fields)["total"]
    with pytest.raises(UserError, match="114.4 GiB"):
        memory.check_fits(bf16_cfg, fp32, free, "cuda:0")


def test_lora_on_lm_head_counts_the_models_full_logits(arith_data, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models import apply_lora, chunkable_head

    model = _config_folder(tmp_path / "qwen2_7b", QWEN2_7B)
    fields = {"dtype": "bfloat16", "use_peft": "true", "lora_r": 8, "per_device_train_batch_size": 1, "max_length": 512,
              "gradient_checkpointing": "true"}
    chunked = _estimate_of(model, arith_data, tmp_path, lora_target_modules="q_proj,v_proj", **fields)
    full = _estimate_of(model, arith_data, tmp_path, lora_target_modules="q_proj,v_proj,lm_head", **fields)
    # bf16 logits and their fp32 copy, with gradients: 2·(2 + 4) = 12 bytes a logit
    #   chunked: 2^25 // 152064 = 220 positions (losses.HEAD_CHUNK_LOGITS) -> 220·152064·12 = 401,448,960 bytes
    #   full:    1 row x 512 positions                                   -> 512·152064·12 = 934,281,216 bytes
    assert chunked["logits"] == 401_448_960 and full["logits"] == 934_281_216
    # the lm_head adapter: 8·(3584 + 152064) = 1,245,184 fp32 parameters, 4 + 4 + 8 = 16 bytes each: 19,922,944 bytes
    assert full["total"] - chunked["total"] == (934_281_216 - 401_448_960) + 19_922_944
    # and the real head: a LoRA-adapted lm_head is one chunkable_head refuses
    tiny = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", vocab_size=97, hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=1, num_attention_heads=2))
    assert chunkable_head(tiny) is not None and chunkable_head(apply_lora(tiny, 4, 8, "q_proj,lm_head")) is None


def test_a_soft_capped_head_counts_the_models_full_logits(arith_data, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models import chunkable_head

    shape = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 256000}
    gemma2 = _config_folder(tmp_path / "gemma2", {"model_type": "gemma2", "final_logit_softcapping": 30.0, **shape})
    gemma = _config_folder(tmp_path / "gemma", {"model_type": "gemma", **shape})
    fields = {"per_device_train_batch_size": 2, "max_length": 128}
    # fp32 logits and log-softmax, with gradients: 2·(4 + 4) = 16 bytes a logit
    #   gemma (plain head, chunked): 2^25 // 256000 = 131 positions -> 131·256000·16 =   536,576,000 bytes
    #   gemma2 (soft-capped, the model's own logits): 2 rows x 128   -> 256·256000·16 = 1,048,576,000 bytes
    assert _estimate_of(gemma, arith_data, tmp_path, **fields)["logits"] == 536_576_000
    assert _estimate_of(gemma2, arith_data, tmp_path, **fields)["logits"] == 1_048_576_000
    tiny = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", vocab_size=97, hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=1, num_attention_heads=2, head_dim=16))
    assert chunkable_head(tiny) is None
