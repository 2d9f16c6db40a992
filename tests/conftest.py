"""Shared fixtures: paths to the shared real datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (real datasets; never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is missing: the real-data tests read ../shared/data next to the repository")
    return SHARED_DATA
