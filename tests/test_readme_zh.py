"""README.zh-CN.md keeps up with README.md: every command, every code block, the section count and the cross-links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND_PREFIXES = ("posttrain ", "make ", "torchrun ", "python ", "apt-get ", "tensorboard ")


def fenced_blocks(text: str) -> list[str]:
    """The bodies of the ``` fenced blocks, in order."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def command_lines(text: str) -> list[str]:
    """Lines of fenced blocks that are commands (with their `\\` continuation lines)."""
    lines = []
    for block in fenced_blocks(text):
        continued = False
        for line in block.splitlines():
            if continued or line.lstrip().startswith(COMMAND_PREFIXES):
                lines.append(line)
            continued = line.rstrip().endswith("\\")
    return lines


def inline_commands(text: str) -> list[str]:
    """Inline `...` spans that are commands, e.g. `python benchmarks/padding_free.py --layers 2`."""
    return [span for span in re.findall(r"`([^`\n]+)`", text) if span.startswith(COMMAND_PREFIXES)]


def headings(text: str) -> list[str]:
    """Markdown heading markers (##, ###) outside fenced blocks, in order."""
    outside = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"^(#{1,6}) ", outside, flags=re.M)


def tables(text: str) -> list[list[str]]:
    """The Markdown tables outside fenced blocks, each as its list of `|` rows."""
    outside = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [block.strip().splitlines() for block in re.findall(r"(?:^\|.*\n)+", outside, flags=re.M)]


def row_numbers(row: str) -> list[str]:
    """The numbers of a table row in order (1.8, 4,096, 1e-8, 2^25 ...), which a translation keeps as they are."""
    return re.findall(r"\d+(?:[.,]\d+)*(?:e-?\d+)?", row)


@pytest.fixture(scope="module")
def readmes() -> tuple[str, str]:
    return (REPO / "README.md").read_text(encoding="utf-8"), (REPO / "README.zh-CN.md").read_text(encoding="utf-8")


def test_helpers_find_commands_on_a_known_text():
    text = "# t\n\nrun `posttrain demo --quick` now\n\n```\nmake demo   # x\ntorchrun --a \\\n    -m posttrain sft\nnot a command\n```\n"
    assert command_lines(text) == ["make demo   # x", "torchrun --a \\", "    -m posttrain sft"]
    assert inline_commands(text) == ["posttrain demo --quick"]
    assert headings(text) == ["#"]
    table = "x\n\n| a | b |\n|---|---|\n| 7B (3584 × 28) | 1,310.7 kB, eps 1e-8 |\n\nafter\n"
    assert tables(table) == [["| a | b |", "|---|---|", "| 7B (3584 × 28) | 1,310.7 kB, eps 1e-8 |"]]
    assert row_numbers(tables(table)[0][2]) == ["7", "3584", "28", "1,310.7", "1e-8"]


def test_every_command_line_of_readme_is_in_the_translation(readmes):
    english, chinese = readmes
    commands = command_lines(english)
    assert len(commands) >= 10, "README.md's code blocks should hold the project's commands"
    chinese_lines = set(chinese.splitlines())
    missing = [line for line in commands if line not in chinese_lines]
    assert not missing, f"README.zh-CN.md lacks these command lines of README.md: {missing}"


def test_every_code_block_is_carried_verbatim(readmes):
    english, chinese = readmes
    english_blocks, chinese_blocks = fenced_blocks(english), fenced_blocks(chinese)
    missing = [block.splitlines()[0] for block in english_blocks if block not in chinese_blocks]
    assert not missing, f"README.zh-CN.md lacks (or changed) the code blocks starting with: {missing}"
    assert len(chinese_blocks) == len(english_blocks)


def test_every_inline_command_is_carried(readmes):
    english, chinese = readmes
    missing = [span for span in inline_commands(english) if f"`{span}`" not in chinese]
    assert not missing, f"README.zh-CN.md lacks these inline commands of README.md: {missing}"


def test_same_section_structure(readmes):
    english, chinese = readmes
    assert headings(chinese) == headings(english)


def test_tables_have_the_same_rows_and_numbers(readmes):
    english, chinese = readmes
    english_tables, chinese_tables = tables(english), tables(chinese)
    assert len(chinese_tables) == len(english_tables) >= 4
    for english_rows, chinese_rows in zip(english_tables, chinese_tables):
        assert len(chinese_rows) == len(english_rows), f"table starting {english_rows[0]!r} has another row count"
        for english_row, chinese_row in zip(english_rows, chinese_rows):
            assert row_numbers(chinese_row) == row_numbers(english_row), f"numbers differ from README.md's row {english_row!r}"
            cells = re.compile(r"(?<!\\)\|")
            assert len(cells.findall(chinese_row)) == len(cells.findall(english_row)), f"columns differ from README.md's row {english_row!r}"


def test_each_links_to_the_other(readmes):
    english, chinese = readmes
    assert "[README.zh-CN.md](README.zh-CN.md)" in "\n".join(english.splitlines()[:5])
    assert "[README.md](README.md)" in "\n".join(chinese.splitlines()[:5])
