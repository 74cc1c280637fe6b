"""Shared fixtures: the shipped data, a deterministic seed, and the CLI runner."""

from pathlib import Path

import numpy as np
import pytest

from kanmoe.paths import CALIFORNIA_HOUSING_CSV, PROJECT_ROOT


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def california_csv() -> Path:
    assert CALIFORNIA_HOUSING_CSV.exists(), f"shipped data missing: {CALIFORNIA_HOUSING_CSV}"
    return CALIFORNIA_HOUSING_CSV


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def default_server():
    """One real ``kanmoe serve`` on the shipped repository for read-only tests."""
    from tests.serving import start_server

    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def server_factory():
    """Start private servers (own repository copy, own settings); stopped after the test."""
    from tests.serving import start_server

    started = []

    def start(*args, **kwargs):
        server = start_server(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
