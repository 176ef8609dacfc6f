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
    # Round robin over the collected order, so the parametrized cases of one slow test land in different shards.
    i, n = int(i), int(n)
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % n != i])
    items[:] = items[i::n]
