"""Running our images with the Docker CLI: names, the flags a node plugin needs on this VM, containers that are
always removed, and the driver in a container behind tests/drivertools.py's Driver (so CSI tests run unchanged)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from drivertools import Driver, is_mounted, mount, remove_root

TAG = os.environ.get("HPP_IMAGE_TAG", "dev")
CDI_UID = 107  # CDI's transfer pods run as qemu's UID, with fsGroup 107 on their volumes
DOCKER_TIMEOUT = 60.0  # any one docker CLI call; a build is not made here

# What a privileged pod gets, without --privileged (this VM lacks CAP_SYS_RESOURCE, which --privileged asks for):
# every other capability, no seccomp or AppArmor filter, writable /proc and /sys, every device, the host's /dev.
NODE_PLUGIN_FLAGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined", "--device-cgroup-rule", "a *:* rwm", "-v", "/dev:/dev",
]


def image(target: str) -> str:
    """The name `make image` tags a Dockerfile target with."""
    return f"hpp-csi/{target}:{TAG}"


def docker(*args: str, timeout: float = DOCKER_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One docker CLI call; a failure raises with docker's own words."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}")
    return done


def require_image(target: str) -> str:
    """The image, or a failure that says how to make it (these tests are only run by `make image-test`)."""
    name = image(target)
    if docker("image", "inspect", name, check=False).returncode != 0:
        raise AssertionError(f"image {name} is missing or no Docker daemon answers: run `make image-test`")
    return name


def container_name(role: str) -> str:
    return f"hpp-csi-test-{role}-{uuid.uuid4().hex[:8]}"


def remove(name: str) -> None:
    docker("rm", "-f", name, check=False)


@contextlib.contextmanager
def started(name: str, run_args: list[str]) -> Iterator[str]:
    """`docker run -d --name NAME ...`; the container is removed afterwards whatever happened."""
    try:
        docker("run", "-d", "--name", name, *run_args)
        yield name
    finally:
        remove(name)


def wait_exit(name: str, timeout: float) -> int:
    """The container's exit status; fails with its log when it runs longer than `timeout`."""
    try:
        done = docker("wait", name, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"container {name} still running after {timeout}s:\n{logs(name)}") from None
    return int(done.stdout.strip())


def logs(name: str) -> str:
    done = docker("logs", name, check=False)
    return done.stdout + done.stderr


def pid_of(name: str) -> int:
    """The container's first process as the host sees it (to enter its network namespace)."""
    return int(docker("inspect", "-f", "{{.State.Pid}}", name).stdout.strip())


def share(root: Path) -> None:
    """Make `root` a shared mount of its own: Docker's rshared bind needs a shared source, and the host's / is not."""
    mount(["--bind", str(root), str(root)])
    mount(["--make-rshared", str(root)])


def detach_loops_backed_under(root: Path) -> None:
    """Detach loop devices on files under `root`, matched by inode: the path sysfs shows for a loop device set up
    in a container is relative to that container's mount, so remove_root's path match cannot see them."""
    files = set()
    for folder, _dirs, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(folder, name))
                if stat.S_ISREG(st.st_mode):
                    files.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    listing = subprocess.run(["losetup", "--json", "--list", "--output", "NAME,BACK-INO,BACK-MAJ:MIN"],
                             capture_output=True, text=True, timeout=30, check=False).stdout
    for device in json.loads(listing or '{"loopdevices": []}')["loopdevices"]:
        major, _, minor = device["back-maj:min"].strip().partition(":")
        if (int(major), int(minor), int(device["back-ino"])) in files:
            subprocess.run(["losetup", "--detach", device["name"]], capture_output=True, timeout=30, check=False)


@dataclass
class ContainerDriver(Driver):
    """`hpp-csi serve` in the driver image: its root bind-mounted at the same path with rshared propagation, so
    the socket, the pools and every target are where the host-side tests look, and the bind mounts the driver
    makes in its container show up on the host as they would for kubelet."""

    image: str = ""
    name: str = field(default_factory=lambda: container_name("driver"))
    start_timeout: float = 60.0  # a container start, not just a process

    def command(self) -> list[str]:
        serve = super().command()[1:]  # the image's entrypoint is hpp-csi
        bind = f"type=bind,source={self.root},target={self.root},bind-propagation=rshared"
        return ["docker", "run", "--rm", "--name", self.name, "--network", "none", *NODE_PLUGIN_FLAGS,
                "--mount", bind, self.image, *serve]

    def spawn(self) -> subprocess.Popen[bytes]:
        if not is_mounted(self.root):
            share(self.root)
        return super().spawn()

    def kill(self) -> None:
        """SIGKILL to the container, a crash; the name is freed at once so `start()` can reuse it."""
        self.close_channel()
        docker("kill", self.name, check=False)
        remove(self.name)
        if self.proc is not None:
            self.proc.wait(10)

    def shutdown(self) -> None:
        """SIGTERM through docker stop, always removed; then the root undone as for a process driver."""
        self.close_channel()
        try:
            docker("stop", "-t", "10", self.name, check=False)
        finally:
            remove(self.name)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            detach_loops_backed_under(self.root)
            remove_root(self.root)
