"""Repository-wide pytest option (loaded for tests/ and bench/ alike): ``--shard I/N``, which `make test` uses to run
the CPU suite as two processes in parallel."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--shard",
        metavar="I/N",
        help="run only every N-th collected test, from the I-th (0 <= I < N): `make test` runs the CPU suite as two "
        "shards in parallel processes",
    )


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard is None:
        return
    i, _, n = shard.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise pytest.UsageError(f"--shard takes I/N with 0 <= I < N (e.g. 0/2); got {shard!r}")
    # Dealt in the collected order, forth and back (shards 0, 1, 1, 0, 0, 1, ... for N = 2), so the parametrized
    # cases of one slow test spread over the shards even when they come in (torch, triton) pairs: a plain round
    # robin put most Triton cases of the spec-oracle tests in one shard (520 against 239 s of the slowest tests'
    # time in session 20's CI runs; dealt forth and back, 345 against 414).
    i, n = int(i), int(n)
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if _dealt_to(k, n) != i])
    items[:] = [item for k, item in enumerate(items) if _dealt_to(k, n) == i]


def _dealt_to(k: int, n: int) -> int:
    """The shard of the k-th collected test of n: 0 .. n-1, then n-1 .. 0, and again."""
    return k % n if k // n % 2 == 0 else n - 1 - k % n
