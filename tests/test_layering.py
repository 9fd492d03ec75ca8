"""The import contract (design.md): orchestrator -> workers <- serve, and serve takes only its config from the driver."""

import ast

from tests.conftest import REPO


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module each file of a package imports, at the top or inside a function."""
    found = {}
    for path in sorted((REPO / package).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[path.name] = names
    return found


def project_imports(package: str) -> dict[str, set[str]]:
    return {
        file: {m for m in names if m.split(".")[0] in {"orchestrator", "workers", "serve"}}
        for file, names in imported_modules(package).items()
    }


def test_workers_import_neither_the_driver_nor_serve():
    wrong = {
        f: m
        for f, names in project_imports("workers").items()
        if (m := {n for n in names if not n.startswith("workers")})
    }
    assert wrong == {}


def test_serve_takes_only_the_config_from_the_driver():
    allowed = ("workers", "serve", "orchestrator.config")
    wrong = {
        f: m
        for f, names in project_imports("serve").items()
        if (m := {n for n in names if not n.startswith(allowed)})
    }
    assert wrong == {}
