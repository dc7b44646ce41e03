from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mossnode.cluster import Cluster


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator:
    """Start clusters of real daemons; every one is stopped (and its logs shown) at teardown."""
    made: list[Cluster] = []

    def make(n: int, **config) -> Cluster:
        c = Cluster(n, root=tmp_path / f"cluster{len(made)}", config=config)
        made.append(c)
        return c

    yield make
    for c in made:
        for node in c.nodes:
            if node.running:
                print(f"--- {node.name} log tail ---\n{node.tail(15)}")
        c.stop()


@pytest.fixture
def solo(cluster_factory):
    """One real daemon that founded its own swarm (roles admin and validator), running."""
    c: Cluster = cluster_factory(1)
    c.init()
    n = c.nodes[0]
    n.start()
    return n
