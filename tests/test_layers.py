"""The direction imports run, read from the source: the shared kernel (fareway/) imports no service;
the services (gateway/, workers/, accounting/) import the kernel and not each other, except the
gateway and the workers through accounting's one seam (accounting/recorder.py); the command line
(cli/) sits above everything and nothing imports it; and no module imports itself in a circle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fareway", "gateway", "workers", "accounting", "cli")
KERNEL = "fareway"
SERVICES = ("gateway", "workers", "accounting")
SEAM = "accounting.recorder"
"""The one module of accounting that gateway/ and workers/ link in-process."""


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imported(node: ast.AST) -> Iterator[str]:
    """The known modules an import statement names (every statement, deferred or type-only too)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from a.b import c`: the module a.b.c if there is one, else (a name in it) a.b
        names = [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return
    for name in names:
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if (candidate := ".".join(parts[:end])) in MODULES:
                yield candidate
                break


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[module] = {target for node in ast.walk(tree) for target in _imported(node) if target != module}
    return graph


IMPORTS = _imports()


def _layer(module: str) -> str:
    return module.split(".", 1)[0]


def _allowed(module: str, target: str) -> bool:
    layer, target_layer = _layer(module), _layer(target)
    if layer == target_layer or target_layer == KERNEL:
        return True
    if layer == "cli":
        return True
    return layer in ("gateway", "workers") and target == SEAM


def test_the_packages_are_found() -> None:
    assert {"fareway.errors", "gateway.dispatch", "workers.worker", "accounting.ledger", "cli.main"} <= set(MODULES)
    assert "fareway.redis.keys" in IMPORTS["fareway.quota"]


def test_each_layer_imports_only_what_is_below_it() -> None:
    wrong = sorted(f"{module} imports {target}" for module, targets in IMPORTS.items() for target in targets
                   if not _allowed(module, target))
    assert wrong == [], "imports against the layering:\n" + "\n".join(wrong)


def test_the_kernel_imports_no_service() -> None:
    kernel = {module: targets for module, targets in IMPORTS.items() if _layer(module) == KERNEL}
    assert len(kernel) > 20
    assert all(_layer(target) == KERNEL for targets in kernel.values() for target in targets)


def test_the_services_meet_accounting_only_at_its_seam() -> None:
    through = {target for module, targets in IMPORTS.items() if _layer(module) in ("gateway", "workers")
               for target in targets if _layer(target) == "accounting"}
    assert through == {SEAM}, through
    seam_users = {_layer(module) for module, targets in IMPORTS.items() if SEAM in targets}
    assert {"gateway", "workers"} <= seam_users


def test_nothing_imports_the_command_line() -> None:
    assert [m for m, targets in IMPORTS.items() if _layer(m) != "cli" and any(_layer(t) == "cli" for t in targets)] == []


def _with_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ too: edges to the packages above an imported
    module, except those above the importing module itself (a package importing its own modules)."""
    full = {}
    for module, targets in graph.items():
        own = {".".join(module.split(".")[:end]) for end in range(1, module.count(".") + 2)}
        implied = {".".join(t.split(".")[:end]) for t in targets for end in range(1, t.count(".") + 1)}
        full[module] = targets | {p for p in implied - own if p in graph}
    return full


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)) is not None:
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = _cycle(_with_packages(IMPORTS))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    """The checks above are only as good as this one: a cycle, even through a package's __init__, is found."""
    assert _cycle({"a.x": {"a.y"}, "a.y": {"a.x"}}) == ["a.x", "a.y", "a.x"]
    assert _cycle({"a.x": {"b.y"}, "b.y": set(), "b": {"b.z"}, "b.z": {"a.x"}, "a": set()}) is None
    through_init = {"w.runner": {"w.par.group"}, "w.par.group": set(), "w.par": {"w.par.launcher"},
                    "w.par.launcher": {"w.runner"}}
    assert _cycle(through_init) is None  # not without the packages' own imports
    assert _cycle(_with_packages(through_init)) == ["w.par", "w.par.launcher", "w.runner", "w.par"]
