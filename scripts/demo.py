"""`make demo`: a real driver on a local socket and pool, driven through a visible volume lifecycle with
`hpp-csi ctl`, and a real disk import into the published volume. Everything it makes lives in ./demo-run."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
RUN = ROOT / "demo-run"
SOCKET = RUN / "csi.sock"
POOL = RUN / "pool"
TARGET = RUN / "pods" / "demo-pod" / "volumes" / "disk"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def ctl(*args: str) -> str:
    command = [str(BIN / "hpp-csi"), "ctl", "--endpoint", f"unix://{SOCKET}", *args]
    print("$ hpp-csi ctl " + " ".join(args), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    output = (result.stdout + result.stderr).rstrip()
    print(output, flush=True)
    if result.returncode != 0:
        raise SystemExit(f"demo failed at: hpp-csi ctl {' '.join(args)}")
    return output


def cleanup_leftovers() -> None:
    """A previous demo killed half-way may have left a mount under demo-run: unmount it before wiping."""
    if not RUN.exists():
        return
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        point = line.split(" ")[4]
        if point.startswith(str(RUN) + "/"):
            subprocess.run(["umount", point], check=False)
    shutil.rmtree(RUN)


@contextlib.contextmanager
def driver() -> Iterator[subprocess.Popen[bytes]]:
    say("starting the driver: hpp-csi serve on a local socket with a directory pool")
    command = [str(BIN / "hpp-csi"), "serve", "--endpoint", f"unix://{SOCKET}", "--nodeid", os.uname().nodename,
               "--datadir", f'[{{"name": "legacy", "path": "{POOL}"}}]']
    print("$ " + " ".join(command), flush=True)
    proc = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 30
        while not SOCKET.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the driver did not start")
            time.sleep(0.05)
        yield proc
    finally:
        say("stopping the driver (SIGTERM: in-flight calls drain, the socket is removed)")
        proc.terminate()
        proc.wait(30)
        print(f"driver exited with {proc.returncode}; socket present: {SOCKET.exists()}")


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with single-range support, as a real image server does (qemu reads images in place)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        header = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not header.startswith("bytes=") or not path.is_file():
            super().do_GET()
            return
        size = path.stat().st_size
        first, _, last = header[len("bytes="):].partition("-")
        start, end = int(first or 0), min(int(last) if last else size - 1, size - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with path.open("rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining:
                chunk = f.read(min(remaining, 1 << 20))
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def end_headers(self) -> None:
        if self.command == "HEAD" or "Range" not in self.headers:
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()


@contextlib.contextmanager
def image_server(folder: Path) -> Iterator[str]:
    handler = lambda *a, **k: RangeHandler(*a, directory=str(folder), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def import_disk(volume_dir: Path) -> None:
    """Build a real qcow2 image, serve it over HTTP on 127.0.0.1 and import it with hpp-importer."""
    importer = BIN / "hpp-importer"
    if not importer.exists() or shutil.which("qemu-img") is None:
        print("(hpp-importer or qemu-img is not installed: skipping the import step)")
        return
    images = RUN / "images"
    images.mkdir()
    raw = images / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(64 * 2**20)
        f.seek(2**20)
        f.write(b"hpp-csi demo disk\n" * 4096)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(images / "disk.qcow2")],
                   check=True)
    with image_server(images) as url:
        command = [str(importer), "import", "--source", "http", "--endpoint", f"{url}/disk.qcow2",
                   "--dest", str(volume_dir), "--image-size", "128Mi"]
        say("importing a qcow2 VM disk over HTTP into the published volume")
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    disk = volume_dir / "disk.img"
    # disk.img is grown to the volume's usable size, so it is larger than the source and `qemu-img compare`
    # warns about the sizes before checking that the extra part reads as zeros: say why instead of showing that.
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), str(disk)],
                             capture_output=True, text=True)
    if compare.returncode != 0:
        raise SystemExit(f"demo failed: {disk} differs from the source image:\n{compare.stdout}{compare.stderr}")
    print(f"{disk} holds the {raw.stat().st_size >> 20} MiB source image and is {disk.stat().st_size >> 20} MiB: "
          "grown to the volume's usable size (128 MiB less the 5.5% filesystem overhead), the rest reading as zeros "
          "(checked with qemu-img compare)")


def vm_disk(volume_dir: Path) -> None:
    """`make demo VM=1`: boot a small guest (QEMU TCG) and hot-plug the imported disk through QMP, as virt-launcher
    would; the guest reports what it sees. The guest kit lives with the tests (tests/vm)."""
    disk = volume_dir / "disk.img"
    if not disk.exists():
        print("(no imported disk: skipping the VM step)")
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import vmkit
    from vm.machine import Machine

    say("boot a guest (QEMU, TCG, Debian's kernel, busybox initramfs) and hot-plug the imported disk over QMP")
    machine = Machine()
    try:
        try:
            machine.boot()
        except vmkit.VMUnavailable as exc:
            raise SystemExit(f"demo failed: no guest could start: {exc}") from None
        print(f"guest up in {machine.boot_seconds:.1f} s; QMP: blockdev-add (file {disk}), device_add scsi-hd")
        plugged = machine.attach("demo", disk, block=False)
        device = machine.device_of(plugged)
        print(f"the guest sees {device}:")
        print(machine.shell.check(f"echo \"  size: $(blockdev --getsize64 {device}) bytes\"; "
                                  f"echo \"  at 1 MiB: $(dd if={device} bs=1M skip=1 count=1 2>/dev/null | head -1)\"")
              .rstrip())
        machine.detach(plugged)
        print("QMP: device_del, DEVICE_DELETED, blockdev-del; the guest no longer has the disk")
    finally:
        machine.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo failed: the upload daemon exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit(f"demo failed: the upload daemon did not listen on 127.0.0.1:{port} within {seconds:.0f} s")


def upload_disk() -> None:
    """The node upload daemon beside the driver: a token for one volume, then our client uploads a gzipped disk."""
    raw = RUN / "images" / "disk.raw"
    if not raw.exists():
        print("(no image from the import step: skipping the upload step)")
        return
    packed = RUN / "images" / "disk.raw.gz"
    with raw.open("rb") as source, packed.open("wb") as out:
        subprocess.run(["gzip", "-c"], stdin=source, stdout=out, check=True)
    keys, port = RUN / "upload-keys", free_port()
    command = [str(BIN / "hpp-importer"), "serve", "--datadir", f'[{{"name": "legacy", "path": "{POOL}"}}]',
               "--listen", f"127.0.0.1:{port}", "--key-file", str(keys / "upload-signing.key")]
    print("$ " + " ".join(command), flush=True)
    daemon = subprocess.Popen(command)
    try:
        wait_listening(port, daemon)
        token = subprocess.run([str(BIN / "hpp-importer"), "upload-token", "demo-upload", "--ttl", "5m",
                                "--key-file", str(keys / "upload-signing.key")],
                               capture_output=True, text=True, check=True).stdout.strip()
        token_file = keys / "token"
        token_file.write_text(token + "\n")
        print("$ hpp-importer upload-token demo-upload --ttl 5m > token   # signed with the node's key")
        command = [str(BIN / "hpp-importer"), "upload", "--url", f"https://127.0.0.1:{port}", "--token-file",
                   str(token_file), "--image-path", str(packed), "--ca", str(keys / "upload-tls.crt"), "--no-progress"]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    finally:
        daemon.terminate()
        daemon.wait(30)
    disk = POOL / "demo-upload" / "disk.img"
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), str(disk)],
                             capture_output=True, text=True)
    if compare.returncode != 0:
        raise SystemExit(f"demo failed: {disk} differs from the source image:\n{compare.stdout}{compare.stderr}")
    print(f"{disk} holds the uploaded image, decompressed on the way (checked with qemu-img compare)")


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo failed: {what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit(f"demo failed: {what} did not answer {url} within {seconds:.0f} s")


def run_shown(*command: str) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def registry_disk(volume_dir: Path) -> None:
    """A container disk built with umoci, pushed by skopeo to a local docker-registry, imported by hpp-importer."""
    raw = RUN / "images" / "disk.raw"
    tools = [t for t in ("docker-registry", "umoci", "skopeo") if shutil.which(t) is None]
    if not raw.exists() or tools:
        print(f"(missing {', '.join(tools) or 'the image from the import step'}: skipping the registry step)")
        return
    work, port = RUN / "registry", free_port()
    work.mkdir()
    config = work / "registry.yml"
    config.write_text(f"version: 0.1\nstorage: {{filesystem: {{rootdirectory: {work / 'storage'}}}}}\n"
                      f"http: {{addr: \"127.0.0.1:{port}\"}}\nlog: {{level: error}}\n")
    print(f"$ docker-registry serve {config}   # on 127.0.0.1:{port}", flush=True)
    with (work / "registry.log").open("wb") as log:
        registry = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/", registry, "docker-registry")
        layout, staged = work / "oci", work / "disk.img"
        shutil.copyfile(raw, staged)
        os.chown(staged, 107, 107)  # as KubeVirt's container disks are
        run_shown("umoci", "init", "--layout", str(layout))
        run_shown("umoci", "new", "--image", f"{layout}:demo")
        run_shown("umoci", "insert", "--image", f"{layout}:demo", str(staged), "/disk/disk.img")
        reference = f"docker://127.0.0.1:{port}/disks/demo:1"
        run_shown("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:demo", reference)
        command = [str(BIN / "hpp-importer"), "import", "--source", "registry", "--endpoint", reference,
                   "--insecure-tls", "--dest", str(volume_dir), "--image-size", "128Mi", "--no-progress"]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    finally:
        registry.terminate()
        registry.wait(30)
    disk = volume_dir / "disk.img"
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), str(disk)],
                             capture_output=True, text=True)
    if compare.returncode != 0:
        raise SystemExit(f"demo failed: {disk} differs from the source image:\n{compare.stdout}{compare.stderr}")
    print(f"{disk} holds the container disk, streamed out of its layer (checked with qemu-img compare)")


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: publishing a volume is a bind mount", file=sys.stderr)
        return 1
    cleanup_leftovers()
    RUN.mkdir()
    with driver():
        say("who is serving, and what it offers")
        ctl("info")
        ctl("capacity")
        say("create a 1 GiB volume in pool 'legacy'")
        ctl("create", "demo-disk", "--size", "1Gi")
        ctl("create", "demo-disk", "--size", "1Gi")
        say("publish it where kubelet would (a bind mount) and write through it")
        ctl("publish", "demo-disk", str(TARGET))
        (TARGET / "hello.txt").write_text("written through the published target\n")
        print(f"wrote {TARGET / 'hello.txt'}; in the pool it is {POOL / 'demo-disk' / 'hello.txt'}: "
              f"{(POOL / 'demo-disk' / 'hello.txt').read_text().strip()!r}")
        import_disk(TARGET)
        if os.environ.get("VM") == "1":
            vm_disk(TARGET)
        say("usage and condition of the volume")
        ctl("stats", "demo-disk", str(TARGET))
        ctl("list")
        say("unpublish and delete")
        ctl("unpublish", "demo-disk", str(TARGET))
        ctl("delete", "demo-disk")
        say("upload a disk into a new volume through the node upload daemon, with a token")
        ctl("create", "demo-upload", "--size", "128Mi")
        upload_disk()
        ctl("delete", "demo-upload")
        say("import a container disk from a local registry (docker-registry, umoci, skopeo)")
        ctl("create", "demo-registry", "--size", "128Mi")
        registry_disk(POOL / "demo-registry")
        ctl("delete", "demo-registry")
        ctl("list")
    say("demo complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
