"""The demo end to end (quick mode) and the report it writes (DESIGN.md §6)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from posttrain import browser
from posttrain.metrics import read_metrics
from posttrain.report import stage_verdicts

POLICY_KEYS = {"accuracy", "greedy_accuracy", "reward_mean", "wall_s"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run_cli("demo", "--output_dir", out, "--quick", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_report_json_has_every_stage_with_the_contract_keys(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    assert report["task"] == "arith"
    assert report["eval_prompts"] == 64  # quick mode's held-out set
    stages = report["stages"]
    assert {"sft", "rm", "dpo", "ppo", "grpo", "ppo_shared", "ppo_rm"} <= set(stages)
    assert POLICY_KEYS <= set(stages["sft"])
    for name in ("dpo", "ppo", "grpo", "ppo_shared", "ppo_rm"):
        assert POLICY_KEYS | {"kl_to_ref", "peak_rss_mb"} <= set(stages[name]), name
        assert 0.0 <= stages[name]["accuracy"] <= 1.0
        assert stages[name]["peak_rss_mb"] > 50
    assert 0.0 <= stages["rm"]["pair_accuracy"] <= 1.0
    # the PPO stages report the model copies they hold: the shared critic holds one fewer
    assert stages["ppo"]["model_copies"] == stages["ppo_shared"]["model_copies"] + 1
    assert stages["grpo"]["model_copies"] == 2  # policy + reference (beta > 0)
    # every policy stage has a verdict against SFT; the RL stages start from their first logged training reward
    assert set(stage_verdicts(stages)) == {"dpo", "ppo", "grpo", "ppo_shared", "ppo_rm"}
    assert {name: stages[name]["verdict"] for name in stage_verdicts(stages)} == stage_verdicts(stages)
    for name in ("ppo", "grpo", "ppo_rm"):
        first = next(r["reward"] for r in read_metrics(demo_dir / name / "metrics.jsonl") if "reward" in r)
        assert stages[name]["train_reward_start"] == round(first, 4)


@pytest.mark.slow
def test_report_html_embeds_curves_table_and_side_by_side_samples(demo_dir):
    page = (demo_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5
    for stage in ("sft", "dpo", "ppo", "grpo", "ppo_rm"):
        assert f"<td>{stage}</td>" in page
        assert f"<th>{stage} greedy / sampled</th>" in page
    assert "<code>" in page and "+" in page  # held-out prompts shown
    assert "\ufffd" not in page  # undecodable sampled bytes are shown as \xNN
    if not browser.missing():  # screenshots are taken where Chromium is installed, and skipped (one line) where not
        assert (demo_dir / "report-1400.png").stat().st_size > 10_000 and (demo_dir / "report-400.png").is_file()


@pytest.mark.slow
def test_each_stage_leaves_its_config_and_a_loadable_model(demo_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for stage in ("sft", "dpo", "ppo", "grpo"):
        assert (demo_dir / f"{stage}.yaml").read_text().startswith(f"# posttrain {stage.split('_')[0]} --config")
        AutoModelForCausalLM.from_pretrained(demo_dir / stage)
    rm = AutoModelForSequenceClassification.from_pretrained(demo_dir / "rm", num_labels=1)
    assert rm.config.num_labels == 1
    assert (demo_dir / "ppo" / "critic" / "config.json").is_file()
    assert (demo_dir / "ppo_shared" / "critic" / "value_head.safetensors").is_file()


@pytest.mark.slow
def test_report_command_redraws_a_demo_and_compares_runs(demo_dir, tmp_path):
    proc = run_cli("report", demo_dir, "--output", tmp_path / "again.html")
    assert proc.returncode == 0, proc.stderr
    assert "data:image/png" in (tmp_path / "again.html").read_text()
    proc = run_cli("report", demo_dir / "sft", demo_dir / "dpo", "--output", tmp_path / "cmp.html")
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "cmp.html").read_text()
    assert "<td>sft</td>" in page and "<td>dpo</td>" in page


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path):
    proc = run_cli("report", tmp_path)
    assert proc.returncode == 2
    assert "not a run folder" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_rejects_an_unknown_stage(tmp_path):
    proc = run_cli("demo", "--output_dir", tmp_path, "--stages", "sft,nope")
    assert proc.returncode == 2
    assert "nope" in proc.stderr
