"""The layering of docs/architecture.md, checked on the source: imports only go down.

``cli -> demo -> train/evaluate/export/serve -> model -> data -> config -> fileio/errors``.
Imports inside functions count too (the CLI imports lazily to start fast, and a lazy import
is still a dependency). ``train`` and ``evaluate`` are siblings and never import each other:
the recipe receives an evaluation function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import phi4mm_lora

SRC = Path(phi4mm_lora.__file__).parent
DOC = SRC.parents[1] / "docs" / "architecture.md"

#: Lower numbers are lower layers; a module may import its own package or a lower layer.
LAYER = {
    "errors": 0,
    "fileio": 1, "versions": 1,
    "config": 2,
    "data": 3,
    "model": 4,
    "train": 5, "evaluate": 5,
    "export": 6, "serve": 6,
    "demo": 7,
    "cli": 8, "__main__": 9,
}


def _package(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Top-level phi4mm_lora packages a module imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "phi4mm_lora"]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "phi4mm_lora" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        own = _package(rel)
        assert own in LAYER, f"{rel}: new top-level module; give it a layer here and in docs/architecture.md"
        for target in _imports(path) - {own}:
            if LAYER.get(target, 99) >= LAYER[own]:
                wrong.append(f"{rel} imports phi4mm_lora.{target}")
    assert not wrong, wrong


def test_the_architecture_page_names_every_module() -> None:
    """The page's table is where a newcomer looks first; a module missing there is undocumented."""
    text = DOC.read_text(encoding="utf-8")
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.name in ("__init__.py", "__main__.py") or rel.parts[0] == "cli":
            continue
        top = rel.parts[0]
        if top in ("export", "serve"):  # packages described as a whole
            continue
        if rel.as_posix() not in text:
            missing.append(rel.as_posix())
    assert not missing, f"docs/architecture.md does not name {missing}"
