"""A clone between two "nodes" in their own network namespaces, joined by a veth pair: the target's daemon listens
on its veth address only, the source runs in the other namespace, and the link itself is cut mid-clone."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clonekit import Link, MiB, NetnsDaemon, allocated, make_link, remove_link, source_volume, write_disk
from drivertools import Driver, make_root
from impkit import compare
from uploadkit import HPP_IMPORTER

if os.geteuid() != 0:
    pytest.fail("the netns clone tests need root (network namespaces, the driver's pools)", pytrace=False)


@dataclass
class LinkedNodes:
    link: Link
    source: Driver
    target: Driver
    daemon: NetnsDaemon
    key_file: Path

    def token(self, volume_id: str) -> str:
        done = subprocess.run([HPP_IMPORTER, "upload-token", volume_id, "--key-file", str(self.key_file)],
                              capture_output=True, text=True, check=True, timeout=30)
        return done.stdout.strip()

    def clone(self, volume_id: str, target_id: str, *args: str, timeout: float = 60) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.link.source_ns, HPP_IMPORTER, "clone-source", "--volume", volume_id,
             "--datadir", json.dumps(self.source.datadir()), "--url", f"https://{self.link.target_ip}:{self.daemon.port}",
             "--token", self.token(target_id), "--ca", str(self.daemon.cert), "--no-progress", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def linked() -> Iterator[LinkedNodes]:
    link = make_link()
    started: list[Driver] = []
    daemon = None
    try:
        source = Driver(make_root("hppns-a-"))
        started.append(source.start())
        target = Driver(make_root("hppns-b-"))
        started.append(target.start())
        key_file = target.root / "keys" / "upload-signing.key"
        daemon = NetnsDaemon(target, key_file, link.target_ns, link.target_ip)
        yield LinkedNodes(link, source, target, daemon, key_file)
    finally:
        if daemon is not None:
            daemon.close()
        for driver in started:
            driver.shutdown()
        remove_link(link)


def test_clone_across_the_link(linked: LinkedNodes) -> None:
    volume_id, disk = source_volume(linked.source, block=False)
    target_id = linked.target.create(f"dst-{os.urandom(4).hex()}", 16 * MiB, block=True).volume_id
    image = linked.target.volume_path(target_id)
    proc = linked.clone(volume_id, target_id, "--compress")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert compare(disk, image).returncode == 0
    assert allocated(image) <= allocated(disk) + 64 * 1024


def test_link_cut_mid_clone_resumes(linked: LinkedNodes) -> None:
    volume_id, disk = source_volume(linked.source, block=True, size=64 * MiB)
    write_disk(disk, 64 * MiB, seed=11)
    with disk.open("r+b") as f:
        f.seek(16 * MiB)
        f.write(os.urandom(40 * MiB))
    target_id = linked.target.create(f"dst-{os.urandom(4).hex()}", 64 * MiB, block=True).volume_id
    image = linked.target.volume_path(target_id)
    # 16 MB/s on the source's side of the link, so the cut falls in the middle of the stream.
    subprocess.run(["tc", "-n", linked.link.source_ns, "qdisc", "add", "dev", linked.link.source_dev, "root", "tbf",
                    "rate", "128mbit", "burst", "256kb", "latency", "50ms"], check=True)
    try:
        proc = linked.clone(volume_id, target_id, "--stall-timeout", "2s")
        end = time.monotonic() + 20
        while allocated(image) < 8 * MiB:  # well into the stream (the image holds nothing before)
            assert time.monotonic() < end and proc.poll() is None, linked.daemon.log()
            time.sleep(0.05)
        linked.link.set(up=False)
        threading.Timer(2.5, linked.link.set, kwargs={"up": True}).start()
        out, err = proc.communicate(timeout=90)
    finally:
        linked.link.set(up=True)
        subprocess.run(["tc", "-n", linked.link.source_ns, "qdisc", "del", "dev", linked.link.source_dev, "root"],
                       check=False, capture_output=True)
    assert proc.returncode == 0, err + linked.daemon.log()
    assert "resuming" in err and "resumed" in out, err + out
    resumed_at = int(linked.daemon.log().split("resumed at byte ")[1].split()[0])
    assert 4 * MiB <= resumed_at < 64 * MiB  # it went on from where the link broke, not from byte 0
    assert compare(disk, image).returncode == 0
