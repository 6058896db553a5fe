"""The package is laid out by layer, and each layer imports only the layers below it.

record <- mapping <- client <- sync <- cli (README, "Architecture"): the record model knows
nothing of FHIR, the mapping nothing of HTTP, the client nothing of the sync engine, and nothing
but the command line knows the command line. ``_exceptions`` and ``_version`` sit below every
layer; ``ims_fhir/__init__.py`` (the public API) and ``__main__.py`` may import anything.

A module never imports another module's private name (``_name``): a helper two modules share
gets a real name in the module that owns it. The imports are read with ``ast``, so an import
inside a function or under ``TYPE_CHECKING`` counts too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import ims_fhir

PACKAGE = Path(ims_fhir.__file__).parent
LAYERS = ("record", "mapping", "client", "sync", "cli")
"""Bottom to top: a layer may import the ones before it, never the ones after."""
SHARED = frozenset({"_exceptions", "_version"})
"""Top-level modules below every layer (they import no layer)."""
FACADE = frozenset({"__init__", "__main__"})
"""The public API and ``python -m ims_fhir``: they may import every layer."""


@dataclass(frozen=True)
class Import:
    """One name imported from a module of ims-fhir, as ``module.name`` would reach it."""

    line: int
    module: str  # dotted, relative to ims_fhir: "mapping.to_fhir", "_exceptions", "" (the package)
    name: str | None  # None for ``import ims_fhir.x``


def module_name(path: Path) -> str:
    """``record.model`` for ``ims_fhir/record/model.py``, ``record`` for its ``__init__.py``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)  # "" for ims_fhir/__init__.py


def imports(source: str, name: str, is_package: bool) -> list[Import]:
    """The imports of ims-fhir's own modules in ``source``, the module ``name``."""
    parts = name.split(".") if name else []
    package = parts if is_package else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "ims_fhir":
                target = node.module.removeprefix("ims_fhir").removeprefix(".")
            else:
                continue
            for alias in node.names:
                found.append(Import(node.lineno, target, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ims_fhir."):
                    found.append(Import(node.lineno, alias.name.removeprefix("ims_fhir."), None))
    return found


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to: a layer, ``shared`` or ``facade``."""
    top = module.split(".")[0]  # "" for the package itself
    if top in LAYERS:
        return top
    if top in SHARED:
        return "shared"
    return "facade"


def crossings(source: str, name: str, is_package: bool = False) -> list[str]:
    """What is wrong with the imports of one module, one line per problem."""
    mine = layer_of(name)
    problems = []
    for imp in imports(source, name, is_package):
        # ``from . import codes`` names a module: judge the module, not the package.
        target = imp.module
        if imp.name and (target == "" or target in LAYERS):
            target = f"{target}.{imp.name}".lstrip(".")
        theirs = layer_of(target)
        where = f"{name}:{imp.line}"
        if mine == "shared" and theirs != "shared":
            problems.append(f"{where} imports {target}: shared modules import no layer")
        elif mine in LAYERS and theirs in LAYERS and LAYERS.index(theirs) > LAYERS.index(mine):
            problems.append(f"{where} imports {target}: the {mine} layer is below {theirs}")
        elif mine in LAYERS and theirs == "facade":
            problems.append(f"{where} imports the package itself ({target or 'ims_fhir'})")
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__"):
            problems.append(f"{where} imports {imp.name}, private to {imp.module or 'ims_fhir'}")
    return problems


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(PACKAGE))) for p in MODULES])
def test_each_module_imports_only_layers_below_it_and_no_private_names(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert crossings(source, module_name(path), path.name == "__init__.py") == []


def test_every_module_is_in_a_layer() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= SHARED | FACADE, "a new module goes into the folder of its layer"
    folders = {p.parent.relative_to(PACKAGE).parts[0] for p in MODULES if p.parent != PACKAGE}
    assert folders == set(LAYERS)


@pytest.mark.parametrize("layer", [pytest.param(layer, id=layer) for layer in LAYERS])
def test_a_layer_package_is_only_its_docstring(layer: str) -> None:
    # Importing one layer must not import the others; the public API is ims_fhir itself.
    tree = ast.parse((PACKAGE / layer / "__init__.py").read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree)
    assert docstring is not None and ":mod:`ims_fhir`" in docstring
    assert len(tree.body) == 1


@pytest.mark.parametrize(
    ("name", "source", "problem"),
    [
        pytest.param(
            "record.model",
            "from ..mapping.identity import Ext\n",
            "record.model:1 imports mapping.identity: the record layer is below mapping",
            id="upward-relative",
        ),
        pytest.param(
            "client.http",
            "def f():\n    from ims_fhir.sync import push\n",
            "client.http:2 imports sync.push: the client layer is below sync",
            id="upward-absolute-in-a-function",
        ),
        pytest.param(
            "sync.push",
            "from ..mapping.to_fhir import _bundle\n",
            "sync.push:1 imports _bundle, private to mapping.to_fhir",
            id="private-name",
        ),
        pytest.param(
            "_exceptions",
            "from .client.http import Call\n",
            "_exceptions:1 imports client.http: shared modules import no layer",
            id="shared-imports-a-layer",
        ),
        pytest.param(
            "mapping.docs",
            "from .. import terminology\n",
            "mapping.docs:1 imports the package itself (terminology)",
            id="the-public-package",
        ),
    ],
)
def test_the_check_finds(name: str, source: str, problem: str) -> None:
    assert crossings(source, name) == [problem]


def test_the_check_allows_the_layers_below_and_its_own() -> None:
    source = (
        "from .._exceptions import MappingError\n"
        "from ..record.model import Encounter\n"
        "from . import identity\n"
        "from .identity import Ext\n"
    )
    assert crossings(source, "mapping.to_fhir") == []
