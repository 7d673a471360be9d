"""A two-node local Ray cluster for the Ray tests (imported only by them, after their skip when
ray is missing)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import ray
from ray.cluster_utils import Cluster


@contextlib.contextmanager
def two_nodes() -> Iterator[str]:
    """A head and a worker node of 1 CPU each, this process connected; yields its address."""
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes(timeout=60)
    ray.init(address=nodes.address, log_to_driver=False, logging_level="ERROR")
    try:
        yield nodes.address
    finally:
        ray.shutdown()
        nodes.shutdown()  # type: ignore[no-untyped-call]
