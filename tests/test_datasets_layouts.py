"""Datasets as the Hugging Face ecosystem stores them: save_to_disk folders (Dataset and DatasetDict),
hub snapshots sharded by split, .jsonl.gz and .csv. Each layout is built here with the `datasets`
library itself and must give the rows (and token ids) the same data gives as .jsonl."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict

from posttrain import data as D
from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.models import load_tokenizer

CHATS = [{"messages": [{"role": "user", "content": f"{a}+{a}="}, {"role": "assistant", "content": str(2 * a)}]}
         for a in range(7)]
PAIRS = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(7)]
PROMPTS = [{"prompt": f"{a}+3=", "answer": str(a + 3)} for a in range(7)]
COMPLETIONS = [{"prompt": f"{a}*2=", "completion": str(2 * a)} for a in range(7)]
KINDS = {"sft": CHATS, "sft_completion": COMPLETIONS, "dpo": PAIRS, "grpo": PROMPTS}


@pytest.fixture(scope="module")
def tok(tiny_qwen):
    return load_tokenizer(str(tiny_qwen))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def quietly(build):
    """Build a layout with datasets' own progress bars off (they are the test's noise, not the loader's)."""
    datasets.disable_progress_bars()
    try:
        return build()
    finally:
        datasets.enable_progress_bars()


def save_dataset(folder: Path, rows: list) -> Path:
    quietly(lambda: Dataset.from_list(rows).save_to_disk(str(folder)))
    return folder


def save_dataset_dict(folder: Path, splits: dict[str, list]) -> Path:
    quietly(lambda: DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder)))
    return folder


def hub_snapshot(folder: Path, train: list, test: list, shards: int = 3) -> Path:
    """data/train-0000i-of-0000N.parquet shards and one test shard, as the hub stores a converted dataset."""
    (folder / "data").mkdir(parents=True)
    size = -(-len(train) // shards)
    for i in range(shards):
        quietly(lambda: Dataset.from_list(train[i * size:(i + 1) * size]).to_parquet(
            str(folder / "data" / f"train-{i:05d}-of-{shards:05d}.parquet")))
    quietly(lambda: Dataset.from_list(test).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet")))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")  # a hub snapshot's card is not data
    return folder


def gzipped(path: Path, rows: list) -> Path:
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return path


def as_csv(path: Path, rows: list) -> Path:
    quietly(lambda: Dataset.from_list(rows).to_csv(str(path), index=False))
    return path


def examples(kind: str, rows: list[D.Row], tok):
    if kind.startswith("sft"):
        return D.sft_examples(rows, tok, 64, 32)
    if kind == "dpo":
        return D.preference_examples(rows, tok, 64, 32)
    return D.prompt_examples(rows, tok, 32)


def layouts(tmp_path: Path, rows: list, chat: bool) -> dict[str, Path]:
    out = {
        "save_to_disk": save_dataset(tmp_path / "ds", rows),
        "dataset_dict": save_dataset_dict(tmp_path / "dd", {"train": rows, "test": rows[:2]}),
        "hub_snapshot": hub_snapshot(tmp_path / "hub", rows, rows[:2]),
        "jsonl.gz": gzipped(tmp_path / "rows.jsonl.gz", rows),
    }
    if not chat:  # CSV cells are strings: chat messages cannot be CSV
        out["csv"] = as_csv(tmp_path / "rows.csv", rows)
    return out


# ------------------------------------------------------------------ same rows, same tokens


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_layout_gives_the_rows_of_the_jsonl(tmp_path, tok, kind):
    rows = KINDS[kind]
    reference = D.read_rows(str(write_jsonl(tmp_path / "rows.jsonl", rows)))
    expected = examples(kind, reference, tok)
    built = layouts(tmp_path, rows, chat=kind == "sft")
    assert len(built) == (4 if kind == "sft" else 5)
    for name, path in built.items():
        got = D.read_rows(str(path))
        assert [r.data for r in got] == rows, name
        assert examples(kind, got, tok) == expected, name


def test_sources_name_the_file_and_row(tmp_path):
    hub = hub_snapshot(tmp_path / "hub", PAIRS, PAIRS[:2])
    sources = [r.source for r in D.read_rows(str(hub))]
    assert sources[0] == f"{hub}/data/train-00000-of-00003.parquet:row 1"
    assert sources[3] == f"{hub}/data/train-00001-of-00003.parquet:row 1"  # 7 rows in shards of 3, 3, 1
    assert sources[6] == f"{hub}/data/train-00002-of-00003.parquet:row 1"
    dd = save_dataset_dict(tmp_path / "dd", {"train": PAIRS, "test": PAIRS[:2]})
    assert [r.source for r in D.read_rows(str(dd), split="test")] == [f"{dd}/test:row 1", f"{dd}/test:row 2"]
    assert D.read_rows(str(gzipped(tmp_path / "a.jsonl.gz", PAIRS)))[4].source == f"{tmp_path}/a.jsonl.gz:5"
    assert D.read_rows(str(as_csv(tmp_path / "a.csv", PAIRS)))[4].source == f"{tmp_path}/a.csv:6"  # line 1 is the header


def test_splits_of_a_dataset_dict_and_a_hub_snapshot(tmp_path):
    dd = save_dataset_dict(tmp_path / "dd", {"train": PAIRS[:5], "test": PAIRS[5:]})
    hub = hub_snapshot(tmp_path / "hub", PAIRS[:5], PAIRS[5:])
    for path in (dd, hub):
        assert [r.data for r in D.read_rows(str(path))] == PAIRS[:5]
        assert [r.data for r in D.read_rows(str(path), split="test")] == PAIRS[5:]
        assert D.has_split(str(path), "test") and not D.has_split(str(path), "validation")
        with pytest.raises(UserError, match=r"split 'validation' not found in .* \(splits: (train, test|test, train)\)"):
            D.read_rows(str(path), "eval_dataset_name", split="validation")
    # a single dataset is its own train split, whatever split is asked for, and has no test split
    single = save_dataset(tmp_path / "ds", PAIRS)
    assert [r.data for r in D.read_rows(str(single), split="test")] == PAIRS
    assert not D.has_split(str(single), "test")
    assert not D.has_split(str(write_jsonl(tmp_path / "p.jsonl", PAIRS)), "test")


def test_the_config_picks_train_and_test_splits(tmp_path, tiny_qwen):
    dd = save_dataset_dict(tmp_path / "dd", {"train": PAIRS[:5], "test": PAIRS[5:], "validation": PAIRS[:1]})
    base = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(dd), "output_dir": str(tmp_path / "out")}
    cfg = load_config("dpo", None, base, check_paths=True)
    assert [r.data for r in D.train_rows(cfg)] == PAIRS[:5]
    assert [r.data for r in D.eval_rows(cfg)] == PAIRS[5:]
    cfg = load_config("dpo", None, {**base, "dataset_train_split": "validation", "dataset_test_split": "train"})
    assert [r.data for r in D.train_rows(cfg)] == PAIRS[:1]
    assert [r.data for r in D.eval_rows(cfg)] == PAIRS[:5]
    assert D.eval_rows(load_config("dpo", None, {**base, "eval_strategy": "no"})) is None
    # an eval_dataset_name folder gives its dataset_test_split
    other = save_dataset_dict(tmp_path / "other", {"train": PAIRS[:1], "test": PAIRS[1:3]})
    cfg = load_config("dpo", None, {**base, "eval_dataset_name": str(other)})
    assert [r.data for r in D.eval_rows(cfg)] == PAIRS[1:3]
    # a missing split is refused before anything loads, naming the flag, the folder and its splits
    with pytest.raises(UserError, match=r"--dataset_train_split|--dataset_name") as info:
        load_config("dpo", None, {**base, "dataset_train_split": "dev"}, check_paths=True)
    assert "split 'dev' not found" in str(info.value) and "(splits: train, test, validation)" in str(info.value)
    with pytest.raises(UserError, match=r"split 'test' not found .*\(splits: train\)"):
        one = save_dataset_dict(tmp_path / "one", {"train": PAIRS})
        load_config("dpo", None, {**base, "eval_dataset_name": str(one)}, check_paths=True)


def test_eval_split_of_a_plain_file_is_none(tmp_path, tiny_qwen):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = load_config("dpo", None, {"model_name_or_path": str(tiny_qwen), "dataset_name": str(path)})
    assert D.eval_rows(cfg) is None


# ------------------------------------------------------------------ bad rows keep their file:line


def test_bad_rows_name_their_file_and_line(tmp_path, tok):
    bad = [*PAIRS[:2], {"prompt": "1+1=", "chosen": "2"}, *PAIRS[3:]]
    with pytest.raises(UserError, match=r"rows\.jsonl\.gz:3: missing field 'rejected'"):
        D.preference_examples(D.read_rows(str(gzipped(tmp_path / "rows.jsonl.gz", bad))), tok, 64, 32)
    lines = [json.dumps(r) for r in PAIRS[:4]] + ['{"prompt": "x", oops}']
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(UserError, match=r"broken\.jsonl\.gz:5: invalid JSON"):
        D.read_rows(str(tmp_path / "broken.jsonl.gz"))
    (tmp_path / "truncated.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "x"}\n')[:-6])
    with pytest.raises(UserError, match=r"truncated\.jsonl\.gz: not a valid gzip file"):
        D.read_rows(str(tmp_path / "truncated.jsonl.gz"))

    blank = [*PAIRS[:4], {"prompt": "1+1=", "chosen": " ", "rejected": "3"}, *PAIRS[5:]]
    hub = hub_snapshot(tmp_path / "hub", blank, PAIRS[:1])
    with pytest.raises(UserError, match=r"data/train-00001-of-00003\.parquet:row 2: field 'chosen' is only whitespace"):
        D.preference_examples(D.read_rows(str(hub)), tok, 64, 32)
    ds = save_dataset(tmp_path / "ds", blank)
    with pytest.raises(UserError, match=rf"{ds}:row 5: field 'chosen' is only whitespace"):
        D.preference_examples(D.read_rows(str(ds)), tok, 64, 32)

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('prompt,chosen,rejected\n"1+1=",2,3\n"2+2\n=",4\n')  # the second row starts on line 3
    with pytest.raises(UserError, match=r"pairs\.csv:3: 2 values for the 3 columns"):
        D.read_rows(str(csv_path))


def test_chat_messages_cannot_be_csv(tmp_path):
    path = tmp_path / "chats.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}]"\n')
    with pytest.raises(UserError, match=r"chats\.csv:1: a 'messages' column cannot be CSV"):
        D.read_rows(str(path))


def test_csv_values_are_strings(tmp_path, tok):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,answer,weight\n1+3=,4,0.5\n")
    [row] = D.read_rows(str(path))
    assert row.data == {"prompt": "1+3=", "answer": "4", "weight": "0.5"}


def test_folders_that_are_no_dataset(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", PAIRS)
    write_jsonl(folder / "b.jsonl", PAIRS)
    with pytest.raises(UserError, match=r"exactly one data file .* found a\.jsonl, b\.jsonl"):
        D.read_rows(str(folder))
    # files named by split at the top level are a dataset of splits too
    split = tmp_path / "split"
    split.mkdir()
    write_jsonl(split / "train.jsonl", PAIRS[:3])
    gzipped(split / "test.jsonl.gz", PAIRS[3:])
    assert [r.data for r in D.read_rows(str(split), split="test")] == PAIRS[3:]
    broken = tmp_path / "broken_dd"
    broken.mkdir()
    (broken / "dataset_dict.json").write_text("not json")
    with pytest.raises(UserError, match=r"dataset_dict\.json is not a datasets DatasetDict index"):
        D.read_rows(str(broken))


# ------------------------------------------------------------------ nothing on stdout


def test_loading_prints_nothing_and_restores_datasets_logging(tmp_path, capfd):
    folders = [save_dataset(tmp_path / "ds", PAIRS), save_dataset_dict(tmp_path / "dd", {"train": PAIRS, "test": PAIRS}),
               hub_snapshot(tmp_path / "hub", PAIRS, PAIRS), as_csv(tmp_path / "p.csv", PAIRS)]
    datasets.enable_progress_bars()
    datasets.logging.set_verbosity_info()
    try:
        capfd.readouterr()
        for path in folders:
            for split in ("train", "test"):
                assert len(D.read_rows(str(path), split=split)) == 7
        out, err = capfd.readouterr()
        assert out == "" and err == "", (out, err)
        assert datasets.is_progress_bar_enabled()
        assert datasets.logging.get_verbosity() == datasets.logging.INFO
    finally:
        datasets.logging.set_verbosity_warning()
