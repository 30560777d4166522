"""The shape of the code: small files, and no import cycles between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedlora", "client", "server", "strategies", "privacy", "simulations")
MAX_LINES = 400


def sources() -> list[Path]:
    return sorted(p for package in (*PACKAGES, "benchmarks") for p in (REPO / package).glob("*.py"))


def module_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports when it is loaded (``TYPE_CHECKING`` blocks and
    imports inside functions, which run later, left out)."""
    imported = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    return imported


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_import_cycles():
    graph = {".".join(p.relative_to(REPO).with_suffix("").parts): module_imports(p) for p in sources()}
    cycles = []

    def visit(module: str, path: list[str], done: set[str]) -> None:
        for imported in graph.get(module, ()):
            if imported in path:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                done.add(imported)
                visit(imported, path + [imported], done)

    for module in graph:
        visit(module, [module], {module})
    assert not cycles, cycles[:3]
    assert len(graph) > 40 and graph["client.site"], "the graph was read"


def all_imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at load time or later (inside functions)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    return imported


def test_only_the_cli_reaches_the_simulation_package():
    """A partner site's process, the server and the libraries never depend on ``simulations``:
    a simulated site reads its own file exactly as a deployed one does."""
    deployed = [p for package in ("client", "server", "strategies", "privacy", "fedlora") for p in (REPO / package).glob("*.py")]
    offenders = {str(p.relative_to(REPO)) for p in deployed if p.name != "cli.py"
                 and any(m.split(".")[0] == "simulations" for m in all_imports(p))}
    assert not offenders, offenders
    assert any(m.startswith("simulations") for m in all_imports(REPO / "fedlora" / "cli.py")), "the scan sees imports"


def test_no_private_flower_entry_point_is_used():
    """Public Flower APIs only: no ``flwr`` module or name that starts with an underscore, and
    no Flower module looked up by name (which would hide one)."""
    private = []
    for path in sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flwr"):
                names = [node.module, *(alias.name for alias in node.names)]
                private += [f"{path.name}: {n}" for n in names if any(part.startswith("_") for part in n.split("."))]
            elif isinstance(node, ast.Import):
                private += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("flwr")
                            and (a.asname or any(part.startswith("_") for part in a.name.split(".")))]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("flwr."):
                private.append(f"{path.name}: {node.value}")  # a Flower module looked up by name
    assert not private, private
