"""The source stays readable in pieces: no module over ~450 lines, no function over ~80.

GPTQ's column loop (algorithms/gptq.py: gptq_quantize) is the one function allowed to be longer:
it is the algorithm as published, one pass over the columns, and reads best whole."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
LONGER = {("algorithms/gptq.py", "gptq_quantize")}


def long_functions(tree: ast.AST, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in `tree` longer than `limit` lines."""
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"split these modules by concern: {long}"


def test_no_function_is_over_80_lines():
    found = [(str(p.relative_to(SRC)), name, n) for p in SRC.rglob("*.py")
             for name, n in long_functions(ast.parse(p.read_text()), MAX_FUNCTION_LINES)]
    assert not [f for f in found if f[:2] not in LONGER], f"split these functions into named steps: {found}"


def test_the_function_length_check_sees_a_long_function():
    body = "\n".join(f"        x{i} = {i}" for i in range(90))
    tree = ast.parse(f"def short():\n    pass\n\nclass C:\n    def long(self):\n{body}\n")
    assert long_functions(tree, MAX_FUNCTION_LINES) == [("long", 91)]
