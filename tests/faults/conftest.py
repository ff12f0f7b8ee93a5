"""Shared fixtures of the fault suite (issue 6): one real stack per test module.

Fixtures (names are stable; other fault modules may use them):

- ``fault_stack``      module-scoped :class:`app.stack.Stack` (nginx + 2 gunicorn workers
                       over a snapshot of the real models), started with the helpers of
                       ``tests/integration/conftest.py``; its run dir is kept if a test failed.
- ``fault_client``     module-scoped ``httpx.Client`` on the stack's nginx URL.
- ``fault_candidates`` module-scoped :class:`tests.integration.conftest.Candidates` for the
                       stack's card layout (valid ids in any of the three forms).
- ``worker_pids``      a callable: the sorted pids of the stack's gunicorn workers (children
                       of the master). Take it before and after: equal lists = no restart.

A module that kills or degrades workers should start its own stack (per test), as
``test_lifecycle.py`` does; ``fault_stack`` is for modules that leave the workers alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from app.sessions import read_card
from app.stack import Stack
from tests.integration.conftest import TIMEOUT, Candidates, start_stack


def worker_pids_of(stack: Stack) -> list[int]:
    """Sorted pids of the live gunicorn workers (``/proc/<master>/task/<master>/children``)."""
    return sorted(stack.worker_pids())


@pytest.fixture(scope="module")
def fault_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    yield from start_stack(request, prefix="farm-x-")


@pytest.fixture(scope="module")
def fault_client(fault_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fault_stack.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def fault_candidates(fault_stack: Stack) -> Candidates:
    config = fault_stack.config
    return Candidates(read_card(config.model_dirs()[config.predict_model]).fields)


@pytest.fixture(scope="module")
def worker_pids(fault_stack: Stack) -> Callable[[], list[int]]:
    return lambda: worker_pids_of(fault_stack)
