"""The import structure of SCONetLib: no circle, and no module importing from a module above it in the pipeline.

Every ``import`` / ``from … import`` of every module is read from its source (also those inside functions), so a
lazy import cannot hide a circle. Imports inside an ``if __name__ == "__main__":`` block are the hand-over of a
module run with ``python -m`` to the command lines, not imports of the library, and may only target
``SCONetLib.cli``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "SCONetLib"

#: The pipeline io -> points -> model -> infer -> train/evaluate, bottom first; a module may import from its own
#: layer or a lower one. Every module of the package must be listed (a new module must be placed on purpose).
LAYERS = (
    ("base", {"SCONetLib", "SCONetLib.validate", "SCONetLib.progress", "SCONetLib.labels", "SCONetLib.geometry",
              "SCONetLib.device", "SCONetLib.metrics", "SCONetLib.parallel"}),
    ("io", {"SCONetLib.io_checks", "SCONetLib.io", "SCONetLib.figures", "SCONetLib.phantom"}),
    ("points", {"SCONetLib.points", "SCONetLib.points.canny", "SCONetLib.points.surf", "SCONetLib.points.cloud",
                "SCONetLib.points.canny_torch", "SCONetLib.points.surf3d_torch"}),
    ("model", {"SCONetLib.model", "SCONetLib.model.encoder", "SCONetLib.model.decoder", "SCONetLib.model.unet3d",
               "SCONetLib.model.sconet", "SCONetLib.checkpoint"}),
    ("infer", {"SCONetLib.infer", "SCONetLib.postprocess"}),
    ("train/evaluate", {"SCONetLib.segment", "SCONetLib.batch", "SCONetLib.demo", "SCONetLib.data", "SCONetLib.train_config",
                        "SCONetLib.train_loop", "SCONetLib.evaluate"}),
    ("entry points", {"SCONetLib.cli", "SCONetLib.train", "SCONetLib.__main__", "SCONetLib.worker"}),
)
LAYER_OF = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                   for c in test.comparators))


def _imports(source: str, name: str, is_package: bool = False) -> tuple[set, set]:
    """(modules of SCONetLib imported by the source of module ``name``, those imported in its ``__main__`` block)."""
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source)
    in_main = set()
    for node in ast.walk(tree):
        if _is_main_guard(node):
            in_main.update(id(n) for n in ast.walk(node))
    found, main_found = set(), set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from SCONetLib import io" imports the submodule SCONetLib.io
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in LAYER_OF else base for alias in node.names]
        for target in targets:
            if target.split(".")[0] != "SCONetLib":
                continue
            while target not in LAYER_OF and "." in target:     # e.g. SCONetLib.model.sconet.X → its module
                target = target.rpartition(".")[0]
            (main_found if id(node) in in_main else found).add(target)
    found.discard(name)
    return found, main_found


MODULES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {_module_name(path): _imports(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")
         for path in MODULES}


def test_every_module_has_a_layer():
    assert sorted(set(GRAPH) - set(LAYER_OF)) == []
    assert sorted(set(LAYER_OF) - set(GRAPH)) == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_higher_layer(module):
    imported, main_block = GRAPH[module]
    upward = sorted(m for m in imported if LAYER_OF[m] > LAYER_OF[module])
    assert upward == [], (f"{module} ({LAYERS[LAYER_OF[module]][0]}) imports from higher layers: "
                          + ", ".join(f"{m} ({LAYERS[LAYER_OF[m]][0]})" for m in upward))
    assert main_block <= {"SCONetLib.cli"}


def test_no_import_circle():
    edges = {module: imported for module, (imported, _) in GRAPH.items()}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        if state.get(module) == "active":
            circle = path[path.index(module):] + [module]
            raise AssertionError("import circle: " + " -> ".join(circle))
        state[module] = "active"
        for target in sorted(edges[module]):
            visit(target, path + [module])
        state[module] = "done"

    for module in sorted(edges):
        visit(module, [])


def test_the_walker_sees_lazy_and_relative_imports():
    """What the rules forbid must be seen: imports inside functions, relative ones, ``from SCONetLib import x``,
    and names imported from a module (which count as that module); the ``__main__`` block is set apart."""
    source = ("from . import io as sconet_io\nfrom .geometry import Grid\n"
              "def f():\n    from .demo import run_demo\n    import SCONetLib.model.sconet\n"
              "if __name__ == '__main__':\n    from SCONetLib.cli import segment_main\n")
    imported, main_block = _imports(source, "SCONetLib.segment")
    assert imported == {"SCONetLib.io", "SCONetLib.geometry", "SCONetLib.demo", "SCONetLib.model.sconet"}
    assert main_block == {"SCONetLib.cli"}
    assert _imports("from ..validate import check_int\n", "SCONetLib.points.cloud")[0] == {"SCONetLib.validate"}
    assert LAYER_OF["SCONetLib.demo"] == LAYER_OF["SCONetLib.segment"] < LAYER_OF["SCONetLib.cli"]
