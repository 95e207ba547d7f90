"""Rows on disk -> token ids -> padded (or packed, padding-free) batches.

Formats (DESIGN.md §3), one JSON object per row, from .jsonl, .jsonl.gz, .json, .parquet
or .csv files (CSV values are strings, so chat messages cannot be CSV), a folder holding one,
a ``datasets`` save_to_disk folder (Dataset, or DatasetDict with one split chosen), or a hub
snapshot: files named by split under any split name (``data/train_sft-00000-of-00003.parquet``),
one folder of those per config (gsm8k's ``main/``), or the configs and splits of its README.md
``configs:`` block, as ``datasets.load_dataset`` reads them (``dataset_config`` picks one):

- SFT:        {"messages": [...]}, {"prompt": str|messages, "completion": str|messages}, or
              {"text": str} (``dataset_text_field``: language modelling, every token trained)
- preference: {"prompt", "chosen", "rejected"}, or {"chosen", "rejected"} alone whose longest
              common prefix is the prompt: shared leading turns of conversations, shared
              leading text of strings (hh-rlhf; TRL's ``extract_prompt``)
- prompts:    {"prompt": str|messages, ...extra fields passed to reward functions}
- unpaired:   {"prompt", "completion", "label": bool} (kto; TRL's unpaired preference format),
              or preference pairs, each unpaired into a desirable and an undesirable row

A bare string prompt is used as is (it may already carry a chat template); a
completion string gets the EOS token appended. Messages go through the
tokenizer's chat template, and loss / log-probs cover assistant turns only. A
template that rewrites earlier turns as the chat grows (Qwen3 drops the
``<think>`` blocks of earlier assistant turns) cannot be split turn by turn:
such conversations train on their final assistant turn only, with a warning.

Truncation policy: a prompt longer than ``max_prompt_length`` keeps its *last*
tokens (those next to the response); then the completion keeps its *first*
``max_length - len(prompt)`` tokens. If that leaves fewer than
``max_length // 4`` completion tokens, the prompt is cut further from the left
so every row still trains on a response. A preference pair is truncated once,
with that minimum computed from the longer of chosen and rejected, so both
sides condition on exactly the same prompt tokens; each response then keeps
its first ``max_length - len(prompt)`` tokens.

Every bad input raises UserError naming file:line (``file:row N`` in .json,
.parquet and save_to_disk datasets) and the field: bytes that are not UTF-8, invalid or too deeply
nested JSON, lone UTF-16 surrogates (``"\\ud800"``: json accepts them, no
tokenizer encodes them), a .json file that is not a list, rows that are not
objects, missing fields and fields of the wrong type, texts that are empty or
only whitespace (a string ``prompt`` may be empty, meaning no prompt, but not
only whitespace), messages with a role other than system, user, assistant or
tool or with blank content (an assistant turn carrying ``tool_calls`` may have
empty content), margins that are not finite numbers, KTO labels that are not true / false, and an SFT file that
mixes ``messages`` rows with prompt/completion rows (the first row of the
other format is named; in parquet a null column counts as absent). Values nested
nearly as deep as json allows are an error too. A UTF-8 byte-order mark
at the start of a file is dropped. No row is ever skipped.

Warnings (one line each on stderr, once per file, after the file is loaded):
the number of prompts longer than ``max_prompt_length`` (they keep their last
tokens), and the number of preference pairs whose chosen == rejected (the same
string or the same messages): they are kept but carry no preference signal
(their loss does not depend on the weights, so has no gradient). A conversation pair
(no ``prompt``) with identical conversations stays an error, as there is no
differing turn to split its prompt off at.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import math
import random
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from posttrain import distributed
from posttrain.errors import UserError
from posttrain.losses import packed_sequence_logps, sequence_logps

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # the shard suffix of hub files: train-00000-of-00003.parquet


# ---------------------------------------------------------------- reading rows


@dataclass
class Row:
    source: str  # "file:line" (or "file:row N") for error messages
    data: dict


def _suffix(p: Path) -> str:
    """The data suffix of a file name ('.jsonl.gz' counts as one), or ''."""
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if p.name.endswith(s)), "")


def _stem(p: Path) -> str:
    """A data file's name without its data suffix (data/test-00001-of-00003.parquet -> test-00001-of-00003)."""
    return p.name[:len(p.name) - len(_suffix(p))]


def _split_of(p: Path) -> str:
    """A hub file's split: its name before the shard suffix and the data suffix (data/test-00001-of-00003.parquet -> test)."""
    return _SHARD.sub("", _stem(p)).split(".")[0]


def _data_files(folder: Path) -> list[Path]:
    """The data files of a folder and of its ``data/`` (names starting with . or _ are not data)."""
    return sorted(q for f in (folder, folder / "data") if f.is_dir() for q in f.iterdir()
                  if q.is_file() and _suffix(q) and not q.name.startswith((".", "_")))


def _files_layout(found: list[Path], path: str, field: str) -> tuple[dict[str, list[Path]], bool]:
    """Data files as splits: one file is one dataset; several are named by split, as the hub names them
    (train.jsonl, data/train_sft-00000-of-00003.parquet: any split name before the shard suffix)."""
    if len(found) == 1:
        return {"train": found}, False
    splits: dict[str, list[Path]] = {}
    for q in found:
        splits.setdefault(_split_of(q), []).append(q)
    if not ({"train", "test", "validation"} & set(splits) or any(_SHARD.search(_stem(q)) for q in found)):
        names = ", ".join(q.name for q in found[:6]) or "none"
        raise UserError(f"{field}: folder {path!r} must hold exactly one data file (.jsonl, .jsonl.gz, .json, .parquet, "
                        f".csv), data files named by split (train.jsonl, data/train-00000-of-00003.parquet), config "
                        f"folders of those (main/train-00000-of-00001.parquet) or a datasets save_to_disk dataset; found {names}")
    return splits, True


def _pick_config(names: list[str], default: str | None, config: str, path: str, field: str) -> str:
    """The config to read: ``config`` (dataset_config) when given, else the only one, else the default one."""
    if config:
        if config not in names:
            raise UserError(f"{field}: dataset_config {config!r} is not a config of {path} (configs: {', '.join(names)})")
        return config
    if len(names) == 1 or default:
        return default or names[0]
    raise UserError(f"{field}: {path} holds several configs ({', '.join(names)}); choose one with dataset_config")


def _card_configs(p: Path, field: str) -> dict[str, dict] | None:
    """The ``configs:`` block of a hub snapshot's README.md front matter: config name -> its YAML mapping
    (data_files, data_dir, default), as ``datasets.load_dataset`` reads it; None without one."""
    card = p / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
    match = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if not match:
        return None
    import yaml

    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise UserError(f"{field}: {card}: the front matter is not valid YAML ({_one_line(str(err), 120)})") from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if configs is None:
        return None
    if not isinstance(configs, list) or not all(isinstance(c, dict) and isinstance(c.get("config_name"), str)
                                                for c in configs):
        raise UserError(f"{field}: {card}: `configs` must be a list of mappings, each with a `config_name`")
    return {c["config_name"]: c for c in configs}


def _card_splits(p: Path, name: str, spec: dict, field: str) -> tuple[dict[str, list[Path]], bool]:
    """One README.md config's splits: its data_files patterns (a pattern, a list of them, or a list of
    {split, path}; no split means train) globbed relative to the snapshot root (or its data_dir), or,
    with data_dir alone, that folder's files named by split."""
    base = p / str(spec.get("data_dir") or "")
    data_files = spec.get("data_files")
    where = f"{field}: {p / 'README.md'}: config {name!r}"
    if data_files is None:
        return _files_layout(_data_files(base), str(base), field)
    if isinstance(data_files, (str, dict)) or (isinstance(data_files, list) and not any(isinstance(d, dict) for d in data_files)):
        entries = data_files.items() if isinstance(data_files, dict) else [("train", data_files)]
    elif all(isinstance(d, dict) and "split" in d and isinstance(d.get("path"), (str, list)) for d in data_files):
        entries = [(d["split"], d["path"]) for d in data_files]
    else:
        raise UserError(f"{where}: data_files must be a path pattern, a list of them, or a list of {{split, path}}")
    splits: dict[str, list[Path]] = {}
    for split, patterns in entries:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            matched = sorted(q for q in base.glob(str(pattern)) if q.is_file() and _suffix(q)) if pattern else []
            if not matched:
                raise UserError(f"{where}: split {split!r} path {pattern!r} matches no .jsonl, .jsonl.gz, .json, .parquet "
                                f"or .csv file under {base}")
            splits.setdefault(str(split), []).extend(q for q in matched if q not in splits.get(str(split), []))
    return splits, True


def _layout(path: str, field: str = "dataset_name", config: str = "") -> tuple[dict[str, list[Path]], bool]:
    """The splits of a dataset source, each as its files (a save_to_disk folder as itself), and whether
    the source is named by split (False: one dataset, whatever split is asked for).

    A file is one dataset. A folder is, in this order: a ``DatasetDict.save_to_disk`` folder
    (dataset_dict.json; one sub-folder per split), a ``Dataset.save_to_disk`` folder (state.json), a
    hub snapshot whose README.md ``configs:`` block names its configs and their splits' files, a folder
    holding exactly one data file, a hub snapshot whose data files, in the folder or its ``data/``, are
    named by split (train.jsonl, data/train_sft-00000-of-00003.parquet, ...), or a hub snapshot with one
    such folder per config (gsm8k's main/ and socratic/). ``config`` (dataset_config) picks the config;
    without it a source's only (or default) config is read. A source without configs ignores it.
    """
    p = Path(path)
    if p.is_file():
        if not _suffix(p):
            raise UserError(f"{field}: {path!r} is not a .jsonl, .jsonl.gz, .json, .parquet or .csv file")
        return {"train": [p]}, False
    if not p.is_dir():
        raise UserError(f"{field}: file {path!r} not found")
    if (p / "dataset_dict.json").is_file():
        try:
            names = json.loads((p / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{field}: {p / 'dataset_dict.json'} is not a datasets DatasetDict index") from None
        return {str(name): [p / str(name)] for name in names}, True
    if (p / "state.json").is_file():
        return {"train": [p]}, False
    card = _card_configs(p, field)
    if card:
        default = [n for n, c in card.items() if len(card) == 1 or n == "default" or c.get("default") is True]
        name = _pick_config(list(card), default[0] if len(default) == 1 else None, config, path, field)
        return _card_splits(p, name, card[name], field)
    found = _data_files(p)
    folders = [q.name for q in sorted(p.iterdir()) if q.is_dir() and q.name != "data"
               and not q.name.startswith((".", "_")) and _data_files(q)] if not found else []
    if folders:
        name = _pick_config(folders, "default" if "default" in folders else None, config, path, field)
        return _files_layout(_data_files(p / name), str(p / name), field)
    return _files_layout(found, path, field)


def split_files(path: str, split: str = "train", field: str = "dataset_name", config: str = "") -> list[Path]:
    """The files of one split of a source (a source of one dataset is that split, whatever its name)."""
    splits, named = _layout(path, field, config)
    if not named:
        return splits["train"]
    if split not in splits:
        raise UserError(f"{field}: split {split!r} not found in {path} (splits: {', '.join(splits)})")
    return splits[split]


def has_split(path: str, split: str, config: str = "") -> bool:
    """Whether a source named by split (a DatasetDict or hub folder) holds ``split``; never a single dataset."""
    try:
        splits, named = _layout(path, config=config)
    except UserError:
        return False
    return named and split in splits


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' progress bars and info logging off while a dataset loads (nothing on stdout), restored after."""
    import datasets

    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _decode(p: Path, data: bytes | None = None) -> str:
    """The file's text (or ``data``, its decompressed bytes): UTF-8, a leading byte-order mark dropped;
    bad bytes name their line."""
    data = p.read_bytes() if data is None else data
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[:err.start].decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        raise UserError(f"{p}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


def _lines(text: str):
    """The lines of a text split at \n, \r\n or \r, as open() reads them (not at the other breaks
    str.splitlines knows, such as U+2028, which JSON strings may hold raw)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def _parse_json(p: Path, text: str, number: int = 0):
    """json.loads with errors as UserError at file:line (number: the line of a .jsonl row; 0 for a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = number or err.lineno
        where = f" at column {err.colno}" if number else ""
        hint = "; is it JSON Lines? then name it .jsonl" if not number and err.msg == "Extra data" else ""
        raise UserError(f"{p}:{line}: invalid JSON ({err.msg}{where}{hint})") from None
    except RecursionError:
        raise UserError(f"{p}:{number or 1}: invalid JSON (nested too deeply)") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a (possibly lone) UTF-16 surrogate enters JSON text


def _holds_surrogate(value) -> bool:
    """Whether a JSON value holds, at any depth, a string UTF-8 cannot encode (a lone surrogate).
    Iterative: rows may nest deeply."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack += [x for kv in item.items() for x in kv]
        elif isinstance(item, list):
            stack += item
    return False


def _check_surrogates(row: Row) -> None:
    """json accepts a lone surrogate ("\\ud800"), but no tokenizer can encode it: an error naming
    the top-level field that holds one."""
    if not isinstance(row.data, dict):
        return  # reported as "expected a JSON object"
    for key, value in row.data.items():
        if _holds_surrogate(key) or _holds_surrogate(value):
            raise UserError(f"{row.source}: field {key!r} holds a lone UTF-16 surrogate (an unpaired "
                            "\\ud800-\\udfff escape), which no tokenizer can encode")


def read_rows(path: str, field: str = "dataset_name", split: str = "train", config: str = "") -> list[Row]:
    """Every row of a dataset source (a file, or one ``split`` of a folder's ``config``: see ``_layout``) with its
    file:line (``file:row N`` for .json, .parquet and save_to_disk rows).

    Bad bytes, invalid or too deeply nested JSON, lone surrogates, a .json file that is not a
    list and rows that are not objects are UserErrors naming file:line; a leading UTF-8
    byte-order mark is dropped.
    """
    files = split_files(path, split, field, config)
    rows = [row for p in files for row in _file_rows(p)]
    if not rows:
        raise UserError(f"{files[0] if len(files) == 1 else path}: no rows (the file is empty or holds only blank lines)")
    for row in rows:
        if not isinstance(row.data, dict):
            raise UserError(f"{row.source}: expected a JSON object, got {_json_type(row.data)}")
    return rows


def train_rows(cfg) -> list[Row]:
    """The training rows: dataset_name (its dataset_config's dataset_train_split when it has configs and splits)."""
    return read_rows(cfg.dataset_name, "dataset_name", cfg.dataset_train_split, cfg.dataset_config)


def eval_rows(cfg, always: bool = False) -> list[Row] | None:
    """The held-out rows: eval_dataset_name (its dataset_test_split when it is named by split), else
    dataset_name's dataset_test_split when it has one; None when there are none, or when eval_strategy
    is `no` (unless ``always``: the reward model reports its held-out accuracy at the end either way)."""
    if cfg.eval_strategy == "no" and not always:
        return None
    if getattr(cfg, "eval_dataset_name", ""):
        return read_rows(cfg.eval_dataset_name, "eval_dataset_name", cfg.dataset_test_split, cfg.dataset_config)
    if has_split(cfg.dataset_name, cfg.dataset_test_split, cfg.dataset_config):
        return read_rows(cfg.dataset_name, "dataset_name", cfg.dataset_test_split, cfg.dataset_config)
    return None


def _file_rows(p: Path) -> list[Row]:
    """The rows of one data file or save_to_disk folder."""
    suffix = _suffix(p) if p.is_file() else "arrow"
    if suffix in (".jsonl", ".jsonl.gz"):
        text = _decode(p, _gunzip(p) if suffix == ".jsonl.gz" else None)
        rows = []
        for number, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            obj = _parse_json(p, line, number)
            rows.append(Row(f"{p}:{number}", obj))
            if _SURROGATE_ESCAPE.search(line):
                _check_surrogates(rows[-1])
        return rows
    if suffix == ".json":
        text = _decode(p)
        objs = _parse_json(p, text)
        if not isinstance(objs, list):
            raise UserError(f"{p}:1: expected a JSON list of row objects, got {_json_type(objs)}")
        rows = [Row(f"{p}:row {i}", obj) for i, obj in enumerate(objs, 1)]
        if _SURROGATE_ESCAPE.search(text):
            for row in rows:
                _check_surrogates(row)
        return rows
    if suffix == ".csv":
        return _csv_rows(p, _decode(p))
    try:
        with _quiet_datasets():
            if suffix == "arrow":
                import datasets

                table = datasets.load_from_disk(str(p))
                objs = table.to_list() if isinstance(table, datasets.Dataset) else None
            else:
                import pyarrow.parquet

                objs = pyarrow.parquet.read_table(p).to_pylist()
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
        what = "a datasets save_to_disk folder" if suffix == "arrow" else "parquet"
        raise UserError(f"{p}: cannot read {what} ({type(err).__name__}: {_one_line(str(err))})") from None
    if objs is None:
        raise UserError(f"{p}: a DatasetDict folder; name one split's folder or the DatasetDict folder itself")
    return [Row(f"{p}:row {i}", obj) for i, obj in enumerate(objs, 1)]


def _gunzip(p: Path) -> bytes:
    try:
        return gzip.decompress(p.read_bytes())
    except (OSError, EOFError) as err:
        raise UserError(f"{p}: not a valid gzip file ({_one_line(str(err))})") from None


def _csv_rows(p: Path, text: str) -> list[Row]:
    """CSV rows: the header names the fields, every value is a string; file:line is the line a row starts on.
    Chat messages are lists, which CSV cannot hold."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        if "messages" in header:
            raise UserError(f"{p}:1: a 'messages' column cannot be CSV (its value is a list of chat messages); "
                            "store chat rows as .jsonl, .json, .parquet or a datasets folder")
        rows, start = [], reader.line_num + 1
        for values in reader:
            if values:
                if len(values) != len(header):
                    raise UserError(f"{p}:{start}: {len(values)} values for the {len(header)} columns of the header")
                rows.append(Row(f"{p}:{start}", dict(zip(header, values))))
            start = reader.line_num + 1
    except csv.Error as err:
        raise UserError(f"{p}:{reader.line_num}: invalid CSV ({err})") from None
    return rows


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _describe(value) -> str:
    """A short one-line account of a JSON value for an error message (nested values by type only:
    their repr may be huge, or too deep to build)."""
    return _json_type(value) if isinstance(value, (list, dict)) else _one_line(repr(value), 60)


def _one_line(text: str, limit: int = 300) -> str:
    """Text for a one-line error message: whitespace runs collapsed, long text cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _need(row: Row, key: str):
    if key not in row.data:
        names = [repr(k) for k in row.data]
        has = ", ".join(names[:12]) + (f", ... ({len(names)} fields)" if len(names) > 12 else "")
        raise UserError(f"{row.source}: missing field {key!r} (has: {has or 'nothing'})")
    return row.data[key]


ROLES = ("system", "user", "assistant", "tool")


def _check_text_or_messages(row: Row, key: str, value) -> None:
    """A text field is a non-blank string, or a non-empty list of messages with a known role and
    non-blank string content. A string ``prompt`` may be empty (no prompt), not only whitespace."""
    if isinstance(value, str):
        if not value.strip() and not (key == "prompt" and not value):
            raise UserError(f"{row.source}: field {key!r} is {'an empty string' if not value else 'only whitespace'}")
        return
    if not isinstance(value, list) or not value:
        raise UserError(f"{row.source}: field {key!r} must be a string or a non-empty list of messages, "
                        f"got {'an empty list' if isinstance(value, list) else _json_type(value)}")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise UserError(f"{row.source}: field {key!r} message {i} needs string 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise UserError(f"{row.source}: field {key!r} message {i} has unknown role {_describe(msg['role'])} "
                            "(expected system, user, assistant or tool)")
        if not msg["content"].strip() and not (msg["role"] == "assistant" and msg.get("tool_calls")):
            raise UserError(f"{row.source}: field {key!r} message {i} ({msg['role']}) has "
                            f"{'empty' if not msg['content'] else 'only whitespace'} content")


def _check_same_kind(row: Row, prompt, key: str, response) -> None:
    """A plain-text prompt is not templated, so its response cannot be chat messages.

    (A conversation prompt with a string response is fine: the string is the assistant turn.)
    """
    if isinstance(prompt, str) and not isinstance(response, str):
        raise UserError(f"{row.source}: 'prompt' is a string, so {key!r} must be a string too, not messages "
                        "(both can be lists of messages)")


# ----------------------------------------------------------------- tokenising


@dataclass
class Example:
    """One tokenised row: prompt ids, then response ids (the part that is trained or scored)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_weights: list[int] | None = None  # 1 where a token counts (multi-turn chat), else all 1


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's render of messages. Raises TemplateMismatch (callers name the row's
    file:line) when the tokenizer has no template or the template rejects the messages."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateMismatch("the tokenizer has no chat template, so rows with messages cannot be encoded; set "
                               "`chat_template_path` to a Jinja template file (or give plain-string prompts)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateSyntaxError as err:
        raise TemplateMismatch(f"the chat template is not valid Jinja (line {err.lineno}: {err.message})") from None
    except TemplateError as err:  # e.g. raise_exception() on roles the template does not accept
        raise TemplateMismatch(f"the chat template rejects these messages: {_one_line(str(err))}") from None
    except (TypeError, ValueError, KeyError, IndexError) as err:  # the template's own code failed on these messages
        raise TemplateMismatch(f"the chat template failed on these messages ({type(err).__name__}: "
                               f"{_one_line(str(err))})") from None


def encode_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return _ids(tokenizer, prompt)
    return _ids(tokenizer, _template(tokenizer, prompt, add_generation_prompt=True))


def encode_response(tokenizer, prompt, response, finished: bool = True) -> list[int]:
    """Tokens of the response as they follow the prompt (text + EOS, or the templated turn). A response not
    ``finished`` (a completion cut at the length limit) is its text alone: no EOS, no end of turn, as sampled
    after the prompt's generation prompt."""
    if not finished and isinstance(response, str):
        return _ids(tokenizer, response)
    if isinstance(prompt, str) and isinstance(response, str):
        return _ids(tokenizer, response) + [tokenizer.eos_token_id]
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    response_msgs = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    prefix = _template(tokenizer, prompt_msgs, add_generation_prompt=True)
    full = _template(tokenizer, prompt_msgs + response_msgs, add_generation_prompt=False)
    if not full.startswith(prefix):
        raise TemplateMismatch("the chat template does not extend the prompt when the response is added")
    return _ids(tokenizer, full[len(prefix):])


class TemplateMismatch(UserError):
    """The chat template's renders do not extend each other, so a row cannot be split into
    prompt and response. Raised without a row; callers re-raise it naming file:line."""


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[Example, bool]:
    """A multi-turn chat as (example, final_turn_only).

    Normally prompt = everything before the first assistant turn and the rest is the
    response, with weight 1 only on assistant turns. If the template rewrites earlier
    turns as the chat grows, that split would cut turns apart, so only the final
    assistant turn is trained (final_turn_only is True).
    """
    example = encode_turns(tokenizer, messages)
    if example is not None:
        return example, False
    return encode_final_turn(tokenizer, messages), True


def encode_turns(tokenizer, messages: list[dict]) -> Example | None:
    """Turn by turn, each weighted by whether it is an assistant turn; None when a render
    does not extend the previous one (the template rewrote an earlier turn)."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt_ids = encode_prompt(tokenizer, messages[:first])
    completion, weights = [], []
    done = _template(tokenizer, messages[:first], add_generation_prompt=True)
    for i in range(first, len(messages)):
        before = _template(tokenizer, messages[:i], add_generation_prompt=messages[i]["role"] == "assistant")
        after = _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            return None
        segment = before[len(done):] + after[len(before):]
        ids = _ids(tokenizer, segment)
        head = len(_ids(tokenizer, before[len(done):]))  # the generation prompt itself is not trained
        completion += ids
        weights += [0] * head + [int(messages[i]["role"] == "assistant")] * (len(ids) - head)
        done = after
    return Example(prompt_ids, completion, weights)


def encode_final_turn(tokenizer, messages: list[dict]) -> Example:
    """Prompt = the chat up to the last assistant turn (with the generation prompt), response
    = that turn as the full render continues it, all trained. Turns after it train nothing,
    so they are left out. Raises TemplateMismatch if the full render does not extend the prompt."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _template(tokenizer, messages[:last], add_generation_prompt=True)
    full = _template(tokenizer, messages[: last + 1], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise TemplateMismatch("the chat template does not extend the conversation before the last assistant "
                               "turn when that turn is added, so the turn cannot be split off to train on")
    return Example(_ids(tokenizer, prompt), _ids(tokenizer, full[len(prompt):]))


def truncated_prompt(prompt_ids: list[int], longest_completion: int, max_length: int,
                     max_prompt_length: int) -> list[int]:
    """The prompt's last tokens under the module docstring's policy: at most max_prompt_length,
    and few enough to leave min(longest_completion, max(1, max_length // 4)) for the response."""
    prompt = prompt_ids[-max_prompt_length:] if max_prompt_length else prompt_ids
    min_completion = min(longest_completion, max(1, max_length // 4))
    if len(prompt) + min_completion > max_length:
        prompt = prompt[len(prompt) + min_completion - max_length:]
    return prompt


def truncate(example: Example, max_length: int, max_prompt_length: int) -> Example:
    """Apply the truncation policy of the module docstring."""
    prompt = truncated_prompt(example.prompt_ids, len(example.completion_ids), max_length, max_prompt_length)
    budget = max_length - len(prompt)
    weights = example.completion_weights[:budget] if example.completion_weights else None
    return Example(prompt, example.completion_ids[:budget], weights)


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int,
                  max_prompt_length: int, max_completion_length: int = 0) -> tuple[Example, Example]:
    """Truncate a preference pair once, so chosen and rejected keep the same prompt tokens:
    the prompt's cut leaves room for the longer response, each response keeps its first tokens
    (at most ``max_completion_length`` of them when it is > 0)."""
    if max_completion_length:
        chosen_ids, rejected_ids = chosen_ids[:max_completion_length], rejected_ids[:max_completion_length]
    longest = max(len(chosen_ids), len(rejected_ids))
    prompt = truncated_prompt(prompt_ids, longest, max_length, max_prompt_length)
    budget = max_length - len(prompt)
    return Example(prompt, chosen_ids[:budget]), Example(prompt, rejected_ids[:budget])


def messages_example(row: Row, tokenizer) -> tuple[Example, bool]:
    """A {"messages": [...]} row checked and encoded: (example, final_turn_only)."""
    messages = row.data["messages"]
    if not isinstance(messages, list):
        raise UserError(f"{row.source}: field 'messages' must be a non-empty list of messages, got {_json_type(messages)}")
    _check_text_or_messages(row, "messages", messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{row.source}: field 'messages' has no assistant turn to train on")
    if messages[0]["role"] == "assistant":
        raise UserError(f"{row.source}: field 'messages' needs a turn before the first assistant turn")
    try:
        return encode_conversation(tokenizer, messages)
    except TemplateMismatch as err:
        raise UserError(f"{row.source}: {err}") from None


def _file_of(source: str) -> str:
    """The file part of a Row.source ("file:line" or "file:row N")."""
    return source.rsplit(":", 1)[0]


def _warn(message: str) -> None:
    """One line on stderr, from rank 0 only (every rank loads the same data)."""
    if distributed.is_main():
        print(f"posttrain: warning: {message}", file=sys.stderr)


def _warn_long_prompts(rows: list[Row], prompt_lengths: list[int], max_prompt_length: int) -> None:
    """One counted warning per file for the prompts that max_prompt_length cuts (0: no limit)."""
    if not max_prompt_length:
        return
    totals: dict[str, list[int]] = {}
    for row, n in zip(rows, prompt_lengths):
        counts = totals.setdefault(_file_of(row.source), [0, 0])
        counts[0] += n > max_prompt_length
        counts[1] += 1
    for file, (long, total) in totals.items():
        if long:
            _warn(f"{long} of {total} prompts in {file} are longer than max_prompt_length={max_prompt_length} "
                  f"tokens and keep their last {max_prompt_length}")


def _sft_format(row: Row, text_field: str = "text") -> str | None:
    """'messages', 'prompt/completion' or 'text' (a plain-text row in ``text_field``; None: none of them).
    A None value counts as absent where another format's fields are there: a parquet file has every
    column in every row."""
    data = row.data
    if data.get("messages") is not None:
        return "messages"
    if data.get("prompt") is not None or data.get("completion") is not None:
        return "prompt/completion"
    if data.get(text_field) is not None:
        return "text"
    for kind, keys in (("prompt/completion", ("prompt", "completion")), ("messages", ("messages",)), ("text", (text_field,))):
        if any(key in data for key in keys):
            return kind
    return None


def text_example(row: Row, tokenizer, text_field: str = "text") -> Example:
    """A plain-text row, as TRL's language-modelling format: no prompt, every token trained, EOS appended
    (unless the text already ends with it)."""
    text = row.data[text_field]
    if not isinstance(text, str):
        raise UserError(f"{row.source}: field {text_field!r} must be a string, got {_json_type(text)}")
    if not text.strip():
        raise UserError(f"{row.source}: field {text_field!r} is {'an empty string' if not text else 'only whitespace'}")
    ids = _ids(tokenizer, text)
    return Example([], ids if ids[-1:] == [tokenizer.eos_token_id] else ids + [tokenizer.eos_token_id])


def prompt_completion_example(row: Row, tokenizer) -> Example:
    """A {"prompt", "completion"} row (text or messages) checked and encoded."""
    prompt, completion = _need(row, "prompt"), _need(row, "completion")
    _check_text_or_messages(row, "prompt", prompt)
    _check_text_or_messages(row, "completion", completion)
    _check_same_kind(row, prompt, "completion", completion)
    try:
        return Example(encode_prompt(tokenizer, prompt), encode_response(tokenizer, prompt, completion))
    except TemplateMismatch as err:
        raise UserError(f"{row.source}: {err}") from None


def sft_examples(rows: list[Row], tokenizer, max_length: int, max_prompt_length: int,
                 text_field: str = "text") -> list[Example]:
    out, prompt_lengths = [], []
    warned = False  # the final-turn fallback is announced once per dataset, not per row
    first: Row | None = None  # the first row, whose format every row must share
    try:  # values nested nearly as deep as json allows overflow the stack when compared
        for row in rows:
            kind = _sft_format(row, text_field)
            if kind is None:
                raise UserError(f"{row.source}: an SFT row needs 'messages', 'prompt' and 'completion', or a "
                                f"plain-text {text_field!r} field (dataset_text_field)")
            if first is None:
                first = row
            elif kind != _sft_format(first, text_field):
                raise UserError(f"{row.source}: mixed row formats: this row has {kind!r} fields but the first row "
                                f"({first.source}) has {_sft_format(first, text_field)!r}; use one format per SFT dataset")
            if kind == "messages":
                example, final_turn_only = messages_example(row, tokenizer)
                if final_turn_only and not warned:
                    _warn(f"{row.source}: the chat template rewrites earlier turns as the conversation grows "
                          "(e.g. drops their <think> blocks), so multi-turn rows of this dataset train only on "
                          "their final assistant turn")
                    warned = True
            elif kind == "text":
                example = text_example(row, tokenizer, text_field)
            else:
                example = prompt_completion_example(row, tokenizer)
            prompt_lengths.append(len(example.prompt_ids))
            out.append(truncate(example, max_length, max_prompt_length))
    except RecursionError:
        raise UserError(f"{row.source}: a field is nested too deeply to process") from None
    _warn_long_prompts(rows, prompt_lengths, max_prompt_length)
    return out


@dataclass
class PreferenceExample:
    chosen: Example
    rejected: Example
    margin: float = 0.0


def split_shared_prefix(row: Row) -> tuple:
    """A pair without a `prompt` (TRL's implicit prompt): the longest common prefix of chosen and rejected is
    the prompt, and the rest of each is its response. Conversations split between turns; strings (hh-rlhf's
    "\\n\\nHuman: ...\\n\\nAssistant: ...") at the first differing character, less a space just before
    it, which stays with the responses: trl.data_utils.extract_prompt's rule."""
    chosen, rejected = row.data["chosen"], row.data["rejected"]
    unit = "character" if isinstance(chosen, str) else "turn"
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) and n == len(rejected):
        raise UserError(f"{row.source}: 'chosen' and 'rejected' are identical, so no differing {unit} splits off "
                        "the prompt (and the pair carries no preference signal)")
    if n == len(chosen) or n == len(rejected):
        short, other = ("chosen", "rejected") if n == len(chosen) else ("rejected", "chosen")
        raise UserError(f"{row.source}: {short!r} is the start of {other!r}, with no {unit} of its own after "
                        f"the shared leading {unit}s and there is no 'prompt'")
    if unit == "character" and n and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise UserError(f"{row.source}: 'chosen' and 'rejected' share no leading {unit} and there is no 'prompt'")
    return chosen[:n], chosen[n:], rejected[n:]


def _margin(row: Row) -> float:
    margin = row.data.get("margin")
    if margin is None:  # parquet reads an absent value as None
        return 0.0
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise UserError(f"{row.source}: field 'margin' must be a number, got {_describe(margin)}")
    try:
        value = float(margin)
    except OverflowError:  # an integer beyond float range
        value = math.inf
    if not math.isfinite(value):
        raise UserError(f"{row.source}: field 'margin' must be a finite number, got {_describe(margin)}")
    return value


def preference_examples(rows: list[Row], tokenizer, max_length: int, max_prompt_length: int,
                        max_completion_length: int = 0) -> list[PreferenceExample]:
    out, prompt_lengths = [], []
    identical: dict[str, int] = {}  # file -> pairs whose chosen == rejected
    try:  # values nested nearly as deep as json allows overflow the stack when compared
        for row in rows:
            chosen, rejected = _need(row, "chosen"), _need(row, "rejected")
            _check_text_or_messages(row, "chosen", chosen)
            _check_text_or_messages(row, "rejected", rejected)
            if "prompt" in row.data:
                prompt = row.data["prompt"]
                _check_text_or_messages(row, "prompt", prompt)
            elif isinstance(chosen, list) == isinstance(rejected, list):
                prompt, chosen, rejected = split_shared_prefix(row)
            else:
                raise UserError(f"{row.source}: missing field 'prompt' (needed when one of chosen/rejected is a string "
                                "and the other messages)")
            _check_same_kind(row, prompt, "chosen", chosen)
            _check_same_kind(row, prompt, "rejected", rejected)
            margin = _margin(row)
            if chosen == rejected:
                identical[_file_of(row.source)] = identical.get(_file_of(row.source), 0) + 1
            try:
                prompt_ids = encode_prompt(tokenizer, prompt)
                chosen_ids = encode_response(tokenizer, prompt, chosen)
                rejected_ids = encode_response(tokenizer, prompt, rejected)
            except TemplateMismatch as err:
                raise UserError(f"{row.source}: {err}") from None
            chosen_ex, rejected_ex = truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length,
                                                   max_completion_length)
            prompt_lengths.append(len(prompt_ids))
            out.append(PreferenceExample(chosen_ex, rejected_ex, margin))
    except RecursionError:
        raise UserError(f"{row.source}: a field is nested too deeply to process") from None
    _warn_long_prompts(rows, prompt_lengths, max_prompt_length)
    for file, count in identical.items():
        _warn(f"{count} pair{'s' if count > 1 else ''} in {file} {'have' if count > 1 else 'has'} chosen == rejected; "
              f"{'they carry' if count > 1 else 'it carries'} no preference signal")
    return out


@dataclass
class UnpairedExample:
    """One KTO row: a prompt and a response labelled desirable (True) or undesirable (False)."""

    example: Example
    label: bool


def _label(row: Row) -> bool:
    label = _need(row, "label")
    if isinstance(label, str) and _file_of(row.source).endswith(".csv") and label.lower() in ("true", "false"):
        return label.lower() == "true"  # CSV values are strings
    if not isinstance(label, bool):
        raise UserError(f"{row.source}: field 'label' must be true (desirable) or false (undesirable), got {_describe(label)}")
    return label


def unpaired_examples(rows: list[Row], tokenizer, max_length: int, max_prompt_length: int) -> list[UnpairedExample]:
    """KTO's rows: {"prompt", "completion", "label"} (TRL's unpaired preference format), or preference pairs
    unpaired as TRL's ``unpair_preference_dataset`` does them: each pair's chosen response is a desirable row and
    its rejected one an undesirable row (the desirable rows first). The first row's fields decide the format."""
    first = rows[0].data
    if first.get("chosen") is not None and first.get("rejected") is not None:
        pairs = preference_examples(rows, tokenizer, max_length, max_prompt_length)
        return [UnpairedExample(p.chosen, True) for p in pairs] + [UnpairedExample(p.rejected, False) for p in pairs]
    out, prompt_lengths = [], []
    try:  # values nested nearly as deep as json allows overflow the stack when compared
        for row in rows:
            example = prompt_completion_example(row, tokenizer)
            label = _label(row)
            prompt_lengths.append(len(example.prompt_ids))
            out.append(UnpairedExample(truncate(example, max_length, max_prompt_length), label))
    except RecursionError:
        raise UserError(f"{row.source}: a field is nested too deeply to process") from None
    _warn_long_prompts(rows, prompt_lengths, max_prompt_length)
    return out


def mismatched_examples(examples: list[Example], max_length: int) -> list[Example]:
    """KTO's KL pairs over a batch: row i's prompt with row i-1's response (row 0 with the last row's), as TRL
    builds them; each response keeps its first tokens within max_length."""
    shifted = examples[-1:] + examples[:-1]
    return [Example(e.prompt_ids, s.completion_ids[:max_length - len(e.prompt_ids)]) for e, s in zip(examples, shifted)]


@dataclass
class PromptExample:
    prompt_ids: list[int]
    prompt_text: str  # what reward functions see as the prompt
    extra: dict  # the row's other fields, passed to reward functions
    prompt: str | list[dict]  # the raw prompt (text or messages): reward models re-render from it


def prompt_examples(rows: list[Row], tokenizer, max_prompt_length: int) -> list[PromptExample]:
    out, prompt_lengths = [], []
    try:  # values nested nearly as deep as json allows overflow the stack when compared
        for row in rows:
            prompt = _need(row, "prompt")
            _check_text_or_messages(row, "prompt", prompt)
            if isinstance(prompt, str) and not prompt:
                raise UserError(f"{row.source}: field 'prompt' is an empty string")
            try:
                ids = encode_prompt(tokenizer, prompt)
                prompt_lengths.append(len(ids))
                ids = ids[-max_prompt_length:] if max_prompt_length else ids
                text = prompt if isinstance(prompt, str) else _template(tokenizer, prompt, add_generation_prompt=True)
            except TemplateMismatch as err:
                raise UserError(f"{row.source}: {err}") from None
            out.append(PromptExample(ids, text, {k: v for k, v in row.data.items() if k != "prompt"}, prompt))
    except RecursionError:
        raise UserError(f"{row.source}: a field is nested too deeply to process") from None
    _warn_long_prompts(rows, prompt_lengths, max_prompt_length)
    return out


# ------------------------------------------------------------------- batching


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           shuffle: bool = True, drop_last: bool = False, group: bool = True) -> list[list[int]]:
    """Indices in batches of similar length, deterministic in (seed, epoch).

    Shuffle, cut into mega-batches of 50 batches, sort each by length, cut into
    batches, shuffle the batches: padding stays small and the order random
    (the "length-grouped" sampler of transformers). Determinism in (seed, epoch)
    is what lets a resumed run skip to its exact data position.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 100003 + epoch)
    if shuffle:
        rng.shuffle(order)
    mega = batch_size * 50 if group else batch_size
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i]) if shuffle else order[start:start + mega]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        rng.shuffle(batches)
    return batches


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in seqs])


@dataclass
class TokenBatch:
    """Prompt + response sequences, right-padded."""

    input_ids: torch.Tensor  # (B, L) token ids
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    loss_mask: torch.Tensor  # (B, L-1) 1 where position t's prediction of token t+1 is a response token

    # the model derives positions from attention_mask (see models.token_logps)
    position_ids = None

    def to(self, device) -> TokenBatch:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def sequence_logps(self, token_logps: torch.Tensor, normalization: str = "sum") -> torch.Tensor:
        """Sum (or mean) of each row's response log-probs: (B, L-1) -> (B,)."""
        return sequence_logps(token_logps, self.loss_mask, normalization)

    def at_last_token(self, values: torch.Tensor) -> torch.Tensor:
        """Each row's value at its last real token: (B, L) -> (B,)."""
        return values.gather(1, self.attention_mask.sum(-1, keepdim=True) - 1).squeeze(1)


@dataclass
class PackedBatch:
    """The rows of a micro-batch concatenated into one sequence, with no padding (``padding_free``).

    Positions restart at 0 on each row. Given position_ids and no attention
    mask, transformers keeps attention within each row: a block-diagonal
    causal mask for sdpa and eager (``masking_utils.find_packed_sequence_indices``),
    variable-length kernels with cu_seqlens taken from the positions for
    flash attention. The last token of a row would be scored against the
    next row's first token, so loss_mask is 0 there. N = total tokens, R = rows.
    """

    input_ids: torch.Tensor  # (1, N) token ids, row after row
    position_ids: torch.Tensor  # (1, N) position within the token's row: 0 .. n_r-1 for row r
    loss_mask: torch.Tensor  # (1, N-1) 1 where position t's prediction of token t+1 is a response token of the same row
    row_of_token: torch.Tensor  # (N-1,) the row of position t
    cu_seqlens: torch.Tensor  # (R+1,) row r holds tokens cu_seqlens[r] .. cu_seqlens[r+1]-1

    # no mask: the model builds the within-row one from position_ids
    attention_mask = None

    def to(self, device) -> PackedBatch:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def sequence_logps(self, token_logps: torch.Tensor, normalization: str = "sum") -> torch.Tensor:
        """Sum (or mean) of each row's response log-probs, by a segment sum: (1, N-1) -> (R,)."""
        return packed_sequence_logps(token_logps, self.loss_mask, self.row_of_token, len(self), normalization)

    def at_last_token(self, values: torch.Tensor) -> torch.Tensor:
        """Each row's value at its last token: (1, N) -> (R,)."""
        return values[0, self.cu_seqlens[1:] - 1]


def _loss_weights(examples: list[Example], completion_only: bool) -> list[list[int]]:
    """Per token of prompt + response: 1 where the token is trained on. completion_only: the
    (weighted) response tokens only; otherwise every token, every turn of a conversation (as in TRL)."""
    if completion_only:
        return [[0] * len(e.prompt_ids) + (e.completion_weights or [1] * len(e.completion_ids)) for e in examples]
    return [[1] * (len(e.prompt_ids) + len(e.completion_ids)) for e in examples]


def pack_examples(examples: list[Example], completion_only: bool = True) -> PackedBatch:
    """The examples concatenated into one unpadded sequence (see PackedBatch); the loss covers the
    same tokens, with the same weights, as ``collate_examples`` gives them."""
    seqs = [e.prompt_ids + e.completion_ids for e in examples]
    lengths = torch.tensor([len(s) for s in seqs])
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
    starts = cu_seqlens[:-1].repeat_interleave(lengths)  # (N,) the first token of each token's row
    position_ids = torch.arange(int(cu_seqlens[-1])) - starts
    # a row's first token is never a target; the row's last position would target the next row: weight 0
    loss = [w for weights in _loss_weights(examples, completion_only) for w in weights[1:] + [0]][:-1]
    row_of_token = torch.arange(len(seqs)).repeat_interleave(lengths)[:-1]
    return PackedBatch(torch.tensor([t for s in seqs for t in s]).unsqueeze(0), position_ids.unsqueeze(0),
                       torch.tensor(loss, dtype=torch.float32).unsqueeze(0), row_of_token, cu_seqlens)


def sft_response_only(row: Row, completion_only_loss: bool, assistant_only_loss: bool, warn: bool = False) -> bool:
    """Whether SFT's loss covers the response only, decided as TRL's SFTConfig does for the format of ``row``
    (a dataset has one format): `messages` rows by assistant_only_loss, prompt/completion rows by
    completion_only_loss. ``warn``: say so when the other switch was turned off, since it changes nothing."""
    kind = _sft_format(row)
    if kind not in ("messages", "prompt/completion"):
        return True  # plain-text rows have no prompt: every token is trained either way
    messages = kind == "messages"
    unused = ("completion_only_loss", completion_only_loss, "messages", "assistant_only_loss") if messages else \
        ("assistant_only_loss", assistant_only_loss, "prompt/completion", "completion_only_loss")
    if warn and not unused[1]:
        _warn(f"{_file_of(row.source)}: {unused[0]} false changes nothing for {unused[2]} rows, whose loss mask "
              f"{unused[3]} sets (as in TRL)")
    return assistant_only_loss if messages else completion_only_loss


def collate_examples(examples: list[Example], pad_id: int, completion_only: bool = True,
                     padding_free: bool = False) -> TokenBatch | PackedBatch:
    """Right-padded batch. completion_only: loss on the (weighted) response tokens only;
    otherwise on every real token, every turn of a conversation included (as in TRL).
    padding_free: one packed sequence instead (``pack_examples``; pad_id is not used)."""
    if padding_free:
        return pack_examples(examples, completion_only)
    seqs = [e.prompt_ids + e.completion_ids for e in examples]
    input_ids = _pad(seqs, pad_id)
    attention_mask = _pad([[1] * len(s) for s in seqs], 0)
    loss_mask = _pad(_loss_weights(examples, completion_only), 0)[:, 1:]
    return TokenBatch(input_ids, attention_mask, loss_mask.float())


@dataclass
class PreferenceBatch:
    """Chosen rows then rejected rows, for one forward pass: padded (2B, L), or packed into (1, N)."""

    tokens: TokenBatch | PackedBatch  # rows [0, B) chosen, [B, 2B) rejected
    margin: torch.Tensor  # (B,) per-pair margin (0 when absent)
    index: torch.Tensor  # (B,) dataset indices of the pairs (for precomputed reference log-probs)

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(self.tokens.to(device), self.margin.to(device), self.index.to(device))

    def __len__(self) -> int:
        return len(self.index)


def collate_preferences(pairs: list[PreferenceExample], indices: list[int], pad_id: int,
                        padding_free: bool = False) -> PreferenceBatch:
    tokens = collate_examples([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, padding_free=padding_free)
    return PreferenceBatch(tokens, torch.tensor([p.margin for p in pairs]), torch.tensor(indices))


@dataclass
class UnpairedBatch:
    """KTO's micro-batch: each row's prompt + response, and the mismatched pairs that estimate the KL reference point."""

    tokens: TokenBatch | PackedBatch  # (B, L) prompt_i + response_i, or packed (1, N)
    kl_tokens: TokenBatch | PackedBatch | None  # (B, L') prompt_i + response_{i-1} (mismatched_examples); None: no KL
    label: torch.Tensor  # (B,) bool, True: desirable

    def to(self, device) -> UnpairedBatch:
        kl = None if self.kl_tokens is None else self.kl_tokens.to(device)
        return UnpairedBatch(self.tokens.to(device), kl, self.label.to(device))

    def __len__(self) -> int:
        return len(self.label)


def collate_unpaired(examples: list[UnpairedExample], kl_examples: list[Example] | None, pad_id: int,
                     padding_free: bool = False) -> UnpairedBatch:
    tokens = collate_examples([e.example for e in examples], pad_id, padding_free=padding_free)
    kl = None if kl_examples is None else collate_examples(kl_examples, pad_id, padding_free=padding_free)
    return UnpairedBatch(tokens, kl, torch.tensor([e.label for e in examples], dtype=torch.bool))


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, the layout generation needs."""
    return _pad(seqs, pad_id, left=True), _pad([[1] * len(s) for s in seqs], 0, left=True)
