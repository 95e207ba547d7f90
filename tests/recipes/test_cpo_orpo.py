"""posttrain cpo (SimPO) and posttrain orpo from the command line: the dpo recipe with a reference-free loss.

Eight arith pairs and a batch of eight: every step sees the same pairs, so the training margin of step 3 is
measured on the pairs of step 1.
"""

from __future__ import annotations

import json

import pytest

from posttrain import cli
from posttrain.metrics import read_metrics

TRL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "nll_loss")


@pytest.mark.parametrize("stage, extra, also", [
    ("cpo", ["--loss_type", "simpo", "--cpo_alpha", "0", "--beta", "2"], ()),  # SimPO's loss alone
    ("orpo", [], ("log_odds_ratio", "log_odds_chosen")),
])
def test_reference_free_stage_moves_the_margin_the_right_way(tmp_path, tiny_qwen, arith_data, capsys, stage, extra, also):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(arith_data["preference"].read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / stage
    assert cli.main([stage, "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(pairs), "--output_dir", str(out),
                     "--max_steps", "3", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
                     "--logging_steps", "1", "--num_threads", "1", "--progress", "false", *extra]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(key in r for r in records for key in TRL_KEYS + also)  # TRL's metric names
    first, last = records[0], records[-1]
    assert last["rewards/margins"] > first["rewards/margins"] + 1e-3  # chosen pulled above rejected
    assert last["loss"] < first["loss"]
    if stage == "orpo":
        assert last["log_odds_chosen"] > first["log_odds_chosen"]  # the odds of the chosen responses rise
        assert last["nll_loss"] < first["nll_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_copies"] == {"policy": 1, "reference": 0}  # reference-free: none loaded
    table = capsys.readouterr().err.split(f"memory estimate ({stage}, per device):", 1)[1].split("total", 1)[0]
    assert "weights" in table and "reference" not in table  # nor counted in the memory pre-flight
