"""Shared test fixtures. The read-only `shared/` folder sits beside the repository checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """shared/fixtures: tiny-public/ (checkpoint + reference outputs) and keys/."""
    path = SHARED / "fixtures"
    assert path.is_dir(), f"{path} is missing: clone the project with shared/ beside it"
    return path
