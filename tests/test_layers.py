"""The package's imports point one way: each layer uses only itself and the layers below, and no two
modules import each other, directly or around a loop (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loracap"

# Low to high, as the README's Layout section draws it.
LAYERS: list[tuple[str, ...]] = [
    ("loracap.files", "loracap.hub", "loracap.styles", "loracap.config"),
    ("loracap.inputs",),
    ("loracap.prefix",),
    ("loracap.backends",),
    ("loracap.onnx_export",),
    ("loracap.postprocess", "loracap.request"),
    ("loracap.dataset",),
    ("loracap.pipeline", "loracap.captioner"),
    ("loracap.quality",),
    ("loracap.data",),
    ("loracap.train", "loracap.dreambooth", "loracap.scale", "loracap.merge"),
    (
        "loracap.serve",
        "loracap.edit",
        "loracap.browser",
        "loracap.cli",
        "loracap.__main__",
        "loracap.testing",
        "loracap",
    ),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best = max(
        ((len(prefix), rank) for rank, names in enumerate(LAYERS) for prefix in names
         if module == prefix or module.startswith(prefix + ".")),
        default=None,
    )  # fmt: skip
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to the README's Layout)"
    return best[1]


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set[str]:
    """The loracap modules `module` imports anywhere in its code, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "loracap"}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "loracap":
                continue
            # `from loracap import files` names a module; `from loracap.files import x` a name in one.
            names = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            found |= names or {target}
    return found - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_import_points_down_or_sideways():
    upward = sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH.get(module, ()):
            if target not in MODULES:
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert not cycles, cycles


def test_the_check_sees_an_upward_import():
    """The walk itself works: a module of the lowest layer that imported the pipeline would be caught."""
    tree = ast.parse("from loracap.pipeline import caption_folder\nfrom . import hub\n")
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert _resolve("loracap.files", imports[0]) == "loracap.pipeline"
    assert _resolve("loracap.files", imports[1]) == "loracap"
    assert layer_of("loracap.pipeline") > layer_of("loracap.files")
