"""Malformed data never crashes, never slips through: every corruption of a valid data file is a
one-line UserError naming file:line (and the field, where there is one), in-process and from the CLI.

The property tests start from real valid rows of each format (SFT, preference, prompts), corrupt
one row with a generated corruption (a dropped field, a wrong type, blank text, an unknown role,
bytes that are not UTF-8, a lone surrogate, a truncated last line, a line that is not an object,
a non-finite margin, nesting too deep for json, ...), write the file as a user would (blank
lines and CRLF line ends included) and load it exactly as the recipes do.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from posttrain import cli
from posttrain import data as D
from posttrain.config import SFTConfig
from posttrain.errors import UserError
from posttrain.models import load_tokenizer

CORRUPTIONS = settings(max_examples=500, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_LENGTH, MAX_PROMPT_LENGTH = SFTConfig.max_length, SFTConfig.max_prompt_length  # the recipes' defaults


@pytest.fixture(scope="module")
def tok(tiny_qwen):
    return load_tokenizer(str(tiny_qwen))


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


# ------------------------------------------------------------------ real valid rows, one pool per format
# (an SFT file uses one format throughout, so SFT has two pools)

VALID = {
    "sft:prompt/completion": [
        {"prompt": "12+34=", "completion": "46"},
        {"prompt": "", "completion": "text with no prompt"},  # an empty string prompt means no prompt
        {"prompt": "Ünïcödé 😀 ≠ ß =", "completion": "é ✓"},
        {"prompt": "café crème =", "completion": "señor"},
        {"prompt": [user("57+68=")], "completion": "125"},
        {"prompt": [system("You add numbers."), user("1+2=")], "completion": [assistant("3")]},
    ],
    "sft:messages": [
        {"messages": [user("12+34="), assistant("46")]},
        {"messages": [system("You add numbers."), user("1+1="), assistant("2"), user("and 2+2?"), assistant("4")]},
        {"messages": [user("weather?"), assistant("asking the tool"), {"role": "tool", "content": "sunny"},
                      assistant("It is sunny ☀")]},
        {"messages": [user("😀 or 🙃?"), assistant("😀")]},
        {"messages": [user("crème brûlée?"), assistant("oui")]},
    ],
    "preference": [
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
        {"prompt": "99+1=", "chosen": "100", "rejected": "90", "margin": 1.5},
        {"prompt": [user("5+5=")], "chosen": "10", "rejected": "11"},
        {"prompt": [system("Add."), user("5+6=")], "chosen": [assistant("11")], "rejected": [assistant("12")]},
        {"chosen": [user("2+2="), assistant("4")], "rejected": [user("2+2="), assistant("5")]},
        {"chosen": [user("1+1="), assistant("2"), user("+1?"), assistant("3")],
         "rejected": [user("1+1="), assistant("2"), user("+1?"), assistant("4")], "margin": 0},
        {"prompt": "ß 😀", "chosen": "é", "rejected": "è", "margin": -2},
        {"prompt": "Grüße", "chosen": "Olá", "rejected": "Ola"},
    ],
    "prompts": [
        {"prompt": "1+2=", "answer": "3"},
        {"prompt": [user("4+4=")], "answer": "8", "id": 7, "tags": ["a", {"deep": [1, [2]]}]},
        {"prompt": [system("Add."), user("2+9=")], "answer": "11"},
        {"prompt": "😀+é=", "answer": None},
        {"prompt": "¿año?", "answer": "ñ"},
    ],
}
LOADER = {"sft:prompt/completion": "sft", "sft:messages": "sft", "preference": "preference", "prompts": "prompts"}
TEXT_FIELDS = {"sft": ("prompt", "completion", "messages"), "preference": ("prompt", "chosen", "rejected"),
               "prompts": ("prompt",)}


def load(kind: str, path: Path, tok):
    """As the recipes load data: read_rows, then the format's examples."""
    rows = D.read_rows(str(path))
    if kind == "sft":
        return D.sft_examples(rows, tok, MAX_LENGTH, MAX_PROMPT_LENGTH)
    if kind == "preference":
        return D.preference_examples(rows, tok, MAX_LENGTH, MAX_PROMPT_LENGTH)
    return D.prompt_examples(rows, tok, MAX_PROMPT_LENGTH)


def required(pool: str, row: dict) -> list[str]:
    """The fields without which `row` is not a valid row of its format."""
    kind = LOADER[pool]
    if kind == "sft":
        return ["messages"] if "messages" in row else ["prompt", "completion"]
    if kind == "preference":
        keep = implicit_prompt(row.get("chosen"), row.get("rejected"))  # without it, the pair still splits
        return [k for k in ("prompt", "chosen", "rejected") if k in row and not (k == "prompt" and keep)]
    return ["prompt"]


def implicit_prompt(chosen, rejected) -> bool:
    """Whether a pair without `prompt` still splits into prompt and responses, as TRL's extract_prompt reads it:
    both strings or both conversations, with a common prefix (less a space just before the first difference,
    for strings) that leaves each side something of its own."""
    if isinstance(chosen, list) != isinstance(rejected, list):
        return False
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if n == min(len(chosen), len(rejected)):
        return False
    return (n - (isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ")) > 0


def message_lists(pool: str, row: dict) -> list[str]:
    return [k for k in TEXT_FIELDS[LOADER[pool]] if isinstance(row.get(k), list)]


def string_paths(value, path=()) -> list[tuple]:
    """Paths to every string value (not key) in a JSON value."""
    if isinstance(value, str):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in string_paths(v, path + (k,))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in string_paths(v, path + (i,))]
    return []


def set_path(value, path: tuple, new):
    if not path:
        return new
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[path[0]] = set_path(value[path[0]], path[1:], new)
    return copy


def get_path(value, path: tuple):
    for key in path:
        value = value[key]
    return value


def dumps(row, ascii_only: bool = True) -> str:
    return json.dumps(row, ensure_ascii=ascii_only)


# ------------------------------------------------------------------------------------- corruptions

BLANKS = st.sampled_from(["", " ", "  ", "\n", "\t", " \r\n ", "\u00a0", "\u3000", "\u2028"])
NOT_TEXT = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                     st.none(), st.just({}), st.dictionaries(st.sampled_from(["text", "content", "role"]),
                                                             st.text(max_size=5), min_size=1, max_size=2),
                     st.just([]), st.lists(st.integers(), min_size=1, max_size=3),
                     st.lists(st.text(max_size=5), min_size=1, max_size=3))
NOT_NUMBER = st.one_of(st.text(max_size=8), st.booleans(), st.just([]), st.lists(st.floats(), min_size=1),
                       st.just({}), st.just({"value": 1.0}))
UNKNOWN_ROLES = st.one_of(st.sampled_from(["bot", "human", "gpt", "model", "developer", "function", "", "User",
                                           "ASSISTANT", " user", "assistant\n", "système"]),
                          st.text(min_size=1, max_size=8)).filter(lambda r: r not in D.ROLES)
BAD_BYTES = st.lists(st.sampled_from([*range(0x80, 0xC2), *range(0xF5, 0x100)]), min_size=1, max_size=3)
CONTROL = st.sampled_from([chr(c) for c in [*range(0, 9), 0x0B, 0x0C, *range(0x0E, 0x20)]])
SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)


def deep_json(depth: int, kind: str) -> str:
    """Nesting too deep for any row to mean anything (and, past ~1000, for json itself)."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "{}" + "}" * depth


def corruption_names(pool: str, row: dict, first: bool) -> list[str]:
    """The corruptions that apply to `row`; `first`: it is the file's first row (an SFT row of the
    other format is only bad after it)."""
    kind = LOADER[pool]
    names = ["drop_field", "wrong_type", "deep_field", "deep_line", "non_object", "non_utf8", "truncated",
             "surrogate", "control_char", "stray_bom", "python_repr", "trailing_comma", "duplicate_key"]
    if any(isinstance(row.get(k), str) for k in TEXT_FIELDS[kind]) or message_lists(pool, row):
        names.append("blank_text")
    if message_lists(pool, row):
        names += ["unknown_role", "bad_message"]
    if kind == "preference":
        names += ["margin_not_finite", "margin_wrong_type"]
        if "prompt" not in row:
            names.append("seed_identical")
    if pool == "sft:messages":
        names += ["no_assistant", "assistant_first"]
    if kind == "sft" and not first:
        names.append("mixed_formats")
    return names


@st.composite
def corrupt(draw, name: str, pool: str, row: dict):
    """(line text or bytes, field the message must name or None, must be the last line): `row` with
    corruption `name`."""
    kind = LOADER[pool]
    ascii_only = draw(st.booleans(), label="ensure_ascii")

    if name == "drop_field":
        field = draw(st.sampled_from(required(pool, row)))
        return dumps({k: v for k, v in row.items() if k != field}, ascii_only), None, False
    if name == "wrong_type":
        field = draw(st.sampled_from(required(pool, row)))
        return dumps({**row, field: draw(NOT_TEXT)}, ascii_only), field, False
    if name == "deep_field":
        field = draw(st.sampled_from(required(pool, row)))
        depth = draw(st.one_of(st.integers(1, 50), st.integers(900, 1100), st.integers(5000, 100_000)))
        marker = "__DEEP__"
        line = dumps({**row, field: marker}, ascii_only).replace(json.dumps(marker), deep_json(depth, draw(
            st.sampled_from(["list", "dict"]))))
        return line, (field if depth < 500 else None), False
    if name == "deep_line":
        return deep_json(draw(st.integers(1, 100_000)), draw(st.sampled_from(["list", "dict"]))), None, False
    if name == "non_object":
        value = draw(st.one_of(st.just([row]), st.lists(st.integers(), max_size=3), st.text(max_size=8),
                               st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()))
        return json.dumps(value), None, False
    if name == "non_utf8":
        raw = dumps(row, ascii_only=False).encode("utf-8")
        latin = dumps(row, ascii_only=False)
        if draw(st.booleans()) and any(128 <= ord(c) < 256 for c in latin) and all(ord(c) < 256 for c in latin):
            return latin.encode("latin-1"), None, False  # the file was saved as Latin-1
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + bytes(draw(BAD_BYTES)) + raw[at:], None, False
    if name == "truncated":  # the last line of a file that was cut off (a crash, a full disk, a bad copy)
        raw = dumps(row, ascii_only).encode("utf-8")
        return raw[:draw(st.integers(1, len(raw) - 1))], None, True
    if name == "surrogate":
        path = draw(st.sampled_from(string_paths(row)))
        text = get_path(row, path)
        at = draw(st.integers(0, len(text)))
        bad = set_path(row, path, text[:at] + draw(SURROGATE) + text[at:])
        if draw(st.booleans()):  # as an escape json accepts: a lone surrogate in the decoded string
            return json.dumps(bad), path[0], False
        return json.dumps(bad, ensure_ascii=False).encode("utf-8", "surrogatepass"), None, False  # as bytes
    if name == "control_char":  # a raw control character, anywhere in the line
        line = dumps(row, ascii_only)
        at = draw(st.integers(0, len(line)))
        return line[:at] + draw(CONTROL) + line[at:], None, False
    if name == "stray_bom":  # a byte-order mark inside a line (files concatenated with cat)
        line = dumps(row, ascii_only)
        at = draw(st.sampled_from([1, len(line)]))  # (at 0 of the file's first line it is a leading BOM: fine)
        return line[:at] + "\ufeff" + line[at:], None, False
    if name == "python_repr":
        return repr(row), None, False
    if name == "trailing_comma":
        line = dumps(row, ascii_only)
        return line[:-1] + ", }", None, False
    if name == "duplicate_key":  # json keeps the last value: a blank one
        field = draw(st.sampled_from([k for k in required(pool, row)]))
        blank = draw(BLANKS.filter(lambda b: not (b == "" and field == "prompt" and kind != "prompts")))
        return dumps(row, ascii_only)[:-1] + f", {json.dumps(field)}: {json.dumps(blank)}}}", field, False
    if name == "blank_text":
        spots = [(k,) for k in TEXT_FIELDS[kind] if isinstance(row.get(k), str)]
        spots += [(k, i, "content") for k in message_lists(pool, row) for i in range(len(row[k]))]
        spot = draw(st.sampled_from(spots))
        # a string prompt may be empty (no prompt) in SFT and preference rows, not only whitespace
        ok_empty = spot == ("prompt",) and kind != "prompts"
        blank = draw(BLANKS.filter(lambda b: b.strip() == "" and not (ok_empty and b == "")))
        return dumps(set_path(row, spot, blank), ascii_only), spot[0], False
    if name == "unknown_role":
        field = draw(st.sampled_from(message_lists(pool, row)))
        i = draw(st.integers(0, len(row[field]) - 1))
        return dumps(set_path(row, (field, i, "role"), draw(UNKNOWN_ROLES)), ascii_only), field, False
    if name == "bad_message":
        field = draw(st.sampled_from(message_lists(pool, row)))
        i = draw(st.integers(0, len(row[field]) - 1))
        msg = row[field][i]
        broken = draw(st.sampled_from(["not_object", "no_role", "no_content", "content_type", "role_type"]))
        if broken == "not_object":
            new = draw(st.one_of(st.text(max_size=5), st.integers(), st.none(), st.just([msg])))
        elif broken == "no_role":
            new = {"content": msg["content"]}
        elif broken == "no_content":
            new = {"role": msg["role"]}
        elif broken == "content_type":
            new = {**msg, "content": draw(st.one_of(st.integers(), st.none(), st.just([{"type": "text", "text": "x"}]),
                                                    st.just({"text": "x"}), st.booleans()))}
        else:
            new = {**msg, "role": draw(st.one_of(st.integers(), st.none(), st.just(["user"])))}
        return dumps(set_path(row, (field, i), new), ascii_only), field, False
    if name == "margin_not_finite":
        text = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1" + "0" * 400]))
        return dumps({**row, "margin": "__M__"}, ascii_only).replace('"__M__"', text), "margin", False
    if name == "margin_wrong_type":
        return dumps({**row, "margin": draw(NOT_NUMBER)}, ascii_only), "margin", False
    if name == "seed_identical":
        which = draw(st.sampled_from(["same", "chosen_prefix", "rejected_prefix"]))
        if which == "same":
            bad = {**row, "rejected": row["chosen"]}
        elif which == "chosen_prefix":
            bad = {**row, "chosen": row["rejected"][:-1]}
        else:
            bad = {**row, "rejected": row["chosen"][:-1]}
        return dumps(bad, ascii_only), None, False
    if name == "no_assistant":
        msgs = [m for m in row["messages"] if m["role"] != "assistant"]
        return dumps({"messages": msgs or [user("hi")]}, ascii_only), "messages", False
    if name == "assistant_first":
        msgs = row["messages"]
        return dumps({"messages": msgs[next(i for i, m in enumerate(msgs) if m["role"] == "assistant"):]},
                     ascii_only), "messages", False
    assert name == "mixed_formats"
    other = "sft:messages" if pool == "sft:prompt/completion" else "sft:prompt/completion"
    return dumps(draw(st.sampled_from(VALID[other])), ascii_only), None, False


@st.composite
def bad_file(draw, pool: str, only: str | None = None):
    """(file bytes, line of the bad row, field the message must name or None, corruption name):
    valid rows around one corrupted row (corrupted by `only`, else by any corruption that applies)."""
    rows = VALID[pool]
    before = draw(st.lists(st.sampled_from(rows), min_size=int(only == "mixed_formats"), max_size=3))
    after = draw(st.lists(st.sampled_from(rows), max_size=2))
    candidates = [r for r in rows if only is None or only in corruption_names(pool, r, first=not before)]
    row = draw(st.sampled_from(candidates), label="row")
    name = only or draw(st.sampled_from(corruption_names(pool, row, first=not before)), label="corruption")
    line, field, last = draw(corrupt(name, pool, row))
    if last:
        after = []
    newline = draw(st.sampled_from(["\n", "\r\n"]), label="line end")
    bom = draw(st.booleans(), label="BOM")
    out = bytearray(b"\xef\xbb\xbf" if bom else b"")
    number = 0

    def put(text_or_bytes, end: bool = True):
        nonlocal number
        for _ in range(draw(st.integers(0, 2) if draw(st.booleans()) else st.just(0))):  # blank lines
            out.extend(draw(st.sampled_from(["", "  ", "\t"])).encode() + newline.encode())
            number += 1
        out.extend(text_or_bytes if isinstance(text_or_bytes, bytes) else text_or_bytes.encode("utf-8"))
        if end:
            out.extend(newline.encode())
        number += 1

    for row in before:
        put(json.dumps(row))
    put(line, end=not last)
    bad_line = number
    for row in after:
        put(json.dumps(row))
    return bytes(out), bad_line, field, name


def assert_names_file_and_line(err: UserError, path: Path, line: int, field: str | None) -> None:
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert f"{path.name}:{line}:" in message, (line, message)
    if field is not None:
        assert repr(field) in message, (field, message)


def check_corruption(pool: str, tmp_path: Path, tok, case) -> None:
    content, line, field, name = case
    event(name)  # --hypothesis-show-statistics: how often each corruption ran
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load(LOADER[pool], path, tok)
    assert_names_file_and_line(info.value, path, line, field)


@CORRUPTIONS
@given(st.sampled_from(["sft:prompt/completion", "sft:messages"]).flatmap(
    lambda pool: st.tuples(st.just(pool), bad_file(pool))))
def test_every_corruption_of_an_sft_file_names_file_and_line(tok, tmp_path, case):
    pool, bad = case
    check_corruption(pool, tmp_path, tok, bad)


@CORRUPTIONS
@given(bad_file("preference"))
def test_every_corruption_of_a_preference_file_names_file_and_line(tok, tmp_path, case):
    check_corruption("preference", tmp_path, tok, case)


@CORRUPTIONS
@given(bad_file("prompts"))
def test_every_corruption_of_a_prompt_file_names_file_and_line(tok, tmp_path, case):
    check_corruption("prompts", tmp_path, tok, case)


SWEEP = [(pool, name) for pool in VALID
         for name in sorted({n for row in VALID[pool] for first in (True, False)
                             for n in corruption_names(pool, row, first)})]


@pytest.mark.parametrize("pool,name", SWEEP, ids=[f"{pool}-{name}" for pool, name in SWEEP])
@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_each_corruption_of_each_format(tok, tmp_path, pool, name, data):
    # every corruption, of every row it applies to, however rarely the tests above draw it
    check_corruption(pool, tmp_path, tok, data.draw(bad_file(pool, only=name), label="file"))


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from(list(VALID)).flatmap(lambda pool: st.tuples(
    st.just(pool), st.lists(st.sampled_from(VALID[pool]), min_size=1, max_size=5), st.booleans(),
    st.sampled_from(["\n", "\r\n"]), st.booleans())))
def test_the_valid_rows_load_with_bom_crlf_and_either_escaping(tok, tmp_path, case):
    # the corruptions above are the only thing wrong with the files they break
    pool, rows, bom, newline, ascii_only = case
    path = tmp_path / "good.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=ascii_only) + newline for r in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    assert len(load(LOADER[pool], path, tok)) == len(rows)


# ------------------------------------------------------------------ .json files, with rows as "row N"


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from(list(VALID)).flatmap(lambda pool: st.tuples(st.just(pool), bad_file(pool))))
def test_corruptions_in_a_json_list_name_the_file_and_a_row_or_line(tok, tmp_path, case):
    pool, (content, _, _, name) = case
    event(name)
    lines = [line for line in content.removeprefix(b"\xef\xbb\xbf").splitlines() if line.strip()]
    path = tmp_path / "bad.json"
    path.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")  # one row a line, as json.dump(indent=...) nearly does
    with pytest.raises(UserError) as info:
        load(LOADER[pool], path, tok)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert re.search(r"bad\.json:(row )?\d+:", message), message


# ------------------------------------------------------------------ reading, one case each


def write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


GOOD_LINE = json.dumps({"prompt": "1+2=", "completion": "3"})


def test_non_utf8_byte_names_its_line_and_column(tmp_path):
    path = write(tmp_path, "latin.jsonl", (GOOD_LINE + "\n\n").encode() + '{"prompt": "café", "completion": "x"}\n'
                 .encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        D.read_rows(str(path))


def test_non_utf8_in_a_json_file(tmp_path):
    path = write(tmp_path, "latin.json", b'[\n  {"prompt": "1+2=", "completion": "3"},\n  {"prompt": "caf\xe9"}\n]')
    with pytest.raises(UserError, match=r"latin\.json:3: not valid UTF-8"):
        D.read_rows(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_leading_bom_is_dropped(tmp_path, suffix):
    text = GOOD_LINE + "\n" if suffix == ".jsonl" else f"[{GOOD_LINE}]"
    path = write(tmp_path, f"bom{suffix}", b"\xef\xbb\xbf" + text.encode())
    [row] = D.read_rows(str(path))
    assert row.data == json.loads(GOOD_LINE)


def test_lone_surrogate_names_line_and_field(tmp_path, tok):
    path = write(tmp_path, "s.jsonl", GOOD_LINE + '\n{"prompt": "1+2=", "completion": "3\\ud800"}\n')
    with pytest.raises(UserError, match=r"s\.jsonl:2: field 'completion' holds a lone UTF-16 surrogate"):
        D.read_rows(str(path))
    # a surrogate pair is one character, as json.dumps writes every emoji by default
    path = write(tmp_path, "pair.jsonl", json.dumps({"prompt": "😀", "completion": "🙃"}) + "\n")
    assert "\\ud83d" in path.read_text()
    [example] = D.sft_examples(D.read_rows(str(path)), tok, 64, 32)
    assert tok.decode(example.prompt_ids) == "😀"


def test_lone_surrogate_in_a_json_file_names_the_row(tmp_path):
    path = write(tmp_path, "s.json", '[{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": ["\\udc00"]}]')
    with pytest.raises(UserError, match=r"s\.json:row 2: field 'answer' holds a lone UTF-16 surrogate"):
        D.read_rows(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_nesting_too_deep_for_json(tmp_path, suffix):
    deep = "[" * 100_000 + "]" * 100_000
    text = f"{GOOD_LINE}\n{deep}\n" if suffix == ".jsonl" else f"[{GOOD_LINE}, {deep}]"
    path = write(tmp_path, f"deep{suffix}", text)
    with pytest.raises(UserError, match=rf"deep{suffix}:\d+: invalid JSON \(nested too deeply\)"):
        D.read_rows(str(path))


def test_values_nested_nearly_as_deep_as_json_allows(tmp_path, tok):
    # json parses them, but comparing two of them (is chosen == rejected?) overflows the stack
    deep = "[" * 950 + "]" * 950
    msg = '{"role": "assistant", "content": "3", "meta": %s}' % deep
    path = write(tmp_path, "deep.jsonl", '{"prompt": [{"role": "user", "content": "1+2="}], '
                 f'"chosen": [{msg}], "rejected": [{msg}]}}\n')
    with pytest.raises(UserError, match=r"deep\.jsonl:1: (a field is nested too deeply|invalid JSON \(nested)"):
        load("preference", path, tok)


def test_truncated_last_line(tmp_path):
    path = write(tmp_path, "cut.jsonl", GOOD_LINE + "\n" + GOOD_LINE[:-7])
    with pytest.raises(UserError, match=r"cut\.jsonl:2: invalid JSON"):
        D.read_rows(str(path))


def test_json_object_instead_of_a_list(tmp_path):
    path = write(tmp_path, "obj.json", GOOD_LINE)
    with pytest.raises(UserError, match=r"obj\.json:1: expected a JSON list of row objects, got an object"):
        D.read_rows(str(path))


def test_json_lines_in_a_json_file_hint_at_jsonl(tmp_path):
    path = write(tmp_path, "lines.json", GOOD_LINE + "\n" + GOOD_LINE + "\n")
    with pytest.raises(UserError, match=r"lines\.json:2: invalid JSON \(Extra data; is it JSON Lines"):
        D.read_rows(str(path))


@pytest.mark.parametrize("line,got", [("[1, 2]", "a list"), ('"text"', "a string"), ("3", "a number"),
                                      ("null", "null"), ("true", "a boolean")])
def test_jsonl_line_that_is_not_an_object(tmp_path, line, got):
    path = write(tmp_path, "lines.jsonl", f"{GOOD_LINE}\n{line}\n")
    with pytest.raises(UserError, match=rf"lines\.jsonl:2: expected a JSON object, got {got}"):
        D.read_rows(str(path))


@pytest.mark.parametrize("content", ["", "\n\n", "\r\n  \r\n", "\ufeff", "\ufeff\n"])
def test_no_rows(tmp_path, content):
    path = write(tmp_path, "empty.jsonl", content)
    with pytest.raises(UserError, match=r"empty\.jsonl: no rows"):
        D.read_rows(str(path))


def test_parquet_with_the_wrong_columns_names_the_row(tmp_path, tok):
    from datasets import Dataset

    path = tmp_path / "pref.parquet"
    Dataset.from_list([{"question": "1+2=", "good": "3", "bad": "4"}]).to_parquet(str(path))
    with pytest.raises(UserError, match=r"pref\.parquet:row 1: missing field 'chosen' \(has: 'question', 'good', "):
        D.preference_examples(D.read_rows(str(path)), tok, 64, 32)


def test_parquet_with_a_null_text_names_the_row_and_field(tmp_path, tok):
    from datasets import Dataset

    path = tmp_path / "sft.parquet"
    Dataset.from_list([{"prompt": "1+2=", "completion": "3"}, {"prompt": "2+2=", "completion": None}]).to_parquet(
        str(path))
    with pytest.raises(UserError, match=r"sft\.parquet:row 2: field 'completion' must be a string .*got null"):
        D.sft_examples(D.read_rows(str(path)), tok, 64, 32)


def test_parquet_nan_margin(tmp_path, tok):
    from datasets import Dataset

    path = tmp_path / "pref.parquet"
    Dataset.from_list([{"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": 1.0},
                       {"prompt": "1+3=", "chosen": "4", "rejected": "5", "margin": math.nan}]).to_parquet(str(path))
    with pytest.raises(UserError, match=r"pref\.parquet:row 2: field 'margin' must be a finite number, got nan"):
        D.preference_examples(D.read_rows(str(path)), tok, 64, 32)


def test_parquet_mixing_messages_and_prompt_completion_rows(tmp_path, tok):
    from datasets import Dataset

    path = tmp_path / "mixed.parquet"  # parquet gives every row every column, None where it had none
    Dataset.from_list([{"messages": [user("1+2="), assistant("3")], "prompt": None, "completion": None},
                       {"prompt": "2+2=", "completion": "4"}]).to_parquet(str(path))
    rows = D.read_rows(str(path))
    assert rows[1].data["messages"] is None
    with pytest.raises(UserError, match=r"mixed\.parquet:row 2: mixed row formats.*'prompt/completion'.*row 1"):
        D.sft_examples(rows, tok, 64, 32)


# ------------------------------------------------------------------ values, one case each


def jsonl(tmp_path: Path, rows, name="data.jsonl") -> Path:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


def test_unknown_role_message_names_line_field_message_and_role(tmp_path, tok):
    path = jsonl(tmp_path, [{"messages": [user("1+2="), assistant("3")]},
                            {"messages": [user("1+2="), assistant("3"), {"role": "bot", "content": "hi"}]}])
    with pytest.raises(UserError) as info:
        load("sft", path, tok)
    assert str(info.value) == (f"{path}:2: field 'messages' message 2 has unknown role 'bot' "
                               "(expected system, user, assistant or tool)")


@pytest.mark.parametrize("kind,row,words", [
    ("sft", {"prompt": " \n", "completion": "3"}, "field 'prompt' is only whitespace"),
    ("sft", {"prompt": "1+2=", "completion": "\t"}, "field 'completion' is only whitespace"),
    ("sft", {"messages": [user("1+2="), assistant("")]}, "field 'messages' message 1 (assistant) has empty content"),
    ("sft", {"messages": [system(" "), user("1+2="), assistant("3")]},
     "field 'messages' message 0 (system) has only whitespace content"),
    ("preference", {"prompt": "1+2=", "chosen": "3", "rejected": "  "}, "field 'rejected' is only whitespace"),
    ("preference", {"prompt": [user("\u3000")], "chosen": "3", "rejected": "4"},
     "field 'prompt' message 0 (user) has only whitespace content"),
    ("prompts", {"prompt": "   "}, "field 'prompt' is only whitespace"),
    ("prompts", {"prompt": ""}, "field 'prompt' is an empty string"),
])
def test_blank_texts_name_line_and_field(tmp_path, tok, kind, row, words):
    with pytest.raises(UserError) as info:
        load(kind, jsonl(tmp_path, [row]), tok)
    assert str(info.value) == f"{tmp_path / 'data.jsonl'}:1: {words}"


def test_empty_string_prompt_is_no_prompt_in_sft_and_preference(tmp_path, tok):
    [example] = load("sft", jsonl(tmp_path, [{"prompt": "", "completion": "46"}]), tok)
    assert example.prompt_ids == [] and tok.decode(example.completion_ids) == "46<|im_end|>"
    [pair] = load("preference", jsonl(tmp_path, [{"prompt": "", "chosen": "3", "rejected": "4"}]), tok)
    assert pair.chosen.prompt_ids == []


def test_assistant_tool_call_turn_may_have_empty_content(tmp_path, tok):
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    rows = [{"messages": [user("weather?"), call, {"role": "tool", "content": "sunny"}, assistant("Sunny.")]}]
    assert len(load("sft", jsonl(tmp_path, rows), tok)) == 1


@pytest.mark.parametrize("margin", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_margin(tmp_path, tok, margin):
    path = write(tmp_path, "m.jsonl", f'{{"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": {margin}}}\n')
    with pytest.raises(UserError, match=r"m\.jsonl:1: field 'margin' must be a finite number"):
        load("preference", path, tok)


def test_mixed_sft_formats_name_the_first_row_of_the_other_format(tmp_path, tok):
    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "2+2=", "completion": "4"},
            {"messages": [user("1+2="), assistant("3")]}, {"messages": [user("2+2="), assistant("4")]}]
    with pytest.raises(UserError) as info:
        load("sft", jsonl(tmp_path, rows), tok)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'data.jsonl'}:3: mixed row formats")
    assert "'messages'" in message and f"{tmp_path / 'data.jsonl'}:1" in message


def test_messages_rows_may_carry_a_prompt_field(tmp_path, tok):
    # e.g. HuggingFaceH4/ultrachat_200k: prompt, prompt_id and messages; the messages are the row
    rows = [{"prompt": "1+2=", "prompt_id": "a", "messages": [user("1+2="), assistant("3")]},
            {"messages": [user("2+2="), assistant("4")]}]
    assert len(load("sft", jsonl(tmp_path, rows), tok)) == 2


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_identical_pairs_are_kept_with_one_counted_warning(tmp_path, tok, capsys):
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "3"},
            {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
            {"prompt": [user("2+2=")], "chosen": [assistant("4")], "rejected": [assistant("4")]},
            {"prompt": "3+3=", "chosen": "6", "rejected": "6", "margin": 1}]
    path = jsonl(tmp_path, rows, "pref.jsonl")
    assert len(load("preference", path, tok)) == 4  # kept: never a silent skip
    assert stderr_lines(capsys) == [f"posttrain: warning: 3 pairs in {path} have chosen == rejected; "
                                    "they carry no preference signal"]
    load("preference", jsonl(tmp_path, rows[:1], "one.jsonl"), tok)
    assert stderr_lines(capsys) == [f"posttrain: warning: 1 pair in {tmp_path / 'one.jsonl'} has chosen == rejected; "
                                    "it carries no preference signal"]
    load("preference", jsonl(tmp_path, rows[1:2], "none.jsonl"), tok)
    assert stderr_lines(capsys) == []


def test_identical_seed_format_conversations_are_an_error(tmp_path, tok):
    chat = [user("2+2="), assistant("4")]
    with pytest.raises(UserError, match=r"data\.jsonl:1: 'chosen' and 'rejected' are identical"):
        load("preference", jsonl(tmp_path, [{"chosen": chat, "rejected": chat}]), tok)
    with pytest.raises(UserError, match=r"data\.jsonl:1: 'rejected' is the start of 'chosen'"):
        load("preference", jsonl(tmp_path, [{"chosen": chat + [user("?"), assistant("4")], "rejected": chat}]), tok)


@pytest.mark.parametrize("kind", ["sft", "preference", "prompts"])
def test_long_prompts_are_cut_with_one_counted_warning(tmp_path, tok, capsys, kind):
    short, long = "1+2=", "9" * 40 + "+1="
    row = {"sft": lambda p: {"prompt": p, "completion": "3"},
           "preference": lambda p: {"prompt": p, "chosen": "3", "rejected": "4"},
           "prompts": lambda p: {"prompt": p}}[kind]
    path = jsonl(tmp_path, [row(long), row(short), row(long), row([user(long)]), row(short)], f"{kind}.jsonl")
    rows = D.read_rows(str(path))
    if kind == "sft":
        examples = D.sft_examples(rows, tok, 512, 16)
    elif kind == "preference":
        examples = [p.chosen for p in D.preference_examples(rows, tok, 512, 16)]
    else:
        examples = D.prompt_examples(rows, tok, 16)
    assert [len(e.prompt_ids) for e in examples] == [16, 4, 16, 16, 4]
    assert stderr_lines(capsys) == [f"posttrain: warning: 3 of 5 prompts in {path} are longer than "
                                    "max_prompt_length=16 tokens and keep their last 16"]


def test_no_long_prompt_warning_when_every_prompt_fits_or_there_is_no_limit(tmp_path, tok, capsys):
    rows = D.read_rows(str(jsonl(tmp_path, [{"prompt": "1+2="}, {"prompt": "9" * 40}])))
    assert [len(e.prompt_ids) for e in D.prompt_examples(rows, tok, 40)] == [4, 40]
    assert [len(e.prompt_ids) for e in D.prompt_examples(rows, tok, 0)] == [4, 40]  # 0: no limit
    assert stderr_lines(capsys) == []


# ------------------------------------------------------------------ from the command line, in-process


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue().splitlines()


@pytest.mark.parametrize("stage,name,content,expected", [pytest.param(*case, id=case[1]) for case in [
    ("sft", "latin1.jsonl", (GOOD_LINE + "\n").encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n',
     ":2: not valid UTF-8"),
    ("sft", "cut.jsonl", GOOD_LINE + "\n" + GOOD_LINE + "\n" + GOOD_LINE[:12], ":3: invalid JSON"),
    ("sft", "role.jsonl", json.dumps({"messages": [user("1+2="), {"role": "bot", "content": "3"}]}) + "\n",
     ":1: field 'messages' message 1 has unknown role 'bot'"),
    ("sft", "blank.jsonl", GOOD_LINE + "\n" + json.dumps({"prompt": "1+2=", "completion": " "}) + "\n",
     ":2: field 'completion' is only whitespace"),
    ("dpo", "nan.jsonl", '{"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": NaN}\n',
     ":1: field 'margin' must be a finite number"),
    ("grpo", "surrogate.jsonl", '{"prompt": "1+2=", "answer": "3"}\n{"prompt": "\\udfff", "answer": "3"}\n',
     ":2: field 'prompt' holds a lone UTF-16 surrogate"),
]])
def test_cli_bad_data_exits_2_with_one_line(tmp_path, tiny_qwen, stage, name, content, expected):
    bad = write(tmp_path, name, content)
    rc, lines = run_cli([stage, "--dataset_name", str(bad), "--output_dir", str(tmp_path / "out"),
                         "--model_name_or_path", str(tiny_qwen), "--progress", "false"])
    assert rc == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("posttrain: error: ") and f"{bad}{expected}" in lines[0], lines
    assert not (tmp_path / "out").exists(), "a rejected run wrote to its output folder"


STAGE_OF_POOL = {"sft:prompt/completion": "sft", "sft:messages": "sft", "preference": "dpo", "prompts": "grpo"}


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(STAGE_OF_POOL)).flatmap(lambda pool: st.tuples(st.just(pool), bad_file(pool))))
def test_generated_bad_files_through_the_cli_exit_2_and_write_nothing(tmp_path_factory, tiny_qwen, case):
    """The whole contract at the CLI's entry function: exit 2, one line naming file:line, no output folder."""
    pool, (content, line, _field, name) = case
    folder = tmp_path_factory.mktemp("cli_bad")
    bad = folder / "bad.jsonl"
    bad.write_bytes(content)
    out = folder / "out"
    argv = [STAGE_OF_POOL[pool], "--dataset_name", str(bad), "--output_dir", str(out),
            "--model_name_or_path", str(tiny_qwen), "--progress", "false", "--num_threads", "1"]
    if STAGE_OF_POOL[pool] == "grpo":
        argv += ["--reward_funcs", "think_format"]  # (exact_match would also demand an `answer` field)
    rc, lines = run_cli(argv)
    event(name)
    assert rc == 2 and len(lines) == 1, (name, lines)
    assert lines[0].startswith("posttrain: error: ") and f"bad.jsonl:{line}:" in lines[0], (name, line, lines)
    assert not out.exists(), name
