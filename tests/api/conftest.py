"""A whole gateway's database on either backend, for the API tests that run one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import fresh_database

BACKENDS = ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres])]


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLite file of the test's own, or a PostgreSQL database made for the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/sb.db"
        return
    request.getfixturevalue("postgres_url")  # fails the run at once when PostgreSQL is down
    with fresh_database(str(request.getfixturevalue("postgres_admin_url")), "api") as url:
        yield url
