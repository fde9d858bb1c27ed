"""The command lines of README.md and docs/*.md run as written on a fresh clone after `make install`
or `make test`: through `.venv/bin/...` or `make`, never a bare `python` / `pytest` / `pip` that
only an activated environment would resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
# A bare interpreter or tool as the command, after any `VAR=value` prefixes or `time`.
BARE = re.compile(r"^(?:\w+=\S*\s+)*(?:(?:/usr/bin/)?time(?:\s+-v)?\s+)?(python3?|pytest|pip3?)(\s|$)")


def bash_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a ```bash / ```sh / ```shell block."""
    out, lang = [], None
    for n, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            lang = None if lang is not None else fence.group(1)
        elif lang in ("bash", "sh", "shell"):
            out.append((n, line))
    return out


def bare_commands(text: str) -> list[str]:
    return [f"line {n}: {line.strip()}" for n, line in bash_lines(text) if BARE.match(line.strip())]


def test_the_rule_catches_bare_commands():
    text = "x\n```bash\npython scripts/train.py\n  XLA_FLAGS=1 pytest -q tests\n.venv/bin/python ok.py\n" \
           "make demo\n```\n```python\npython = 3\n```\n"
    assert bare_commands(text) == ["line 3: python scripts/train.py", "line 4: XLA_FLAGS=1 pytest -q tests"]


def test_the_readme_has_command_blocks_to_check():
    assert any("scripts/train.py" in line for _, line in bash_lines((ROOT / "README.md").read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_need_no_activated_venv(doc):
    assert bare_commands(doc.read_text()) == [], f"{doc.name}: use .venv/bin/... or a make target"
