"""The layering the design card asks for: features/ and models/ never import Kafka or Faust."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"faust", "confluent_kafka", "aiokafka", "kafka", "mode", "streams", "rocksdict"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", ["features", "models"])
def test_pure_packages_do_not_import_the_streaming_stack(package):
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN)
                 for p in (ROOT / package).rglob("*.py") if imported_roots(p) & FORBIDDEN}
    assert not offenders, f"{package}/ must stay free of Kafka/Faust/streams imports: {offenders}"


def test_features_do_not_import_torch():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "features").rglob("*.py") if "torch" in imported_roots(p)]
    assert not offenders


def test_top_level_layout():
    for name in ("pyproject.toml", "streams", "models", "features", "deploy", "tests", "docker-compose.yml",
                 "README.md", "Makefile", ".ci/run"):
        assert (ROOT / name).exists(), f"{name} is part of the design card's layout"
