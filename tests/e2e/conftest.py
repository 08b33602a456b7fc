"""The real node (testing/node.py), started once per session for the end-to-end tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testing.node import NodeCluster


# Module scope: only the end-to-end tier uses it, and a node left running (kubelet, etcd, CoreDNS,
# metrics-server) would slow every test after it on two cores.
@pytest.fixture(scope="module")
def node_cluster() -> Iterator[NodeCluster]:
    cluster = NodeCluster.start()
    print(f"\nnode cluster up in {cluster.startup_seconds:.1f}s")
    try:
        yield cluster
    finally:
        cluster.stop()
