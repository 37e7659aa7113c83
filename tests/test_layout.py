"""The package's layout is its architecture: the groups of `cart/` are layers, and no module imports from a
group above its own (a helper two groups need lives in the lower one, or at the top level's shared modules)."""

import ast

import pytest

from conftest import ROOT

# lowest first; the shared top-level modules are below every group, the entry points above them all
LAYERS = [
    {"cart", "cart.errors", "cart.settings", "cart.config", "cart.files", "cart.devices"},
    {"cart.data"},
    {"cart.encoders"},
    {"cart.index"},
    {"cart.model"},
    {"cart.retrieve"},
    {"cart.eval"},
    {"cart.generate"},
    {"cart.train", "cart.caption", "cart.pipeline", "cart.cli", "cart.__main__"},
]
MODULES = sorted((ROOT / "cart").rglob("*.py"))


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    """The layer of a module: its own top-level name if that is listed, else its group's (cart.model.x -> 4)."""
    for candidate in (name, ".".join(name.split(".")[:2])):
        for rank, members in enumerate(LAYERS):
            if candidate in members:
                return rank
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py: place it")


def cart_imports(source: str) -> list[str]:
    """Every cart module a source imports, at its top or inside a function (`from cart import x` -> cart.x)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "cart"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cart":
            folder = ROOT / node.module.replace(".", "/")
            names += [f"{node.module}.{a.name}" if (folder / f"{a.name}.py").exists() or (folder / a.name).is_dir()
                      else node.module for a in node.names]
    return names


def packages():
    return [p.parent for p in MODULES if p.name == "__init__.py"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_from_a_layer_above_its_own(path):
    importer = module_name(path)
    above = [name for name in cart_imports(path.read_text(encoding="utf-8")) if layer(name) > layer(importer)]
    assert not above, f"{importer} (layer {layer(importer)}) imports {above} from above it"


def test_the_layer_check_sees_an_import_from_above():
    """The check itself: the data group importing the model group, in a function or at the top, is caught."""
    source = "from cart.model import batches\ndef f():\n    from cart.retrieve.rerank import GRID\n"
    assert cart_imports(source) == ["cart.model.batches", "cart.retrieve.rerank"]
    assert [layer(n) for n in cart_imports(source)] == [4, 5] and layer("cart.data.pairs") == 1


@pytest.mark.parametrize("folder", packages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_package_says_what_it_is(folder):
    docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
    assert docstring and len(docstring) > 40, f"{folder}/__init__.py: say in two lines what the folder is"
