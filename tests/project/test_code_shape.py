"""The project's rule that ruff cannot check: no function over 50 lines (from `def` to its last line,
decorators excluded; docstrings and comments count, as a reader reads them)."""

import ast

from helpers import REPO

FOLDERS = ("model", "train", "data_pipeline", "launch", "benchmarks", "tests")
MAX_LINES = 50


def long_functions(source: str, where: str) -> list[str]:
    """`where:Class.function:lines` for every function or method in source longer than MAX_LINES."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = child.end_lineno - child.lineno + 1  # lineno is the `def` line, after any decorators
                if lines > MAX_LINES:
                    out.append(f"{where}:{name[:-1]}:{lines}")
            visit(child, name)

    visit(ast.parse(source), "")
    return out


def test_no_function_is_over_50_lines():
    files = sorted(f for folder in FOLDERS for f in (REPO / folder).rglob("*.py"))
    assert len(files) > 20  # the walk found the code
    found = [hit for f in files for hit in long_functions(f.read_text(), str(f.relative_to(REPO)))]
    assert not found, f"functions over {MAX_LINES} lines (split them): " + ", ".join(found)


def test_long_functions_counts_from_def_to_the_last_line():
    def body(indent: int, n: int) -> str:
        return "".join(f"{' ' * indent}x{i} = {i}\n" for i in range(n))

    fits = "@decorator\n@another\ndef fits():\n" + body(4, 49)  # def + 49 lines = 50; decorators do not count
    nested = "class Box:\n    def method(self):\n        def inner():\n" + body(12, 50)  # inner 51, method 52
    assert long_functions(fits, "a.py") == []
    assert long_functions(nested, "b.py") == ["b.py:Box.method:52", "b.py:Box.method.inner:51"]
