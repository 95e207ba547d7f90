"""The report's structure on real run folders: which curves share a panel, which panels share a figure, the
stage table's columns and labels, and a run folder's title (posttrain/report.py)."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import pytest

from posttrain.config import STAGE_CONFIGS, save_config
from posttrain.metrics import MetricsLogger, write_summary
from posttrain.report import COLUMNS, comparison_plots, figure_layout, report_main, stage_kind

# the demo's stages: folder name -> (stage, optimizer steps, reward source); SFT runs ten times as many steps as RL
RUNS = {"sft": ("sft", 600, None), "rm": ("rm", 100, None), "dpo": ("dpo", 100, None), "ppo": ("ppo", 60, "exact_match"),
        "ppo_rm": ("ppo", 60, "reward_model"), "grpo": ("grpo", 60, "exact_match")}


def logged(kind: str, source: str | None, step: int, steps: int) -> dict:
    """The keys each recipe logs, at the scales they have: SFT cross-entropy from 3.9, RL losses near 0.02, RM
    margins up to 4, DPO margins up to 0.3, reward-model scores near 2, exact-match rewards in [0, 1]."""
    t = step / steps
    if kind == "sft":
        return {"loss": 3.5 * math.exp(-4 * t) + 0.4, "learning_rate": 1e-3, "grad_norm": 1.0, "epoch": t}
    if kind == "rm":
        return {"loss": 0.69 - 0.6 * t, "accuracy": 0.5 + 0.45 * t, "rewards/chosen": 2 * t, "rewards/rejected": -2 * t,
                "rewards/margins": 4 * t, "learning_rate": 1e-4, "epoch": t}
    if kind == "dpo":
        return {"loss": 0.69 - 0.5 * t, "rewards/accuracies": 0.5 + 0.4 * t, "rewards/margins": 0.3 * t,
                "logps/chosen": -12 + 3 * t, "learning_rate": 1e-5, "epoch": t}
    reward = 1.8 + t if source == "reward_model" else 0.6 + 0.3 * t
    values = {"loss": 0.02 - 0.01 * t, "reward": reward, f"rewards/{source}": reward, "kl": 0.4 * t, "entropy": 2.0 - t,
              "clip_ratio": 0.05, "completion_length": 3.2, "eval/greedy_accuracy": 0.67 + 0.3 * t}
    return values | ({"value_loss": 0.3 - 0.2 * t, "explained_variance": t} if kind == "ppo" else {})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Stage output_dirs as the recipes leave them: config.yaml, metrics.jsonl from MetricsLogger, summary.json."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (kind, steps, source) in RUNS.items():
        folder = root / name
        folder.mkdir()
        save_config(STAGE_CONFIGS[kind](output_dir=str(folder)), folder / "config.yaml")
        logger = MetricsLogger(str(folder), total_steps=steps, progress=False)
        for step in range(steps // 10, steps + 1, steps // 10):
            record = logger.log(step, logged(kind, source, step, steps))
        extra = {"report": {"pair_accuracy": 0.9883, "eval_pairs": 256}} if kind == "rm" else {}
        write_summary(str(folder), {"wall_s": 12.3, "peak_rss_mb": 470.2, "final": record, **extra})
        out[name] = folder
    return out


def test_stage_kind_is_read_from_the_run_config_not_the_folder_name(runs, tmp_path):
    assert {name: stage_kind(path, name) for name, path in runs.items()} == {name: kind for name, (kind, *_) in RUNS.items()}
    renamed = tmp_path / "my_experiment"
    renamed.mkdir()
    (renamed / "config.yaml").write_text((runs["dpo"] / "config.yaml").read_text())
    assert stage_kind(renamed, renamed.name) == "dpo"


def test_each_figure_holds_one_stage_family_and_each_panel_one_scale(runs):
    layout = figure_layout(runs)
    # SFT, RM and DPO alone; RL stages split by what rewarded them (a reward-model score is not a 0/1 rule reward)
    assert {key: family["stages"] for key, family in layout.items()} == {
        "sft": ["sft"], "rm": ["rm"], "dpo": ["dpo"], "rl_exact_match": ["ppo", "grpo"], "rl_reward_model": ["ppo_rm"]}
    families = {"sft": {"sft"}, "rm": {"rm"}, "dpo": {"dpo"}, "rl_exact_match": {"ppo", "grpo"}, "rl_reward_model": {"ppo"}}
    for key, family in layout.items():
        for title, lines in family["panels"]:
            assert {RUNS[name][0] for name in lines} <= families[key], (key, title)
            assert set(lines) <= set(family["stages"])
    panels = {key: {title: sorted(lines) for title, lines in family["panels"]} for key, family in layout.items()}
    assert panels["sft"] == {"training loss: cross-entropy (nats/token)": ["sft"]}  # never beside an RL loss near 0
    assert panels["rm"]["training score margin r_chosen − r_rejected"] == ["rm"]
    assert panels["rm"]["training pair accuracy (r_chosen > r_rejected)"] == ["rm"]
    assert panels["dpo"]["implicit-reward margin β·Δlog-ratio (nats)"] == ["dpo"]  # not with RM's score margin
    rl = panels["rl_exact_match"]
    assert rl["training reward: exact_match, mean per completion"] == ["grpo", "ppo"]
    assert rl["PPO loss: policy + vf_coef·value"] == ["ppo"] and rl["GRPO loss"] == ["grpo"]  # different objectives
    assert rl["PPO: KL to reference (nats/completion)"] == ["ppo"] and rl["GRPO: KL to reference (nats/token)"] == ["grpo"]
    assert panels["rl_reward_model"]["training reward: reward-model score, mean per completion"] == ["ppo_rm"]
    # each family's step axis spans its own run: RL's 60 steps are not drawn on SFT's 600
    assert layout["rl_exact_match"]["x_label"] == "RL step (one rollout batch)"
    assert max(step for _, lines in layout["rl_exact_match"]["panels"] for pts in lines.values() for step, _ in pts) == 60


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_comparison_plots_draw_one_png_per_family_that_fits_the_page(runs, tmp_path):
    paths = comparison_plots(runs, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["dpo.png", "rl_exact_match.png", "rl_reward_model.png", "rm.png", "sft.png"]
    for path in paths:
        width, height = _png_size(path)
        assert 400 <= width <= 1368 and height >= 250, (path.name, width, height)  # the page's 1400 px less its padding


def _headers(page: str) -> list[str]:
    table = page[page.index("<h2>Stages</h2>"):page.index("</table>")]
    return re.findall(r'<th title="([^"]+)">', table)


def _cell(page: str, stage: str, key: str) -> str:
    row = re.search(rf"<tr><td>{stage}</td>(.*?)</tr>", page).group(1)
    return re.search(rf'title="{re.escape(key)}">([^<]*)</td>', row).group(1)


def test_run_folders_table_names_each_figure_for_what_it_is(runs, tmp_path, capsys):
    report_main([str(p) for p in runs.values()], str(tmp_path / "all.html"))
    page = (tmp_path / "all.html").read_text()
    headers = _headers(page)
    assert set(headers) <= set(COLUMNS) and len(headers) <= 8  # no raw metrics.jsonl keys (epoch, learning_rate, ...)
    assert "accuracy" not in headers and ">sampled acc.</th>" not in page  # rm's training accuracy is not a policy's
    assert _cell(page, "rm", "train_pair_accuracy") == "0.950"
    assert _cell(page, "rm", "pair_accuracy") == "0.988 of 256"
    assert _cell(page, "sft", "train_pair_accuracy") == ""
    assert _cell(page, "ppo_rm", "train_reward") == "1.900 → 2.800"
    assert "<h1>posttrain report — runs <code>sft</code>, <code>rm</code>," in page and "task" not in page.split("</h1>")[0]
    assert page.count("data:image/png;base64,") == 5


def test_a_single_run_folder_is_titled_by_its_name(runs, tmp_path, capsys):
    report_main([str(runs["ppo"])], str(tmp_path / "one.html"))
    page = (tmp_path / "one.html").read_text()
    assert "<title>posttrain report: run ppo</title>" in page
    assert "<h1>posttrain report — run <code>ppo</code></h1>" in page
    assert "task" not in page.split("</h1>")[0]


def test_demo_table_has_at_most_twelve_short_columns():
    from posttrain.report import stage_table

    stages = {"sft": {"accuracy": 0.66, "greedy_accuracy": 0.67, "reward_mean": 0.66, "wall_s": 61.2, "peak_rss_mb": 476.1,
                      "model_copies": 1, "copies_held": "policy 1"},
              "rm": {"pair_accuracy": 0.9883, "eval_pairs": 256, "wall_s": 39.0, "peak_rss_mb": 475.0, "model_copies": 1,
                     "copies_held": "reward_model 1"},
              "ppo_rm": {"accuracy": 0.79, "greedy_accuracy": 0.8, "reward_mean": 0.79, "kl_to_ref": 1.88, "train_reward_start": 1.8,
                         "train_reward": 2.74, "verdict": "improved", "wall_s": 43.0, "peak_rss_mb": 459.2, "model_copies": 4,
                         "copies_held": "actor 1, critic 1, reference 1, reward_model 1"}}
    table = stage_table(stages)
    headers = re.findall(r'<th title="[^"]+">([^<]+)</th>', table)
    assert len(headers) + 1 <= 12  # eval_pairs sits inside the pair accuracy cell, not in a 13th column
    assert max(len(h) for h in headers) <= 25
    assert 'title="pair_accuracy">0.988 of 256</td>' in table
