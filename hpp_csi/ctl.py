"""`hpp-csi ctl`: a small CSI client for people on a node, talking to the driver's socket."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from hpp_csi.quantity import human, parse_bytes
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc

DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
AccessMode = csi.VolumeCapability.AccessMode


class Client:
    """Stubs of the three CSI services over one channel."""

    def __init__(self, endpoint: str, timeout: float = 30.0) -> None:
        target = endpoint if endpoint.startswith("unix:") else f"unix://{endpoint}"
        self.channel = grpc.insecure_channel(target)
        self.identity = csi_grpc.IdentityStub(self.channel)
        self.controller = csi_grpc.ControllerStub(self.channel)
        self.node = csi_grpc.NodeStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()


def mount_capability(
    mode: csi.VolumeCapability.AccessMode.Mode = AccessMode.SINGLE_NODE_WRITER, flags: list[str] | None = None
) -> csi.VolumeCapability:
    return csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(mount_flags=flags or []),
        access_mode=AccessMode(mode=mode),
    )


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def cmd_info(c: Client, opts: argparse.Namespace) -> Any:
    t = c.timeout
    return {
        "plugin": as_dict(c.identity.GetPluginInfo(csi.GetPluginInfoRequest(), timeout=t)),
        "ready": c.identity.Probe(csi.ProbeRequest(), timeout=t).ready.value,
        "node": as_dict(c.node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=t)),
        "controller_capabilities": [
            csi.ControllerServiceCapability.RPC.Type.Name(cap.rpc.type)
            for cap in c.controller.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest(), timeout=t)
            .capabilities
        ],
    }


def cmd_list(c: Client, opts: argparse.Namespace) -> Any:
    rows, token = [], ""
    while True:
        request = csi.ListVolumesRequest(max_entries=500, starting_token=token)
        page = c.controller.ListVolumes(request, timeout=c.timeout)
        for entry in page.entries:
            rows.append({
                "volume_id": entry.volume.volume_id,
                "capacity": entry.volume.capacity_bytes,
                "pool": entry.volume.volume_context.get("storagePool", ""),
                "published": list(entry.status.published_node_ids),
                "abnormal": entry.status.volume_condition.abnormal,
                "condition": entry.status.volume_condition.message,
            })
        token = page.next_token
        if not token:
            return rows


def cmd_capacity(c: Client, opts: argparse.Namespace) -> Any:
    params = {"storagePool": opts.pool} if opts.pool else {}
    reply = c.controller.GetCapacity(csi.GetCapacityRequest(parameters=params), timeout=c.timeout)
    return {"pool": opts.pool or "(default)", "available_bytes": reply.available_capacity,
            "maximum_volume_size": reply.maximum_volume_size.value}


def cmd_create(c: Client, opts: argparse.Namespace) -> Any:
    size = parse_bytes(opts.size) if opts.size else 0
    request = csi.CreateVolumeRequest(
        name=opts.name,
        capacity_range=csi.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_capability()],
        parameters={"storagePool": opts.pool} if opts.pool else {},
    )
    return as_dict(c.controller.CreateVolume(request, timeout=c.timeout).volume)


def cmd_delete(c: Client, opts: argparse.Namespace) -> Any:
    c.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=opts.name), timeout=c.timeout)
    return {"deleted": opts.name}


def cmd_publish(c: Client, opts: argparse.Namespace) -> Any:
    request = csi.NodePublishVolumeRequest(
        volume_id=opts.name, target_path=opts.target, readonly=opts.readonly,
        volume_capability=mount_capability(flags=opts.flag),
    )
    c.node.NodePublishVolume(request, timeout=c.timeout)
    return {"published": opts.name, "target": opts.target, "readonly": opts.readonly}


def cmd_unpublish(c: Client, opts: argparse.Namespace) -> Any:
    c.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=opts.name, target_path=opts.target),
                               timeout=c.timeout)
    return {"unpublished": opts.name, "target": opts.target}


def cmd_stats(c: Client, opts: argparse.Namespace) -> Any:
    reply = c.node.NodeGetVolumeStats(
        csi.NodeGetVolumeStatsRequest(volume_id=opts.name, volume_path=opts.path), timeout=c.timeout
    )
    usage = {csi.VolumeUsage.Unit.Name(u.unit).lower(): {"total": u.total, "used": u.used, "available": u.available}
             for u in reply.usage}
    return {"volume_id": opts.name, **usage, "abnormal": reply.volume_condition.abnormal,
            "condition": reply.volume_condition.message}


def render(result: Any) -> str:
    """Human text: a table for lists of rows, key: value lines otherwise; sizes in binary units."""
    if isinstance(result, list):
        if not result:
            return "(no volumes)"
        lines = [f"{'VOLUME':<40} {'POOL':<16} {'CAPACITY':>12}  PUBLISHED  CONDITION"]
        for row in result:
            lines.append(f"{row['volume_id']:<40} {row['pool']:<16} {human(row['capacity']):>12}  "
                         f"{'yes' if row['published'] else 'no':<9}  "
                         f"{'ABNORMAL: ' if row['abnormal'] else ''}{row['condition']}")
        return "\n".join(lines)
    out = []
    for key, value in result.items():
        if isinstance(value, dict) and {"total", "used", "available"} <= value.keys() and key == "bytes":
            value = {k: human(int(v)) for k, v in value.items()}
        out.append(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return "\n".join(out)


COMMANDS: dict[str, tuple[Callable[[Client, argparse.Namespace], Any], str]] = {
    "info": (cmd_info, "plugin info, readiness, node topology, capabilities"),
    "list": (cmd_list, "list volumes with their condition"),
    "capacity": (cmd_capacity, "available capacity of a pool"),
    "create": (cmd_create, "create a volume"),
    "delete": (cmd_delete, "delete a volume"),
    "publish": (cmd_publish, "bind-mount a volume on a target path"),
    "unpublish": (cmd_unpublish, "unmount a volume from a target path"),
    "stats": (cmd_stats, "usage and condition of a published volume"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ctl = sub.add_parser("ctl", help="talk to a running driver")
    ctl.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    ctl.add_argument("--json", action="store_true", help="print JSON")
    ctl.add_argument("--timeout", type=float, default=30.0)
    cmds = ctl.add_subparsers(dest="ctl_command", required=True)
    for name, (_func, help_text) in COMMANDS.items():
        p = cmds.add_parser(name, help=help_text)
        if name in ("create", "delete", "publish", "unpublish", "stats"):
            p.add_argument("name", help="volume name / ID")
        if name in ("publish", "unpublish"):
            p.add_argument("target", help="absolute target path")
        if name == "publish":
            p.add_argument("--readonly", action="store_true")
            p.add_argument("--flag", action="append", default=[], help="mount option (repeatable)")
        if name == "stats":
            p.add_argument("path", help="the path the volume is published at")
        if name in ("create", "capacity"):
            p.add_argument("--pool", help="storage pool name")
        if name == "create":
            p.add_argument("--size", help="capacity, e.g. 1Gi")
    ctl.set_defaults(func=run)


def run(opts: argparse.Namespace) -> int:
    func = COMMANDS[opts.ctl_command][0]
    client = Client(opts.endpoint, opts.timeout)
    try:
        result = func(client, opts)
    except grpc.RpcError as exc:
        print(f"hpp-csi ctl {opts.ctl_command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(result, indent=2) if opts.json else render(result))
    return 0
