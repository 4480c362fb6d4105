"""Fixtures shared by several test folders, and the test processes' OpenMP wait policy."""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle pool threads sleep instead of spinning. On a busy machine (CI's two cores, a
# neighbour's job) spinning threads take the cores the working ones need and count as CPU time: the models'
# tests ran 44 s beside two busy loops and 18 s with this (16 s and 10 s without the loops). Servers and
# workers the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Iterator

import pytest
import torch

from server.harness import ServerProcess, wait_idle


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread while a module's tests run, as the CLI does on a CPU and as every ring worker
    does. Tiny models run as fast on one; torch's spinning threads stall badly when another process (or the
    video encoder) takes one of their cores; and bit-exact comparisons with ring workers need the same count.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`, a folder through an
    autouse fixture in its conftest.py."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def server(demo_server: ServerProcess) -> Iterator[ServerProcess]:
    """The folder's shared demo server (its conftest.py says how it is started), with no stream running
    before or after a test: tests leave no session behind."""
    wait_idle(demo_server)
    yield demo_server
    wait_idle(demo_server)
