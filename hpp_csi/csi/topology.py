"""Node-local topology: every volume is reachable from the node that made it, and only from there."""

from __future__ import annotations

from collections.abc import Iterable

from hpp_csi.spec import csi_pb2 as csi

TOPOLOGY_KEY = "topology.hostpath.csi/node"


def node_topology(node_id: str) -> csi.Topology:
    return csi.Topology(segments={TOPOLOGY_KEY: node_id})


def matches(topology: csi.Topology, node_id: str) -> bool:
    """A topology names this node when its segment for our key is the node ID; other keys are not ours."""
    value = topology.segments.get(TOPOLOGY_KEY)
    return value is None or value == node_id


def requirement_allows(requirement: csi.TopologyRequirement | None, node_id: str) -> bool:
    """Whether a CreateVolume/GetCapacity accessibility requirement admits this node."""
    if requirement is None:
        return True
    requisite: Iterable[csi.Topology] = requirement.requisite
    preferred: Iterable[csi.Topology] = requirement.preferred
    if list(requisite):
        return any(matches(t, node_id) for t in requisite)
    if list(preferred):
        return any(matches(t, node_id) for t in preferred)
    return True
