"""Fixtures shared by the static deployment tests (compose and Kubernetes)."""

from __future__ import annotations

import pytest

from tests.unit.deploy.test_compose import COMPOSE_FILE, load_yaml


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yml, parsed."""
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]
