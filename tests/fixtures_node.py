"""The real node (testing/node.py), started once per session for the end-to-end tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testing.node import NodeCluster


@pytest.fixture(scope="session")
def node_cluster() -> Iterator[NodeCluster]:
    cluster = NodeCluster.start()
    print(f"\nnode cluster up in {cluster.startup_seconds:.1f}s")
    try:
        yield cluster
    finally:
        cluster.stop()
