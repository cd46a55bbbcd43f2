"""The house rules of the tree: which modules may import which (docs/design.md, "Layout").

Every import inside ``forkserver/`` counts -- at module level or inside a
function -- except those under ``if TYPE_CHECKING:``.  Two rules:

* **Layers**: a module never imports one of a higher layer.  The wire is at
  the bottom, the code that runs inside templates above it, the parent's
  process layer above that, then the capability rooms, the bench, and the
  public face on top.
* **No circles** among the modules of the parent side (a room may import
  another room -- a supervisor spawns programs -- but never in a circle).
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Set

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "forkserver"

# (layer, module-name prefixes), lowest first.  A module's layer is that of
# its longest matching prefix.
LAYERS = [
    ("wire", ["forkserver._errors", "forkserver._protocol", "forkserver._fds", "forkserver._fdpass",
              "forkserver._slots", "forkserver._sibling"]),
    ("template side", ["forkserver._server"]),
    ("processes", [
        "forkserver._boot", "forkserver._context", "forkserver._default", "forkserver._wait",
        "forkserver._interrupts", "forkserver._link", "forkserver._running",
        "forkserver._reaper", "forkserver._process", "forkserver._cloning", "forkserver._template",
        "forkserver._async",
    ]),
    ("rooms", ["forkserver._programs", "forkserver._pool", "forkserver._supervise", "forkserver._zygote"]),
    ("bench", ["forkserver._bench"]),
    ("public face", ["forkserver", "forkserver.aio", "forkserver.worker", "forkserver.__main__",
                     "forkserver._console"]),
]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int:
    best, rank = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    assert rank >= 0, f"{name} belongs to no layer: add it to LAYERS in {__file__}"
    return rank


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node, skipping the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if _type_checking_only(child):
            for other in child.orelse:  # type: ignore[attr-defined]
                yield other
                yield from _walk(other)
            continue
        yield child
        yield from _walk(child)


def imports_of(name: str, path: pathlib.Path, known: Set[str]) -> Set[str]:
    """The forkserver modules ``name`` imports (submodules named in ``from x import y`` too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from pkg import mod" imports the submodule; the package counts
            # only for names that are not submodules (its own attributes).
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def graph() -> Dict[str, Set[str]]:
    mods = modules()
    known = set(mods) | {"forkserver._fdpass"}
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_module_belongs_to_a_layer():
    for name in modules():
        layer_of(name)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_a_higher_layer(name):
    mine = layer_of(name)
    upward = sorted(m for m in graph()[name] if layer_of(m) > mine)
    assert not upward, (
        f"{name} ({LAYERS[mine][0]}) imports {upward} from a higher layer; "
        "move the shared code down, or pass it in"
    )


def test_the_parent_side_has_no_import_circle():
    edges = {
        name: deps for name, deps in graph().items()
        if layer_of(name) >= 2  # parent side: processes and up
    }
    cycle = _find_cycle(edges)
    assert not cycle, "import circle: " + " -> ".join(cycle)


def _find_cycle(edges: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if dep not in edges:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_checker_sees_a_circle_and_an_upward_import():
    # The rules above must be able to fail: a circle and an upward edge are found.
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert not _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()})
    assert layer_of("forkserver._process") > layer_of("forkserver._fds")
    assert layer_of("forkserver._programs._spawn") > layer_of("forkserver._template")
