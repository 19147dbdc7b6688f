"""The suite's own layout: shared test code lives in tests/support, so no test module imports
another test module or conftest, support imports no test module, and conftest holds only
fixtures."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TEST_MODULES = {p.stem for p in TESTS.glob("test_*.py")} | {"conftest"}


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module the file imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_test_module_imports_another_test_module_or_conftest() -> None:
    files = [*TESTS.glob("*.py"), *(TESTS / "support").glob("*.py")]
    offenders = {f"{path.relative_to(TESTS)} imports {name}"
                 for path in files for name in imported_modules(path) & TEST_MODULES}
    assert sorted(offenders) == [], "move shared code to tests/support"


def test_conftest_holds_only_fixtures() -> None:
    tree = ast.parse((TESTS / "conftest.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            fixture = any("fixture" in ast.unparse(d) for d in node.decorator_list)
            assert fixture, f"conftest.{node.name} is not a fixture: move it to tests/support"
        else:
            assert isinstance(node, ast.Import | ast.ImportFrom | ast.Expr), (
                f"conftest line {node.lineno}: only imports and fixtures belong there (tests/support)")
