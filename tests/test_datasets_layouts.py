"""Datasets as the Hugging Face ecosystem stores them: save_to_disk folders (Dataset and DatasetDict),
hub snapshots sharded by split, .jsonl.gz and .csv. Each layout is built here with the `datasets`
library itself and must give the rows (and token ids) the same data gives as .jsonl."""

from __future__ import annotations

import gzip
import json
import math
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


# ------------------------------------------------------------------ hub snapshots as TRL users have them


def parquet(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    quietly(lambda: Dataset.from_list(rows).to_parquet(str(path)))
    return path


def test_config_folders_of_a_hub_snapshot(tmp_path, tiny_qwen):
    """gsm8k: main/ and socratic/, each {train,test}-00000-of-00001.parquet; imdb: one config, plain_text/."""
    gsm8k = tmp_path / "gsm8k"
    socratic = [{**r, "answer": "so " + r["answer"]} for r in PROMPTS]
    for name, rows in (("main", PROMPTS), ("socratic", socratic)):
        parquet(gsm8k / name / "train-00000-of-00001.parquet", rows[:5])
        parquet(gsm8k / name / "test-00000-of-00001.parquet", rows[5:])
    (gsm8k / "README.md").write_text("---\nlicense: mit\n---\n")  # front matter without `configs:`
    with pytest.raises(UserError) as info:
        D.read_rows(str(gsm8k))
    assert str(info.value) == f"dataset_name: {gsm8k} holds several configs (main, socratic); choose one with dataset_config"
    assert [r.data for r in D.read_rows(str(gsm8k), config="main")] == PROMPTS[:5]
    assert [r.data for r in D.read_rows(str(gsm8k), split="test", config="socratic")] == socratic[5:]
    assert D.read_rows(str(gsm8k), config="main")[0].source == f"{gsm8k}/main/train-00000-of-00001.parquet:row 1"
    with pytest.raises(UserError) as info:
        D.read_rows(str(gsm8k), config="default")
    assert str(info.value) == f"dataset_name: dataset_config 'default' is not a config of {gsm8k} (configs: main, socratic)"
    # the command line: --dataset_config picks the folder for training and held-out rows, checked before anything loads
    base = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(gsm8k), "output_dir": str(tmp_path / "out")}
    cfg = load_config("grpo", None, {**base, "dataset_config": "socratic"}, check_paths=True)
    assert [r.data for r in D.train_rows(cfg)] == socratic[:5]
    assert [r.data for r in D.eval_rows(cfg)] == socratic[5:]
    with pytest.raises(UserError, match=r"^--dataset_name: .* holds several configs \(main, socratic\)"):
        load_config("grpo", None, base, check_paths=True)
    # one config is read without naming it, every split of it (imdb's unsupervised too)
    imdb = tmp_path / "imdb"
    texts = [{"text": f"review {i}", "label": i % 2} for i in range(6)]
    for split, rows in (("train", texts[:3]), ("test", texts[3:5]), ("unsupervised", texts[5:])):
        parquet(imdb / "plain_text" / f"{split}-00000-of-00001.parquet", rows)
    assert [r.data for r in D.read_rows(str(imdb))] == texts[:3]
    assert [r.data for r in D.read_rows(str(imdb), split="unsupervised", config="plain_text")] == texts[5:]
    assert D.has_split(str(imdb), "test") and not D.has_split(str(imdb), "validation")


def test_any_split_name_a_snapshot_has(tmp_path, tiny_qwen):
    """ultrachat_200k / ultrafeedback_binarized: data/{train,test}_{sft,gen,prefs}-0000i-of-0000N.parquet."""
    hub = tmp_path / "ultrafeedback"
    for i in range(2):
        parquet(hub / "data" / f"train_prefs-{i:05d}-of-00002.parquet", PAIRS[i * 3:(i + 1) * 3])
    parquet(hub / "data" / "test_prefs-00000-of-00001.parquet", PAIRS[6:])
    parquet(hub / "data" / "train_gen-00000-of-00001.parquet", PROMPTS)
    assert [r.data for r in D.read_rows(str(hub), split="train_prefs")] == PAIRS[:6]
    with pytest.raises(UserError) as info:
        D.read_rows(str(hub))
    assert str(info.value) == f"dataset_name: split 'train' not found in {hub} (splits: test_prefs, train_gen, train_prefs)"
    base = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(hub), "output_dir": str(tmp_path / "out")}
    cfg = load_config("dpo", None, {**base, "dataset_train_split": "train_prefs", "dataset_test_split": "test_prefs"},
                      check_paths=True)
    assert [r.data for r in D.train_rows(cfg)] == PAIRS[:6]
    assert [r.data for r in D.eval_rows(cfg)] == PAIRS[6:]
    with pytest.raises(UserError, match=r"^--dataset_name: field 'dataset_name': split 'train_sft' not found in .* "
                                        r"\(splits: test_prefs, train_gen, train_prefs\)$"):
        load_config("dpo", None, {**base, "dataset_train_split": "train_sft"}, check_paths=True)
    # top-level files named by any split, unsharded, as a DatasetDict's to_json would write them
    flat = tmp_path / "flat"
    flat.mkdir()
    write_jsonl(flat / "train_sft.jsonl", CHATS[:4])
    write_jsonl(flat / "test.jsonl", CHATS[4:])
    assert [r.data for r in D.read_rows(str(flat), split="train_sft")] == CHATS[:4]


CARD = """---
license: mit
configs:
- config_name: default
  data_files:
  - split: train
    path: "pairs/part-*.jsonl"
  - split: held_out
    path: [pairs/last.parquet]
- config_name: prompts
  data_dir: prompts
  data_files: "*.jsonl"
- config_name: chats
  data_dir: chats
---
# A dataset card
"""


def test_the_readme_configs_block_defines_configs_and_splits(tmp_path):
    """Files named as nothing posttrain would guess; the card's globs (relative to the root, or a config's
    data_dir) say which is which, as datasets.load_dataset reads them."""
    hub = tmp_path / "card"
    write_jsonl((hub / "pairs").mkdir(parents=True) or hub / "pairs" / "part-a.jsonl", PAIRS[:2])
    write_jsonl(hub / "pairs" / "part-b.jsonl", PAIRS[2:5])
    parquet(hub / "pairs" / "last.parquet", PAIRS[5:])
    write_jsonl((hub / "prompts").mkdir() or hub / "prompts" / "whatever.jsonl", PROMPTS)
    parquet(hub / "chats" / "train-00000-of-00001.parquet", CHATS[:5])
    parquet(hub / "chats" / "validation-00000-of-00001.parquet", CHATS[5:])
    parquet(hub / "data" / "train-00000-of-00001.parquet", CHATS)  # not listed in the card: not read
    (hub / "README.md").write_text(CARD)
    assert [r.data for r in D.read_rows(str(hub))] == PAIRS[:5]  # the config named default
    assert [r.data for r in D.read_rows(str(hub), split="held_out")] == PAIRS[5:]
    assert D.has_split(str(hub), "held_out") and not D.has_split(str(hub), "test")
    assert [r.data for r in D.read_rows(str(hub), config="prompts")] == PROMPTS
    assert [r.data for r in D.read_rows(str(hub), split="validation", config="chats")] == CHATS[5:]
    with pytest.raises(UserError, match=r"^dataset_name: split 'test' not found in .* \(splits: train, held_out\)$"):
        D.read_rows(str(hub), split="test")
    # several configs and none of them the default: one line listing them
    (hub / "README.md").write_text(CARD.replace("config_name: default", "config_name: pairs"))
    with pytest.raises(UserError) as info:
        D.read_rows(str(hub))
    assert str(info.value) == f"dataset_name: {hub} holds several configs (pairs, prompts, chats); choose one with dataset_config"
    (hub / "README.md").write_text(CARD.replace("config_name: prompts", "config_name: prompts\n  default: true"))
    with pytest.raises(UserError, match="several configs"):  # two defaults (`default` and `default: true`)
        D.read_rows(str(hub))
    (hub / "README.md").write_text(CARD.replace("config_name: default", "config_name: pairs").replace(
        "config_name: prompts", "config_name: prompts\n  default: true"))
    assert [r.data for r in D.read_rows(str(hub))] == PROMPTS
    # a pattern that matches nothing names the card, the config and the pattern
    (hub / "README.md").write_text(CARD.replace("pairs/last.parquet", "pairs/gone-*.parquet"))
    with pytest.raises(UserError) as info:
        D.read_rows(str(hub))
    assert str(info.value) == (f"dataset_name: {hub}/README.md: config 'default': split 'held_out' path 'pairs/gone-*.parquet' "
                               f"matches no .jsonl, .jsonl.gz, .json, .parquet or .csv file under {hub}")
    (hub / "README.md").write_text("---\nconfigs: [oops\n---\n")
    with pytest.raises(UserError, match=r"^dataset_name: .*README\.md: the front matter is not valid YAML"):
        D.read_rows(str(hub))


# ------------------------------------------------------------------ plain text (SFT) and implicit prompts (rm, dpo)


TEXTS = [{"content": f"{a}+{a}={2 * a}", "source": "arith"} for a in range(6)]


def test_plain_text_sft_trains_every_token(tmp_path, tok):
    eos = tok.eos_token_id
    for path in (write_jsonl(tmp_path / "texts.jsonl", [{"text": r["content"]} for r in TEXTS]),
                 parquet(tmp_path / "texts.parquet", [{"text": r["content"]} for r in TEXTS])):
        examples_ = D.sft_examples(D.read_rows(str(path)), tok, 64, 32)
        assert [(e.prompt_ids, e.completion_ids) for e in examples_] == \
            [([], D._ids(tok, r["content"]) + [eos]) for r in TEXTS]
        batch = D.collate_examples(examples_, tok.pad_token_id)  # completion-only: every token but the first is a target
        assert batch.loss_mask.sum(1).tolist() == [len(D._ids(tok, r["content"])) for r in TEXTS]
    # dataset_text_field names another column; a text already ending with EOS gets no second one
    rows = [*TEXTS[:2], {"content": TEXTS[2]["content"] + tok.eos_token, "source": "x"}]
    got = D.sft_examples(D.read_rows(str(write_jsonl(tmp_path / "content.jsonl", rows))), tok, 64, 32, "content")
    assert [e.completion_ids for e in got] == [D._ids(tok, r["content"]) + [eos] for r in TEXTS[:3]]
    with pytest.raises(UserError) as info:
        D.sft_examples(D.read_rows(str(write_jsonl(tmp_path / "c.jsonl", TEXTS))), tok, 64, 32)
    assert str(info.value) == (f"{tmp_path / 'c.jsonl'}:1: an SFT row needs 'messages', 'prompt' and 'completion', "
                               "or a plain-text 'text' field (dataset_text_field)")
    with pytest.raises(UserError) as info:
        D.sft_examples(D.read_rows(str(write_jsonl(tmp_path / "n.jsonl", [{"text": "a"}, {"text": 3}]))), tok, 64, 32)
    assert str(info.value) == f"{tmp_path / 'n.jsonl'}:2: field 'text' must be a string, got a number"
    with pytest.raises(UserError, match=r"m\.jsonl:2: mixed row formats: this row has 'messages' fields but the first "
                                        r"row .* has 'text'"):
        D.sft_examples(D.read_rows(str(write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, CHATS[0]]))), tok, 64, 32)


def test_sft_recipe_trains_on_a_text_column(tmp_path, tiny_qwen, tok):
    from posttrain.metrics import read_metrics
    from posttrain.recipes import sft

    data = tmp_path / "texts"  # one config folder, its test split held out
    parquet(data / "plain_text" / "train-00000-of-00001.parquet", TEXTS)
    parquet(data / "plain_text" / "test-00000-of-00001.parquet", TEXTS[:2])
    cfg = load_config("sft", None, {"model_name_or_path": str(tiny_qwen), "dataset_name": str(data),
                                    "output_dir": str(tmp_path / "out"), "dataset_text_field": "content",
                                    "per_device_train_batch_size": "6", "max_steps": "1", "logging_steps": "1",
                                    "progress": "false", "num_threads": "1"}, check_paths=True)
    sft.main(cfg)
    [record] = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert record["num_tokens"] == sum(len(D._ids(tok, r["content"])) for r in TEXTS)  # every token, EOS included
    assert math.isfinite(record["eval/loss"]) and record["eval/perplexity"] > 1


HH = [("\n\nHuman: What is 2+2?\n\nAssistant: 4", "\n\nHuman: What is 2+2?\n\nAssistant: 5"),
      ("\n\nHuman: Hi\n\nAssistant: Hello there.", "\n\nHuman: Hi\n\nAssistant: Help there."),  # splits in a word, as TRL
      ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no")]


def test_string_pairs_with_the_prompt_inside_split_as_trl_does(tmp_path, tok):
    extract_prompt = pytest.importorskip("trl.data_utils").extract_prompt
    rows = [{"chosen": c, "rejected": r} for c, r in HH]
    for path in (write_jsonl(tmp_path / "hh.jsonl", rows), parquet(tmp_path / "hh" / "data" / "train-00000-of-00001.parquet", rows)):
        pairs = D.preference_examples(D.read_rows(str(path)), tok, 256, 128)
        for (chosen, rejected), pair in zip(HH, pairs):
            trl = extract_prompt({"chosen": chosen, "rejected": rejected})
            assert trl["prompt"].endswith(("Assistant:", "Assistant: Hel"))
            prompt_ids = D._ids(tok, trl["prompt"])
            assert pair.chosen == D.Example(prompt_ids, D._ids(tok, trl["chosen"]) + [tok.eos_token_id])
            assert pair.rejected == D.Example(prompt_ids, D._ids(tok, trl["rejected"]) + [tok.eos_token_id])
    for (chosen, rejected), message in [
            (("same", "same"), "'chosen' and 'rejected' are identical, so no differing character splits off the prompt"),
            (("Assistant: 4", "Assistant: 45"), "'chosen' is the start of 'rejected', with no character of its own"),
            (("yes", "no"), "'chosen' and 'rejected' share no leading character and there is no 'prompt'"),
            ((" yes", " no"), "'chosen' and 'rejected' share no leading character and there is no 'prompt'")]:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": chosen, "rejected": rejected}])
        with pytest.raises(UserError) as info:
            D.preference_examples(D.read_rows(str(path)), tok, 64, 32)
        assert str(info.value).startswith(f"{path}:1: {message}")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_rm_and_dpo_train_on_hh_rlhf_pairs(tmp_path, tiny_qwen, stage):
    import importlib

    from posttrain.metrics import read_metrics

    data = parquet(tmp_path / "hh" / "data" / "train-00000-of-00001.parquet", [{"chosen": c, "rejected": r} for c, r in HH])
    cfg = load_config(stage, None, {"model_name_or_path": str(tiny_qwen), "dataset_name": str(data.parent.parent),
                                    "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": "3",
                                    "max_steps": "1", "logging_steps": "1", "eval_strategy": "no", "progress": "false",
                                    "num_threads": "1"}, check_paths=True)
    importlib.import_module(f"posttrain.recipes.{stage}").main(cfg)
    [record] = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert math.isfinite(record["loss"])
