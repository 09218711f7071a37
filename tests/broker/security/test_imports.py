"""The security package's import rules: every module imports on its own, the package has no
import cycle, and it imports nothing from the layers it guards (front, flow, pooling)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import broker.security

PACKAGE = "broker.security"
FORBIDDEN = ("broker.front", "broker.flow", "broker.pooling")
SOURCES = sorted(Path(broker.security.__file__).parent.glob("*.py"))
MODULES = [PACKAGE if p.stem == "__init__" else f"{PACKAGE}.{p.stem}" for p in SOURCES]


def imported_modules(source: Path) -> set[str]:
    """Every module *source* imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def security_imports() -> dict[str, set[str]]:
    """Module → the broker.security modules it imports."""
    return {
        module: {m for m in imported_modules(source) if m in MODULES and m != PACKAGE}
        for module, source in zip(MODULES, SOURCES, strict=True)
    }


@pytest.mark.parametrize("module", MODULES)
def test_each_security_module_imports_alone_without_the_front_flow_or_pool(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_no_security_module_names_the_front_flow_or_pool(source: Path) -> None:
    named = sorted(m for m in imported_modules(source) if m.startswith(FORBIDDEN))
    assert named == []


def test_security_modules_import_each_other_without_a_cycle() -> None:
    graph = security_imports()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_iam_and_token_auth_build_on_the_identity_module_only() -> None:
    graph = security_imports()
    # iam also uses the STS call bounds, which themselves build on identity only.
    assert graph[f"{PACKAGE}.iam"] == {f"{PACKAGE}.identity", f"{PACKAGE}.stsgate"}
    assert graph[f"{PACKAGE}.stsgate"] == {f"{PACKAGE}.identity"}
    assert graph[f"{PACKAGE}.tokens"] == {f"{PACKAGE}.identity"}
    assert graph[f"{PACKAGE}.identity"] == set()
