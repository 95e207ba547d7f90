"""Logging backends (report_to), the end-of-run summary and the README.md model card of every run."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from posttrain import metrics
from posttrain.config import load_config, validate
from posttrain.errors import UserError
from posttrain.metrics import MetricsLogger, TensorBoardBackend, read_metrics
from posttrain.recipes import sft


def sft_run(output_dir: Path, data: Path, argv: list[str], monkeypatch, **overrides):
    values = {"model_name_or_path": "tiny", "dataset_name": str(data), "output_dir": str(output_dir), "num_threads": "1",
              "progress": "false", "seed": "0", "per_device_train_batch_size": "4", "logging_steps": "1",
              "max_steps": "3", "learning_rate": "3e-3", "tiny_hidden_size": "32", "tiny_num_layers": "1",
              "tiny_num_heads": "2", "tiny_intermediate_size": "64"}
    values.update({k: str(v) for k, v in overrides.items()})
    monkeypatch.setattr(sys, "argv", argv)
    cfg = load_config("sft", None, values)
    sft.main(cfg)
    return cfg


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, arith_data) -> Path:
    path = tmp_path_factory.mktemp("card_data") / "sft.jsonl"
    path.write_text("".join(arith_data["sft"].read_text().splitlines(keepends=True)[:32]))
    return path


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# ------------------------------------------------------------------------------------------------ report_to


def test_report_to_tensorboard_writes_the_logged_losses(tmp_path, sft_data, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["posttrain", "sft", "--report_to", "tensorboard", "--dataset_name", str(sft_data), "--output_dir", str(out)]
    cfg = sft_run(out, sft_data, argv, monkeypatch, report_to="tensorboard")
    assert cfg.report_to == ["tensorboard"]
    assert list((out / "runs").glob("events.out.tfevents.*")), "real event files in output_dir/runs/"
    lines = read_metrics(out / "metrics.jsonl")
    logged = scalars(out / "runs", "loss")
    assert [s for s, _ in logged] == [r["step"] for r in lines] == [1, 2, 3]
    for (_, value), record in zip(logged, lines):
        assert value == pytest.approx(record["loss"], rel=1e-6)  # event files hold float32
    assert [v for _, v in scalars(out / "runs", "learning_rate")] == pytest.approx([r["learning_rate"] for r in lines])

    # the end-of-run summary: final metrics, where the model is, and two lines that load it
    printed = capsys.readouterr().out
    summary = printed[printed.index("posttrain sft: done"):]
    assert f"{lines[-1]['loss']:.4g}" in summary and f"saved to {out} (full weights)" in summary
    code = summary[summary.index("load it:") + len("load it:"):].strip().splitlines()
    assert len(code) == 2
    scope: dict = {}
    exec("\n".join(line.strip() for line in code), scope)
    assert isinstance(scope["model"], torch.nn.Module) and scope["model"].config.hidden_size == 32


def test_report_to_none_writes_only_metrics_jsonl(tmp_path, sft_data, monkeypatch):
    out = tmp_path / "out"
    sft_run(out, sft_data, ["posttrain"], monkeypatch, report_to="none", max_steps=1)
    assert not (out / "runs").exists() and not (out / "wandb").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def test_report_to_parses_lists_and_rejects_unknown_names():
    assert load_config("sft", None, {"dataset_name": "x.jsonl", "report_to": "jsonl,tensorboard"}).report_to == ["jsonl", "tensorboard"]
    assert load_config("sft", None, {"dataset_name": "x.jsonl"}).report_to == ["none"]
    with pytest.raises(UserError, match=r"^--report_to: field 'report_to': 'mlflow' is not one of none, jsonl, tensorboard, wandb$"):
        validate("sft", load_config("sft", None, {"dataset_name": "x.jsonl", "report_to": "tensorboard,mlflow"}),
                 sources={"report_to": "--report_to"})


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_wandb_without_wandb_is_one_line_error():
    with pytest.raises(UserError, match=r"wandb is not installed \(pip install wandb\)") as err:
        validate("sft", load_config("sft", None, {"dataset_name": "x.jsonl", "report_to": "wandb"}))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="wandb is not installed"):
        metrics.WandbBackend("out", "", {})


def test_logger_closes_its_backends_on_an_error(tmp_path):
    # the event file is flushed by close(): a run that fails mid-way still leaves readable events
    backend = TensorBoardBackend(tmp_path / "runs")
    with pytest.raises(RuntimeError, match="boom"):
        with MetricsLogger(str(tmp_path), 10, progress=False, backends=[backend]) as logger:
            logger.log(1, {"loss": 2.5})
            logger.log(2, {"loss": 1.25})
            raise RuntimeError("boom")
    assert backend.writer.file_writer is None, "SummaryWriter.close() ran"
    logger.close()  # a second close (the recipe's own) does nothing
    assert scalars(tmp_path / "runs", "loss") == [(1, 2.5), (2, 1.25)]


def test_tensorboard_on_resume_drops_events_past_the_checkpoint(tmp_path):
    with MetricsLogger(str(tmp_path), 4, progress=False, backends=[TensorBoardBackend(tmp_path / "runs")]) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": float(step)})
    # resumed from a checkpoint at step 1: the steps after it are logged again, with new values
    with MetricsLogger(str(tmp_path), 4, 1, progress=False, backends=[TensorBoardBackend(tmp_path / "runs", 1)]) as logger:
        for step in (2, 3):
            logger.log(step, {"loss": 10.0 * step})
    assert scalars(tmp_path / "runs", "loss") == [(1, 1.0), (2, 20.0), (3, 30.0)]
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 20.0, 30.0]


# ------------------------------------------------------------------------------------------------ model card


def front_matter(text: str) -> tuple[dict, str]:
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def table(body: str, heading: str) -> dict[str, str]:
    section = body.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| (\S+) \| `(.*)` \|$", section, re.M)}


def code_block(body: str, heading: str, language: str) -> str:
    section = body.split(f"## {heading}\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_every_run_writes_a_model_card(tmp_path, sft_data, monkeypatch, tiny_qwen):
    out = tmp_path / "card run"  # a space, so the command needs shell quoting
    argv = ["posttrain", "sft", "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(sft_data),
            "--output_dir", str(out), "--learning_rate", "0.003"]
    sft_run(out, sft_data, argv, monkeypatch, model_name_or_path=tiny_qwen, per_device_train_batch_size=5)
    meta, body = front_matter((out / "README.md").read_text())
    assert meta == {"library_name": "transformers", "base_model": str(tiny_qwen), "tags": ["posttrain", "sft"]}
    assert "stage: `sft`" in body and f"data: `{sft_data}`" in body and f"base model: `{tiny_qwen}`" in body

    params = table(body, "Hyper-parameters")
    assert params["learning_rate"] == "0.003" and params["per_device_train_batch_size"] == "5"
    assert params["max_steps"] == "3" and params["completion_only_loss"] == "true"
    assert "beta" not in params and "lora_r" not in params, "only the stage's own fields"

    final, last = table(body, "Final metrics"), read_metrics(out / "metrics.jsonl")[-1]
    assert float(final["loss"]) == last["loss"] and float(final["grad_norm"]) == last["grad_norm"]
    assert shlex.split(code_block(body, "Command", "bash")) == argv

    snippet = code_block(body, "Loading", "python")
    assert repr(str(out)) in snippet
    elsewhere = tmp_path / "moved"
    out.rename(elsewhere)  # exec the snippet with the path substituted: it loads the model that was saved
    scope: dict = {}
    exec(snippet.replace(repr(str(out)), repr(str(elsewhere))), scope)
    ids = scope["tokenizer"]("1+2=3", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(elsewhere).eval()(input_ids=ids).logits
        torch.testing.assert_close(scope["model"].eval()(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_adapter_only_model_card_loads_with_peft(tmp_path, tiny_qwen, arith_data, monkeypatch, stage):
    from peft import PeftModel

    from posttrain.recipes import dpo, rm

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(arith_data["preference"].read_text().splitlines(keepends=True)[:16]))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["posttrain", stage])
    values = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(pairs), "output_dir": str(out),
              "num_threads": "1", "progress": "false", "per_device_train_batch_size": "4", "logging_steps": "1",
              "max_steps": "1", "use_peft": "true", "lora_r": "2", "merge_adapter": "false", "beta": "0.3"}
    if stage == "rm":
        values = {k: v for k, v in values.items() if k != "beta"} | {"eval_split": "0"}
    {"dpo": dpo, "rm": rm}[stage].main(load_config(stage, None, values))
    meta, body = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "peft" and meta["tags"] == ["posttrain", stage, "lora"]
    params = table(body, "Hyper-parameters")
    assert params["lora_r"] == "2" and params["merge_adapter"] == "false"
    assert ("beta" in params) == (stage == "dpo") and ("center_rewards_coefficient" in params) == (stage == "rm")
    scope: dict = {}
    exec(code_block(body, "Loading", "python"), scope)
    assert isinstance(scope["model"], PeftModel)
    assert scope["model"].peft_config["default"].task_type == ("SEQ_CLS" if stage == "rm" else "CAUSAL_LM")
