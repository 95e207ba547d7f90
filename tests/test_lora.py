"""LoRA runs: peft-format adapters beside (or instead of) merged weights, loaders that read adapter folders,
lora_dropout, and a reward model that trains only its adapters and its score head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.config import load_config, validate
from posttrain.errors import UserError
from posttrain.metrics import read_metrics
from posttrain.models import load_causal_lm, load_scalar_model, load_tokenizer, prepare_for_training, sequence_scores
from posttrain.recipes import dpo, rm, sft

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def small_preference(root: Path, arith_data, n: int = 24) -> Path:
    path = root / "pairs.jsonl"
    path.write_text("".join(arith_data["preference"].read_text().splitlines(keepends=True)[:n]))
    return path


def run(stage, output_dir: Path, **overrides):
    values = {"num_threads": "1", "progress": "false", "seed": "0", "per_device_train_batch_size": "4",
              "logging_steps": "1", "max_steps": "2", "use_peft": "true", "lora_r": "4", "lora_alpha": "8",
              "learning_rate": "1e-2", "output_dir": str(output_dir)}
    values.update({k: str(v) for k, v in overrides.items()})
    cfg = load_config(stage.__name__.rsplit(".", 1)[-1], None, values)
    stage.main(cfg)
    return cfg


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, tiny_qwen, arith_data):
    """The same LoRA DPO run saved merged (+ adapter/) and adapter-only."""
    root = tmp_path_factory.mktemp("lora_dpo")
    pairs = small_preference(root, arith_data)
    common = {"model_name_or_path": tiny_qwen, "dataset_name": pairs}
    run(dpo, root / "merged", **common)
    run(dpo, root / "adapter_only", merge_adapter="false", **common)
    return root


def probe_ids(tiny_qwen) -> torch.Tensor:
    tokenizer = load_tokenizer(str(tiny_qwen))
    return torch.tensor([tokenizer("12+34=46", add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def logits_of(model, ids) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


def test_lora_dpo_writes_a_peft_adapter_equal_to_the_merged_weights(dpo_runs, tiny_qwen):
    out = dpo_runs / "merged"
    assert ADAPTER_FILES <= {p.name for p in (out / "adapter").iterdir()}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_qwen) and config["r"] == 4 and config["lora_alpha"] == 8
    assert all("lora_" in k for k in load_file(str(out / "adapter" / "adapter_model.safetensors")))

    ids = probe_ids(tiny_qwen)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    base_logits = logits_of(base, ids)
    merged_by_peft = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = logits_of(merged_by_peft, ids)
    assert (expected - base_logits).abs().max() > 1e-3, "the adapter must have trained for the comparison to mean anything"
    torch.testing.assert_close(logits_of(saved, ids), expected, rtol=0, atol=1e-5)


def test_merge_adapter_false_writes_only_the_adapter_which_peft_and_posttrain_load(dpo_runs, tiny_qwen):
    out = dpo_runs / "adapter_only"
    names = {p.name for p in out.iterdir()}
    assert ADAPTER_FILES <= names and "tokenizer.json" in names
    assert not names & {"model.safetensors", "config.json", "adapter"}, "no full weights when merge_adapter is false"
    ids = probe_ids(tiny_qwen)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    by_peft = logits_of(PeftModel.from_pretrained(base, out), ids)
    # the two runs trained the same adapter: the adapter-only folder loads to the merged folder's model
    merged = logits_of(AutoModelForCausalLM.from_pretrained(dpo_runs / "merged", dtype=torch.float32), ids)
    torch.testing.assert_close(by_peft, merged, rtol=0, atol=1e-5)
    # posttrain's own loaders (next stage, eval, generate) take the adapter folder as a model folder
    torch.testing.assert_close(logits_of(load_causal_lm(str(out), trainable=False), ids), by_peft, rtol=0, atol=1e-5)
    assert load_tokenizer(str(out)).pad_token is not None
    validate("dpo", load_config("dpo", None, {"model_name_or_path": str(out), "dataset_name": str(dpo_runs / "pairs.jsonl"),
                                              "output_dir": str(dpo_runs / "next")}), check_paths=True)


def test_adapter_with_a_missing_base_is_one_line_error(tmp_path, dpo_runs):
    folder = tmp_path / "moved"
    folder.mkdir()
    config = json.loads((dpo_runs / "adapter_only" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="is a LoRA adapter whose base model .* is not a local model folder") as err:
        load_causal_lm(str(folder))
    assert "\n" not in str(err.value)


def test_tiny_adapter_only_run_saves_its_base(tmp_path, arith_data):
    # the embedded tiny model lives in a temporary folder that is gone after the run: its base is saved beside the adapter
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(arith_data["sft"].read_text().splitlines(keepends=True)[:32]))
    out = tmp_path / "out"
    run(sft, out, model_name_or_path="tiny", dataset_name=data, merge_adapter="false", tiny_hidden_size=32,
        tiny_num_layers=1, tiny_num_heads=2, tiny_intermediate_size=64)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    assert (out / "base" / "model.safetensors").is_file()
    model = load_causal_lm(str(out), trainable=False)
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
    tokenizer = load_tokenizer(str(out))
    ids = torch.tensor([tokenizer("1+2=3", add_special_tokens=False)["input_ids"]])
    assert (logits_of(model, ids) - logits_of(base, ids)).abs().max() > 1e-4, "the merged adapter changed the model"
    # the next stage's reward model or critic starts from the adapted trunk, with a new head at 0
    scalar = load_scalar_model(str(out), "critic_model_name_or_path", trainable=False)
    assert float(scalar.score.weight.abs().max()) == 0.0
    trunk, causal = scalar.model.state_dict(), model.model.state_dict()
    assert trunk.keys() == causal.keys()
    for name, value in causal.items():
        torch.testing.assert_close(trunk[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("stage, dropout_off", [("sft", False), ("dpo", True)])
def test_lora_dropout_reaches_lora_config(tiny_qwen, stage, dropout_off):
    cfg = load_config(stage, None, {"model_name_or_path": str(tiny_qwen), "dataset_name": "x.jsonl",
                                    "use_peft": "true", "lora_dropout": "0.25"})
    model = prepare_for_training(load_causal_lm(str(tiny_qwen)), cfg)
    assert model.peft_config["default"].lora_dropout == 0.25
    rates = {m.lora_dropout["default"].p for m in model.modules() if hasattr(m, "lora_dropout")}
    # DPO's disable_dropout switches the LoRA branches' dropout off as well, so the policy stays deterministic
    assert rates == ({0.0} if dropout_off else {0.25})


def test_lora_dropout_must_be_a_probability():
    with pytest.raises(UserError, match="lora_dropout.* must be in \\[0, 1\\), got 1.0"):
        validate("sft", load_config("sft", None, {"dataset_name": "x.jsonl", "lora_dropout": "1"}))


@pytest.mark.parametrize("merge", ["true", "false"])
def test_rm_with_lora_trains_only_adapters_and_the_score_head(tmp_path, tiny_qwen, arith_data, monkeypatch, merge):
    captured = {}
    original = rm.finish

    def keep_model(cfg, model, *args, **kwargs):
        captured["model"] = model
        captured["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        captured["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return original(cfg, model, *args, **kwargs)

    monkeypatch.setattr(rm, "finish", keep_model)
    start = load_scalar_model(str(tiny_qwen), "model_name_or_path")
    initial = {n: p.detach().clone() for n, p in start.named_parameters()}
    out = tmp_path / "rm"
    cfg = run(rm, out, model_name_or_path=tiny_qwen, dataset_name=small_preference(tmp_path, arith_data),
              eval_split=0, merge_adapter=merge)

    trainable, params = captured["trainable"], captured["params"]
    assert trainable and all("lora_" in n or "score.modules_to_save" in n for n in trainable), trainable
    assert any("score.modules_to_save" in n for n in trainable), "the score head must train"
    for name in trainable:
        if "lora_A" not in name:  # lora_B and the head start at 0: moved means trained
            assert params[name].abs().sum() > 0, name
    for name, value in params.items():  # every frozen weight is the starting model's
        if name not in trainable:
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
            torch.testing.assert_close(value, initial[plain], rtol=0, atol=0, msg=name)

    # the saved model scores as the trained one did, through posttrain's loader and through transformers
    tokenizer = load_tokenizer(str(out))
    batch = tokenizer(["1+1=2", "3+4=9"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = sequence_scores(captured["model"].eval(), batch.input_ids, batch.attention_mask)
        loaded = load_scalar_model(str(out), "reward_model_name_or_path", trainable=False)
        torch.testing.assert_close(sequence_scores(loaded, batch.input_ids, batch.attention_mask), expected,
                                   rtol=0, atol=1e-5)
    assert expected.abs().max() > 0, "a trained head scores away from 0"
    if merge == "true":
        with torch.no_grad():
            logits = AutoModelForSequenceClassification.from_pretrained(out).eval()(**batch).logits[:, 0]
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    else:
        assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
        with pytest.raises(UserError, match="is a reward model's LoRA adapter, not a causal language model"):
            load_causal_lm(str(out))
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 2
    assert cfg.use_peft
