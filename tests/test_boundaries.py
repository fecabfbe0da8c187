"""The package boundaries of DESIGN.md, checked three ways.

- At run time: every module of edge/, common/ and kernels/ imports in a child
  Python that cannot import torch, tensorrt or cloud (a device has none).
- In the source: no import (top level or lazy) crosses a forbidden line.
- In packaging: the ``edge`` extra pulls no torch; ``cloud`` pins torch.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"

# --- (a) the device view: import everything with torch, tensorrt and cloud absent ---------

_CHILD = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys, traceback

    BLOCKED = {"torch", "tensorrt", "cloud"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked on a device: {name}", name=name)
            return None

    preloaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    if preloaded:
        sys.exit(f"already imported before the blocker was installed: {preloaded}")
    sys.meta_path.insert(0, Block())

    failures = []

    def record(name):
        failures.append(f"{name}:\\n{traceback.format_exc()}")

    def load(name):
        try:
            importlib.import_module(name)
            print("imported", name)
        except Exception:
            record(name)

    for package in ("edge", "common", "kernels"):  # `import edge` first, as a device does
        load(package)
        root = sys.modules.get(package)
        if root is None:
            continue
        for info in pkgutil.walk_packages(root.__path__, prefix=package + ".", onerror=record):
            load(info.name)

    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    if leaked:
        failures.append(f"blocked modules ended up in sys.modules: {leaked}")
    if failures:
        sys.exit("\\n\\n".join(failures))
    """
)


def test_device_packages_import_without_torch_tensorrt_or_cloud() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    imported = {
        line.split()[1] for line in result.stdout.splitlines() if line.startswith("imported")
    }
    assert {"edge", "common", "kernels"} <= imported
    assert any(name.startswith("common.") for name in imported)  # the walk found modules


# --- (b) the source view: no forbidden import anywhere, lazy ones included -----------------


@dataclass(frozen=True)
class Rule:
    packages: tuple[str, ...]  # top-level dirs the rule applies to
    forbidden: frozenset[str]  # top-level modules they must not import
    lazy_ok: frozenset[str] = frozenset()  # allowed inside a function body only


RULES = [
    Rule(("edge",), frozenset({"torch", "cloud", "tensorrt"}), lazy_ok=frozenset({"tensorrt"})),
    Rule(("common",), frozenset({"torch", "tensorrt", "cloud", "edge"})),
    Rule(("kernels",), frozenset({"edge", "cloud"})),
    Rule(("cloud",), frozenset({"edge"})),
]
# NOTE: edge/ may import tensorrt lazily, inside the TensorRT backend's functions
# ("TensorRT where present", DESIGN.md); the run-time test above proves that every
# edge module still imports without it.


@dataclass(frozen=True)
class ImportSite:
    path: Path  # relative to the scanned root
    line: int
    top: str  # top-level module imported
    lazy: bool  # inside a function body

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.top}" + (" (lazily)" if self.lazy else "")


class _ImportVisitor(ast.NodeVisitor):
    """Collects every import: statements, relative ones resolved, and import_module("…")."""

    def __init__(self, path: Path) -> None:
        self.path = path
        parts = list(path.with_suffix("").parts)  # e.g. ["edge", "sub", "mod"]
        self.package = parts[:-1]  # for __init__.py too: its package is its directory
        self.depth = 0
        self.sites: list[ImportSite] = []

    def _add(self, node: ast.stmt | ast.expr, dotted: str) -> None:
        top = dotted.partition(".")[0]
        self.sites.append(ImportSite(self.path, node.lineno, top, self.depth > 0))

    def _visit_function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function
    visit_Lambda = _visit_function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0:
            self._add(node, node.module or "")
            return
        base = self.package[: len(self.package) - (node.level - 1)]
        if node.module:
            self._add(node, ".".join([*base, node.module]))
        else:
            for alias in node.names:
                self._add(node, ".".join([*base, alias.name]))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(node, arg.value)
        self.generic_visit(node)


def import_sites(root: Path, package: str) -> Iterator[ImportSite]:
    for path in sorted((root / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        visitor = _ImportVisitor(path.relative_to(root))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        yield from visitor.sites


def violations(rule: Rule, root: Path = ROOT) -> list[ImportSite]:
    return [
        site
        for package in rule.packages
        for site in import_sites(root, package)
        if site.top in rule.forbidden and not (site.lazy and site.top in rule.lazy_ok)
    ]


@pytest.mark.parametrize("rule", RULES, ids=[rule.packages[0] for rule in RULES])
def test_no_forbidden_imports(rule: Rule) -> None:
    found = violations(rule)
    assert not found, "\n".join(map(str, found))


def test_import_scanner_sees_what_the_rules_forbid(tmp_path: Path) -> None:
    # The scanner must catch every spelling, or the check above proves nothing.
    pkg = tmp_path / "edge" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "edge" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .. import sub\n")
    (pkg / "bad.py").write_text(
        textwrap.dedent(
            """
            import torch.nn
            from cloud.registry import Registry
            from . import sibling
            import importlib
            importlib.import_module("torch")

            def backend():
                import tensorrt
                from cloud import x
            """
        )
    )
    found = violations(RULES[0], root=tmp_path)
    assert [(site.line, site.top) for site in found] == [
        (2, "torch"),
        (3, "cloud"),
        (6, "torch"),
        (10, "cloud"),
    ], found
    # lazy tensorrt is allowed in edge/; relative imports resolve inside edge
    sites = list(import_sites(tmp_path, "edge"))
    assert {site.top for site in sites if site.line in (1, 4)} == {"edge"}


# --- (c) the packaging view ------------------------------------------------------------------

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*)$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_requirements(extra: str) -> list[str]:
    """Requirements of ``extra``, with ``fogline[other]`` self-references expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    own = _normalize(project["name"])
    seen: set[str] = set()
    out: list[str] = []

    def expand(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for req in extras[name]:
            match = _NAME.match(req)
            assert match, f"unparsable requirement {req!r} in extra {name!r}"
            if _normalize(match.group(1)) == own:
                for sub in (match.group(2) or "").split(","):
                    expand(sub.strip())
            else:
                out.append(req)

    expand(extra)
    return [*project.get("dependencies", []), *out]


def _names(requirements: list[str]) -> set[str]:
    return {_normalize(_NAME.match(req).group(1)) for req in requirements}  # type: ignore[union-attr]


def test_edge_extra_pulls_no_torch() -> None:
    names = _names(extra_requirements("edge"))
    assert not names & {"torch", "tensorrt"}, names
    assert {"numpy", "onnxruntime", "paho-mqtt"} <= names


def test_cloud_extra_pins_torch() -> None:
    torch_reqs = [
        req.replace(" ", "")
        for req in extra_requirements("cloud")
        if _normalize(_NAME.match(req).group(1)) == "torch"  # type: ignore[union-attr]
    ]
    assert torch_reqs == [TORCH_PIN]


_CLI_CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {"torch", "tensorrt", "sklearn", "onnx"}:
                raise ModuleNotFoundError(f"not installed on a device: {name}", name=name)

    sys.meta_path.insert(0, Block())
    from fogline.cli import main
    try:
        main(["edge", "run", "--help"])
    except SystemExit as exc:
        sys.exit(exc.code)
    """
)


def test_fogline_edge_run_works_on_a_device_without_cloud_libraries() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CLI_CHILD], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
