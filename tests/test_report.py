"""The report's verdicts, number formats and readable completions (posttrain/report.py, evaluation.py)."""

from __future__ import annotations

import re

import pytest
import torch

from posttrain.report import findings, stage_table, stage_verdicts, verdict

# (train_reward_start, train_reward_end, accuracy_before, accuracy_after) -> verdict, at the default tolerances
# (reward 0.05, accuracy 0.02)
CASES = [
    ((0.0, 0.0, 0.0, 0.0), "no learning"),  # a quick PPO run: reward stayed at 0, accuracy at 0
    ((0.0, 0.031, 0.0, 0.0), "no learning"),  # +0.031 reward is within the 0.05 tolerance
    ((0.0, 0.0, 0.047, 0.031), "no learning"),  # -0.016 accuracy is within the 0.02 tolerance
    ((1.8, 2.74, 0.663, 0.640), "reward hacking"),  # PPO on a learned RM: reward +0.94, accuracy -0.023
    ((0.3, 0.94, 0.663, 0.937), "improved"),
    ((0.9, 0.2, 0.663, 0.937), "improved"),  # accuracy decides, even when the training reward fell
    ((None, None, 0.663, 0.950), "improved"),  # DPO has no training reward
    ((None, None, 0.663, 0.600), "regressed"),
    ((0.5, 0.4, 0.663, 0.600), "regressed"),  # accuracy fell but the reward did not rise: not hacking
    ((0.2, 0.6, 0.50, 0.51), "no held-out gain"),  # reward rose, accuracy +0.01 within tolerance
    ((0.2, None, 0.50, 0.40), "regressed"),  # only one end of the reward known: not "rose"
]


@pytest.mark.parametrize("args,expected", CASES)
def test_verdict_hand_made_cases(args, expected):
    assert verdict(*args) == expected


def test_verdict_tolerances_are_strict_bounds():
    # exact binary fractions, so the boundary is exact: a change equal to the tolerance does not count
    assert verdict(0.0, 0.25, 0.5, 0.25, reward_tol=0.25, accuracy_tol=0.25) == "no learning"
    assert verdict(0.0, 0.375, 0.5, 0.25, reward_tol=0.25, accuracy_tol=0.25) == "no held-out gain"
    assert verdict(0.0, 0.375, 0.5, 0.125, reward_tol=0.25, accuracy_tol=0.25) == "reward hacking"
    assert verdict(0.0, 0.0, 0.5, 0.875, reward_tol=0.25, accuracy_tol=0.25) == "improved"


QUICK_STAGES = {  # the figures of a quick demo: nothing learned, the training rewards near 0
    "sft": {"accuracy": 0.0, "greedy_accuracy": 0.0469, "reward_mean": 0.0, "wall_s": 3.75, "peak_rss_mb": 443.8},
    "rm": {"pair_accuracy": 0.5694, "wall_s": 1.22, "peak_rss_mb": 469.0},
    "dpo": {"accuracy": 0.0156, "greedy_accuracy": 0.0, "reward_mean": 0.0156, "kl_to_ref": 0.0579, "wall_s": 5.22},
    "ppo": {"accuracy": 0.0, "greedy_accuracy": 0.0, "reward_mean": 0.0, "kl_to_ref": 0.0584, "train_reward_start": 0.0,
            "train_reward": 0.0312, "wall_s": 2.52, "peak_rss_mb": 12345.6, "model_copies": 3},
    "grpo": {"accuracy": 0.0, "greedy_accuracy": 0.0156, "reward_mean": 0.0, "kl_to_ref": 0.0582, "train_reward_start": 0.0,
             "train_reward": 0.0, "wall_s": 2.95, "peak_rss_mb": 487.7, "model_copies": 2},
}


def test_no_stage_of_a_run_that_learned_nothing_is_called_reward_hacking():
    verdicts = stage_verdicts(QUICK_STAGES)
    assert verdicts == {"dpo": "no learning", "ppo": "no learning", "grpo": "no learning"}  # not sft, not rm
    notes = findings(QUICK_STAGES)
    assert len(notes) == 3 and not any("hacking" in n for n in notes)
    assert notes[1].startswith("ppo: no learning") and "training reward 0.000 → 0.031" in notes[1]
    hacked = {**QUICK_STAGES, "ppo": {**QUICK_STAGES["ppo"], "train_reward_start": 1.8, "train_reward": 2.74, "accuracy": 0.0}}
    hacked["sft"] = {**QUICK_STAGES["sft"], "accuracy": 0.5}
    assert stage_verdicts(hacked)["ppo"] == "reward hacking"


def _column(table: str, key: str) -> list[str]:
    return re.findall(rf'<td class="[^"]*" title="{re.escape(key)}">([^<]*)</td>', table)


def test_stage_table_gives_each_column_one_number_format_and_scrolls_in_its_own_box():
    table = stage_table(QUICK_STAGES)
    assert table.startswith('<div class="scroll"><table>')
    assert _column(table, "accuracy") == ["0.000", "", "0.016", "0.000", "0.000"]
    assert _column(table, "greedy_accuracy") == ["0.047", "", "0.000", "0.000", "0.016"]
    assert _column(table, "wall_s") == ["3.8", "1.2", "5.2", "2.5", "3.0"]
    assert _column(table, "peak_rss_mb") == ["444", "469", "", "12,346", "488"]  # thousands separator
    assert _column(table, "train_reward") == ["", "", "", "0.000 → 0.031", "0.000 → 0.000"]
    assert _column(table, "model_copies") == ["", "", "", "3", "2"]
    assert "train_reward_start" not in re.findall(r'<th title="([^"]+)"', table)  # shown inside train_reward
    assert ">wall s</th>" in table and ">peak RSS MB</th>" in table


def test_readable_completions_show_bytes_that_are_not_utf8_instead_of_replacement_chars(tiny_qwen):
    from posttrain.evaluation import BYTE_OF_CHAR, readable_completions
    from posttrain.models import load_tokenizer
    from posttrain.rollout import generation_from_ids, left_pad

    tokenizer = load_tokenizer(str(tiny_qwen))
    char_of_byte = {b: c for c, b in BYTE_OF_CHAR.items()}

    def ids(data: bytes) -> list[int]:
        return tokenizer.convert_tokens_to_ids([char_of_byte[b] for b in data])

    eos = tokenizer.eos_token_id
    prompt, mask = left_pad([tokenizer("1+2=")["input_ids"]] * 3, tokenizer.pad_token_id)
    completions = torch.tensor([
        ids(b"1\xc3") + [eos, eos],  # a lone UTF-8 lead byte, then EOS
        ids("é5".encode()) + [eos],  # a whole two-byte character
        ids(b"12\x863"),  # a stray continuation byte, no EOS
    ])
    gen = generation_from_ids(prompt, mask, completions, tokenizer)
    assert gen.completions[0] == "1\ufffd" and "\ufffd" in gen.completions[2]  # what the plain decode shows
    assert readable_completions(tokenizer, gen, 3) == ["1\\xc3", "é5", "12\\x863"]
    assert readable_completions(tokenizer, gen, 2) == ["1\\xc3", "é5"]
