"""Every module in agent/ and deploy/ is readable in one sitting (issue 11).

A module over ``MAX_LINES`` must say why it stays whole in its docstring (a line starting
``Kept whole:``); a function over ``MAX_FUNCTION_LINES`` is split, never excused: a long function is
where a reader loses the thread.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 600
MAX_FUNCTION_LINES = 120


def _modules() -> list[Path]:
    return sorted(p for d in ("agent", "deploy") for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_modules_fit_one_sitting_or_say_why() -> None:
    too_long = []
    for p in _modules():
        source = p.read_text()
        n = source.count("\n")
        doc = ast.get_docstring(ast.parse(source)) or ""
        if n > MAX_LINES and "Kept whole:" not in doc:
            too_long.append(f"{p.relative_to(REPO)}: {n} lines")
    assert not too_long, "split these or say 'Kept whole: <why>' in the docstring:\n" + "\n".join(too_long)


def test_no_function_is_longer_than_a_screenful_or_two() -> None:
    long_functions = []
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long_functions, "\n".join(long_functions)


def test_the_rule_sees_a_long_module() -> None:
    """The walk finds the big modules (so an empty list above is a real result)."""
    sizes = {p.relative_to(REPO).as_posix(): p.read_text().count("\n") for p in _modules()}
    assert len(sizes) > 50 and max(sizes.values()) > 300
