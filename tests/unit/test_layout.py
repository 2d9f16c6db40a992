"""The layering the design card asks for: features/ and models/ never import Kafka or Faust; the only
part of streams/ that models/ may import is the pure simulator (streams.sim); the worker loads only
the worker runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"faust", "confluent_kafka", "aiokafka", "kafka", "mode", "streams", "rocksdict"}


#: What a pure package may import from streams/ (the simulator, which imports nothing of Kafka).
PURE_STREAMS = {"features": (), "models": ("streams.sim",)}


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def imported_roots(path: Path) -> set[str]:
    return {module.split(".")[0] for module in imported_modules(path)}


def streaming_imports(path: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    """The modules ``path`` imports from Kafka, Faust or streams/, less those under ``allowed``."""
    return sorted(
        m
        for m in imported_modules(path)
        if m.split(".")[0] in FORBIDDEN and not any(m == a or m.startswith(a + ".") for a in allowed)
    )


@pytest.mark.parametrize("package", ["features", "models"])
def test_pure_packages_do_not_import_the_streaming_stack(package):
    offenders = {
        str(p.relative_to(ROOT)): streaming_imports(p, PURE_STREAMS[package])
        for p in (ROOT / package).rglob("*.py")
        if streaming_imports(p, PURE_STREAMS[package])
    }
    assert not offenders, f"{package}/ must stay free of Kafka/Faust/streams imports: {offenders}"


def test_features_do_not_import_torch():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "features").rglob("*.py") if "torch" in imported_roots(p)]
    assert not offenders


def test_top_level_layout():
    for name in (
        "pyproject.toml",
        "streams",
        "models",
        "features",
        "deploy",
        "tests",
        "docker-compose.yml",
        "README.md",
        "Makefile",
        ".ci/run",
    ):
        assert (ROOT / name).exists(), f"{name} is part of the design card's layout"


def test_the_worker_loads_neither_the_simulator_nor_the_other_tools():
    """``shoppulse worker`` imports the worker runtime only (a fresh interpreter, as the command starts)."""
    probe = (
        "import sys; from streams.tools import cli; cli.parse_args(['worker']); import streams.worker.app; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('streams'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "streams.worker.app" in loaded
    strays = [
        m
        for m in loaded
        if m.startswith(("streams.sim", "streams.tools.")) and m not in ("streams.tools.cli", "streams.tools.worker")
    ]
    assert not strays, f"the worker loads {strays}"


def test_the_simulator_is_pure():
    """models/ training imports the simulator, so it must not bring the streaming stack with it."""
    offenders = {
        str(p.relative_to(ROOT)): streaming_imports(p, ("streams.sim",))
        for p in (ROOT / "streams" / "sim").rglob("*.py")
        if streaming_imports(p, ("streams.sim",))
    }
    assert not offenders
