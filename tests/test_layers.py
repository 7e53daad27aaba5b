"""The layers of docs/architecture.md, checked on the code's own imports (every import statement, including
the ones inside functions): the library never reaches up into the services or the applications, and the
services never into the applications."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "shared" / "tessera"
SERVICES = ROOT / "services"


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against ``package``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def modules_under(folder: Path, package: str) -> list[tuple[Path, str]]:
    out = []
    for path in sorted(folder.rglob("*.py")):
        relative = path.relative_to(folder).with_suffix("")
        parts = [p for p in relative.parts if p != "__init__"]
        dotted = ".".join([package, *parts])
        owner = dotted if path.name == "__init__.py" else dotted.rpartition(".")[0]
        out.append((path, owner))
    return out


def offending(folder: Path, package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path, owner in modules_under(folder, package):
        for name in sorted(imported_modules(path, owner)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_no_library_module_imports_a_service_or_an_application() -> None:
    assert offending(LIBRARY, "tessera", ("tessera.curator", "tessera.participant", "tessera.apps")) == []


def test_services_do_not_import_the_applications_or_each_other() -> None:
    assert offending(SERVICES / "curator", "tessera.curator", ("tessera.apps", "tessera.participant")) == []
    assert (
        offending(SERVICES / "participant", "tessera.participant", ("tessera.apps", "tessera.curator")) == []
    )


def test_the_protocol_core_needs_no_torch_and_only_the_transport_imports_pika() -> None:
    assert offending(LIBRARY / "secagg", "tessera.secagg", ("torch", "opacus", "pika")) == []
    outside_transport = [
        line
        for line in offending(LIBRARY, "tessera", ("pika",))
        if not line.startswith("shared/tessera/transport/")
    ]
    assert outside_transport == []
    # The numpy-only core: the curator's arithmetic and the crypto load no torch.
    core = [LIBRARY / m for m in ("evaluation.py", "fedavg.py", "quantize.py", "crypto.py")]
    for path in core:
        names = imported_modules(path, "tessera")
        assert not {n for n in names if n.split(".")[0] in ("torch", "opacus")}, path


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tessera.participant.training import x\n    from . import sibling\n")
    names = imported_modules(module, "tessera.pkg")
    assert "tessera.participant.training" in names and "tessera.pkg.sibling" in names


@pytest.mark.parametrize("folder", [LIBRARY, SERVICES])
def test_every_module_parses(folder: Path) -> None:
    assert modules_under(folder, "x")
