"""The shape of the code: the import graph of ``src/widenets``, built from the source with
``ast`` (nothing is imported), has no cycle and no import of another module's private
name; the library never imports its applications (``widenets.apps``); and ``import
widenets`` loads no application code and none of the optional heavy dependencies.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import widenets

SOURCE = Path(widenets.__file__).parent
#: Library modules that may import an application: ``widenets.experiments`` keeps the
#: public name of the lazy-training experiment (it is loaded on first use only).
APPLICATION_ALIASES = {"widenets.experiments"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py")}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for every import statement of module ``name``
    (function-level ones included) that refers to a widenets module; ``from package import
    submodule`` counts as an import of the submodule."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names
                      if alias.name.split(".")[0] == "widenets"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "widenets":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES
                             else (target, alias.name))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in imports_of(name) if target in MODULES}
            for name in MODULES}


def test_every_import_resolves_to_a_module():
    for name in MODULES:
        for target, _ in imports_of(name):
            assert target in MODULES, f"{name} imports {target}, which is not a module"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_no_import_of_another_modules_private_name():
    private = [(name, target, imported) for name in MODULES
               for target, imported in imports_of(name)
               if imported is not None and imported.startswith("_")
               and not (imported.startswith("__") and imported.endswith("__"))]
    assert not private, f"imports of private names: {private}"
    private_modules = [(name, target) for name in MODULES for target, _ in imports_of(name)
                       if any(part.startswith("_") and part != "__init__"
                              for part in target.split("."))]
    assert not private_modules, f"imports of private modules: {private_modules}"


def test_the_library_never_imports_its_applications():
    for name in MODULES:
        if name.startswith("widenets.apps") or name in APPLICATION_ALIASES:
            continue
        for target, _ in imports_of(name):
            assert not target.startswith("widenets.apps"), f"{name} imports {target}"


def test_import_widenets_loads_no_application_and_no_heavy_dependency():
    script = (
        "import json, sys; import widenets; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('matplotlib', 'sklearn', 'zarr', 'dask', 'distributed', 'gpytorch') "
        "or m.startswith('widenets.apps') or m == 'widenets.experiments')))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []
