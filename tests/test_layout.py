"""The layout's import rules (docs/python.md, "Layout"): the teacher and student phases never import each
other, the cache format shared between teams needs neither torch, transformers nor the tasks, and nothing
reaches into another package's `_private` names. Checked on the source (every import, even one inside a
function) and, for `cache/`, by importing it in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kdcache"

FORBIDDEN = {  # the files under kdcache/<key>/ may not import these (nor anything under them)
    "teacher": ("kdcache.student",),
    "student": ("kdcache.teacher",),
    "cache": ("torch", "transformers", "accelerate", "kdcache.tasks", "kdcache.teacher", "kdcache.student"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The package a module belongs to: itself for a package (`__init__.py`), else its parent."""
    path = REPO.joinpath(*module.split("."))
    return module if path.is_dir() else module.rpartition(".")[0]


def imports(source: str, importer: str) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) for every import statement in module `importer`'s source (`importer`
    is "" outside the package: tests, tools), and for every `module._name` attribute read through a
    name an import bound to a module."""
    found, modules = [], {}  # modules: a name the source uses -> the module it is bound to
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
            modules |= {alias.asname or alias.name: alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package_of(importer).split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                is_module = REPO.joinpath(*submodule.split(".")).with_suffix(".py").is_file() or \
                    REPO.joinpath(*submodule.split(".")).is_dir()
                found.append((submodule, None, node.lineno) if is_module else (base, alias.name, node.lineno))
                if is_module:
                    modules[alias.asname or alias.name] = submodule
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and ast.unparse(node.value) in modules:
            found.append((modules[ast.unparse(node.value)], node.attr, node.lineno))
    return found


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layering_violations(source: str, importer: str) -> list[str]:
    phase = importer.split(".")[1] if importer.count(".") else ""
    return [f"line {line} imports {module}" for module, _, line in imports(source, importer)
            if any(under(module, banned) for banned in FORBIDDEN.get(phase, ()))]


def private_violations(source: str, importer: str) -> list[str]:
    """`from kdcache.x import _y` (or `import kdcache.x._y`) where `_y` belongs to another package."""
    violations = []
    for module, name, line in imports(source, importer):
        private = [part for part in [*module.split("."), name or ""] if part.startswith("_") and not part.startswith("__")]
        owner = package_of(module) if name else package_of(module.rpartition(".")[0] or module)
        if under(module, "kdcache") and private and owner != (package_of(importer) if importer else None):
            violations.append(f"line {line} imports {'.'.join(filter(None, [module, name]))}")
    return violations


def check(rule, *folders: str) -> dict[str, list[str]]:
    """{file: violations} over every Python file under `folders`."""
    found = {}
    for path in sorted(path for folder in folders for path in (REPO / folder).rglob("*.py")):
        importer = module_name(path) if path.is_relative_to(PACKAGE) else ""
        if violations := rule(path.read_text(), importer):
            found[str(path.relative_to(REPO))] = violations
    return found


def test_phases_never_import_each_other_and_the_cache_needs_no_torch():
    assert check(layering_violations, "kdcache") == {}


def test_nothing_imports_another_packages_private_names():
    assert check(private_violations, "kdcache", "tests", "tools") == {}


@pytest.mark.parametrize("source, importer, caught", [
    ("from ..student.train import train_student\n", "kdcache.teacher.dump", True),
    ("import kdcache.teacher.dump\n", "kdcache.student.train", True),
    ("from ..cache import reader\n", "kdcache.student.train", False),
    ("def later():\n    import torch\n", "kdcache.cache.format", True),
    ("from ..tasks import get_task\n", "kdcache.cache.reader", True),
    ("from transformers import AutoTokenizer\n", "kdcache.cache.store", True),
    ("import torch\n", "kdcache.teacher.dump", False),
])
def test_a_planted_layering_violation_is_caught(source, importer, caught):
    assert bool(layering_violations(source, importer)) == caught


@pytest.mark.parametrize("source, importer, caught", [
    ("from ..cache.reader import _DecodedBatch\n", "kdcache.student.feed", True),
    ("from ..errors import _first_line\n", "kdcache.student.feed", True),
    ("from kdcache.demo.run import _train_teacher\n", "", True),  # a tool or a test
    ("from .checkpoint import _step_of\n", "kdcache.student.train", False),  # within its own package
    ("from .. import __version__\n", "kdcache.student.train", False),
    ("from kdcache.cache.reader import iter_sequences\n", "", False),
    ("from kdcache.cache import reader\nreader._DecodedBatch = None\n", "", True),  # monkeypatching a private
    ("import kdcache.student.train\nkdcache.student.train._batches\n", "", True),
    ("import kdcache.student.train as loop\nloop._batches\n", "", True),
])
def test_a_planted_private_import_is_caught(source, importer, caught):
    assert bool(private_violations(source, importer)) == caught


def test_importing_the_cache_package_loads_no_torch():
    """Every module of kdcache.cache, imported in a fresh interpreter: torch, transformers and the tasks stay out."""
    modules = [module_name(path) for path in sorted((PACKAGE / "cache").rglob("*.py"))]
    code = (f"import importlib, json, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', "
            "'accelerate') or m.startswith(('kdcache.tasks', 'kdcache.teacher', 'kdcache.student')))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kdcache.cache.store" in modules and json.loads(result.stdout) == []
