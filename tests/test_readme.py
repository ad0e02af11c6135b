"""Every Python block of the README runs as written (issue 16.3).

The blocks name the two real checkpoints ``all-MiniLM-L6-v2/`` and ``mobilenet_v2-b0353104.pth``;
``torchgraft demo --link DIR`` puts links with those names in DIR, as the README says, and the
blocks run from there: nothing in them is substituted. A block preceded by
``<!-- readme-test: skip (reason) -->`` is not run (the reason, e.g. "needs torchrun", is required).
Where a line is an expression followed by a comment that is a Python literal
(``report.missing   # ['classifier.weight', 'classifier.bias']``), the test checks that value.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from torchgraft.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?P<before>(?:<!--[^\n]*-->\n)?)```python\n(?P<code>.*?)\n```", re.S)
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")


def readme_blocks() -> list[tuple[int, str, str | None]]:
    """``(line number, code, skip reason or None)`` for every ```python block."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        skip = _SKIP.search(m.group("before"))
        out.append((line, m.group("code"), skip.group("reason") if skip else None))
    return out


def documented_values(code: str) -> dict[int, object]:
    """Line number -> the literal a trailing comment documents for a bare expression on that line."""
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(code).readline)
        if tok.type == tokenize.COMMENT
    }
    values = {}
    for node in ast.parse(code).body:
        if isinstance(node, ast.Expr) and node.lineno == node.end_lineno and node.lineno in comments:
            comment = comments[node.lineno]
            literal = comment[: comment.rfind("]") + 1] if comment.startswith("[") else comment
            try:
                values[node.lineno] = ast.literal_eval(literal)
            except (ValueError, SyntaxError):
                continue  # a comment in words, or an abbreviated value ("...")
    return values


def test_readme_has_runnable_blocks():
    blocks = readme_blocks()
    assert len(blocks) >= 5
    assert any(reason for _, _, reason in blocks), "the distributed example is marked as needing torchrun"
    assert sum(len(documented_values(code)) for _, code, _ in blocks) >= 3  # the checks below check something
    text = README.read_text(encoding="utf-8")
    assert "torchgraft demo --link ." in text and "readme-test: skip" in text
    assert "seed's" not in text and "the seed " not in text  # 4. words a user can interpret


@pytest.mark.parametrize("line, code, skip", readme_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_block_runs_as_written(line, code, skip, tmp_path, monkeypatch, minilm_dir, mobilenet_path, capsys):
    if skip:
        pytest.skip(f"README line {line}: {skip}")
    assert main(["demo", "--link", str(tmp_path)]) == 0  # what the README tells a user to run first
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    tree = ast.parse(code)
    expected = documented_values(code)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for node in tree.body:
        if node.lineno in expected:
            value = eval(compile(ast.Expression(node.value), f"README.md:{line}", "eval"), namespace)
            assert value == expected[node.lineno], f"README line {line + node.lineno - 1}: {ast.unparse(node)}"
        else:
            exec(compile(ast.Module([node], []), f"README.md:{line}", "exec"), namespace)
