"""The package's layers: which subpackage may import which, third-party limits, no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "encfs_cloud"

# Each layer and the layers it may import. Lower layers never import higher ones; `errors`,
# `layout` and the package root (its version) are leaves that every layer may import.
LEAVES = frozenset({"errors", "layout", "__root__"})
ALLOWED: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "layout": frozenset(),
    "__root__": frozenset(),
    "crypto": frozenset(),
    "store": frozenset(),
    "keys": frozenset({"crypto", "store"}),
    "tree": frozenset({"crypto", "keys", "store"}),
    "data": frozenset({"crypto", "keys", "store", "tree"}),
    "daemon": frozenset({"crypto", "keys", "store", "tree", "data"}),
    "tools": frozenset({"crypto", "keys", "store", "tree", "data", "daemon"}),
    "cli": frozenset({"crypto", "keys", "store", "tree", "data", "daemon", "tools"}),
}

# Third-party modules that only some layers (or modules) may import.
FORBIDDEN_THIRD_PARTY: dict[str, frozenset[str]] = {
    "crypto": frozenset({"pyfuse3", "trio", "boto3", "botocore"}),
    "keys": frozenset({"pyfuse3", "trio", "boto3", "botocore"}),
    "store": frozenset({"pyfuse3", "trio"}),
    "tree": frozenset({"pyfuse3", "trio", "boto3", "botocore"}),
    "data": frozenset({"pyfuse3", "boto3", "botocore"}),
    "daemon": frozenset({"boto3", "botocore"}),
    "tools": frozenset({"pyfuse3", "boto3", "botocore"}),
    "cli": frozenset({"pyfuse3", "boto3", "botocore"}),
}
# The FUSE binding stays in the two modules that talk to the kernel.
PYFUSE3_MODULES = frozenset(
    {"encfs_cloud.daemon.operations", "encfs_cloud.daemon.mount", "encfs_cloud.daemon.fuse_glue"}
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__root__" if len(parts) == 1 else parts[1]


def _imports(module: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(package modules, top-level third-party names) imported anywhere in the module."""
    internal: set[str] = set()
    external: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                for alias in node.names
            ]
        for target in targets:
            if target.split(".")[0] != "encfs_cloud":
                external.add(target.split(".")[0])
                continue
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target != module:
                internal.add(target)
    return internal, external


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    internal, external = {}, {}
    for name, path in modules.items():
        internal[name], external[name] = _imports(name, path, set(modules))
    return internal, external


def test_every_module_belongs_to_a_known_layer() -> None:
    unknown = sorted(m for m in _modules() if _layer(m) not in ALLOWED)
    assert not unknown, f"modules outside the layer table: {unknown}"


def test_imports_follow_the_layer_table() -> None:
    internal, _ = _graph()
    bad = []
    for module, targets in internal.items():
        layer = _layer(module)
        for target in targets:
            other = _layer(target)
            if other == layer or other in LEAVES or other in ALLOWED[layer]:
                continue
            bad.append(f"{module} -> {target} ({layer} may not import {other})")
    assert not bad, "\n".join(sorted(bad))


def test_third_party_imports_stay_in_their_layers() -> None:
    _, external = _graph()
    bad = []
    for module, names in external.items():
        forbidden = FORBIDDEN_THIRD_PARTY.get(_layer(module), frozenset())
        bad += [f"{module} imports {name}" for name in sorted(names & forbidden)]
        if "pyfuse3" in names and module not in PYFUSE3_MODULES:
            bad.append(f"{module} imports pyfuse3 (only {sorted(PYFUSE3_MODULES)} may)")
    assert not bad, "\n".join(sorted(set(bad)))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    internal, _ = _graph()
    # A package's __init__ importing its own modules is not a cycle of concern; none do today.
    assert _cycles(internal) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected


def test_layer_checker_sees_a_violation(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text("from encfs_cloud.daemon import mount\nimport pyfuse3\n")
    known = set(_modules())
    internal, external = _imports("encfs_cloud.keys.probe", module, known)
    assert internal == {"encfs_cloud.daemon.mount"}
    assert external == {"pyfuse3"}
    assert "daemon" not in ALLOWED["keys"]


def test_key_modules_import_no_fuse_trio_or_boto3_at_run_time() -> None:
    """The static table above, checked once more through real (transitive) imports."""
    code = (
        "import sys\n"
        "import encfs_cloud.crypto.aead, encfs_cloud.crypto.codes, encfs_cloud.crypto.passkdf\n"
        "import encfs_cloud.keys.master, encfs_cloud.keys.device, encfs_cloud.keys.vault\n"
        "import encfs_cloud.keys.enrollment, encfs_cloud.keys.records, encfs_cloud.keys.sealed\n"
        "bad = {'pyfuse3', 'trio', 'boto3', 'botocore'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
