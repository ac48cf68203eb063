"""Clone test parts: two "nodes" on this machine, each a real `hpp-csi serve` with its own pools and a real
`hpp-importer serve` daemon on its own port of 127.0.0.1, and sparse volumes with known contents."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cramjam
from drivertools import Driver, make_root, unique
from nodekit import Daemon, Node
from uploadkit import HPP_IMPORTER

MiB = 1024 * 1024
# Where the test disk holds data (offset, length): a random run, a text run, a lone 4 KiB page; the rest is holes.
LAYOUT = ((0, MiB + 4096), (5 * MiB + 12345, 300_000), (9 * MiB, 4096))


@dataclass
class Nodes:
    source: Node
    target: Node


def start_node(prefix: str) -> Node:
    root = make_root(prefix)
    driver = Driver(root)
    driver.start()
    key_file = root / "keys" / "upload-signing.key"
    try:
        daemon = Daemon(driver, key_file, "--stall-timeout", "5", "--resume-hold", "30", "-v")
    except BaseException:
        driver.shutdown()
        raise
    return Node(driver, daemon, key_file)


def two_nodes() -> Iterator[Nodes]:
    nodes: list[Node] = []
    try:
        nodes.append(start_node("hppclone-a-"))
        nodes.append(start_node("hppclone-b-"))
        yield Nodes(nodes[0], nodes[1])
    finally:
        for node in nodes:
            node.daemon.close()
            node.driver.shutdown()


def write_disk(path: Path, size: int, seed: int = 1) -> None:
    """A sparse disk of `size` bytes with LAYOUT's data (random and text), written into an existing or new file."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        for offset, length in LAYOUT:
            if offset + length <= size:
                data = rng.randbytes(length) if offset == 0 else (b"hpp-clone %d " % offset * length)[:length]
                os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def source_volume(driver: Driver, block: bool, size: int = 16 * MiB) -> tuple[str, Path]:
    """A volume holding the test disk: a block volume's image, or disk.img (and a side file) in a file volume."""
    volume_id = driver.create(unique("src"), size, block=block).volume_id
    path = driver.volume_path(volume_id)
    if block:
        write_disk(path, size)
        return volume_id, path
    disk = path / "disk.img"
    write_disk(disk, 15 * MiB)
    notes = path / "notes.txt"
    notes.write_text("kept beside the disk\n")
    os.chown(notes, 1234, 2345)
    os.chmod(notes, 0o640)
    return volume_id, disk


def clone(source: Node, volume_id: str, target: Node, token: str, *args: str, url_port: int | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    pools = ["--datadir", json.dumps(source.driver.datadir())]
    port = url_port or target.daemon.port
    return subprocess.run([HPP_IMPORTER, "clone-source", "--volume", volume_id, *pools, "--url",
                           f"https://127.0.0.1:{port}", "--token", token, "--ca", str(target.daemon.cert),
                           "--no-progress", *args], capture_output=True, text=True, timeout=timeout, check=False)


def snappy_frames(data: bytes) -> bytes:
    """CDI's cloner wraps its stream so (golang/snappy's buffered writer: the framing format)."""
    return bytes(cramjam.snappy.compress(data))


# -- two network namespaces joined by a veth pair: a real link between the nodes, that a test can cut ----------

@dataclass
class Link:
    source_ns: str
    target_ns: str
    source_dev: str
    target_dev: str
    source_ip: str = "10.213.0.1"
    target_ip: str = "10.213.0.2"

    def set(self, up: bool) -> None:
        """Cut the link (down) or mend it (up): no reset reaches either side, packets just stop."""
        for ns, dev in ((self.source_ns, self.source_dev), (self.target_ns, self.target_dev)):
            _ip("-n", ns, "link", "set", dev, "up" if up else "down")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def make_link() -> Link:
    tag = os.urandom(3).hex()
    link = Link(f"hppa-{tag}", f"hppb-{tag}", f"va{tag}", f"vb{tag}")
    _ip("netns", "add", link.source_ns)
    try:
        _ip("netns", "add", link.target_ns)
        _ip("link", "add", link.source_dev, "netns", link.source_ns, "type", "veth", "peer", "name", link.target_dev,
            "netns", link.target_ns)
        for ns, dev, address in ((link.source_ns, link.source_dev, link.source_ip),
                                 (link.target_ns, link.target_dev, link.target_ip)):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except BaseException:
        remove_link(link)
        raise
    return link


def remove_link(link: Link) -> None:
    """Deleting the namespaces deletes the veth pair with them."""
    for ns in (link.source_ns, link.target_ns):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


class NetnsDaemon(Daemon):
    """`hpp-importer serve` inside a network namespace, listening on its veth address (log and close inherited)."""

    def __init__(self, driver: Driver, key_file: Path, ns: str, address: str) -> None:
        self.log_path = key_file.parent.parent / "netns-daemon.log"
        self._log = self.log_path.open("w+")
        cmd = ["ip", "netns", "exec", ns, HPP_IMPORTER, "serve", "--datadir", json.dumps(driver.datadir()),
               "--listen", f"{address}:0", "--key-file", str(key_file), "--stall-timeout", "3", "-v"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log)
        pattern = re.compile(r"listening on [0-9.]+:(\d+); TLS certificate (\S+)")
        end = time.monotonic() + 15
        while not (found := pattern.search(self.log())):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise AssertionError(f"upload daemon did not start in {ns}: {self.log()}")
            time.sleep(0.05)
        self.port, self.cert = int(found.group(1)), Path(found.group(2))
