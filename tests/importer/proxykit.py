"""A real forward proxy for tests: Debian's tinyproxy on 127.0.0.1, its log kept to see what went through it."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Tinyproxy:
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lines(self, needle: str) -> list[str]:
        """Log lines naming needle, e.g. 'GET http://vm:1234/img/raw' or 'CONNECT vm:1234'."""
        return [line for line in self.log.read_text(errors="replace").splitlines() if needle in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_tinyproxy(workdir: Path, connect_ports: list[int], auth: tuple[str, str] | None = None) -> Tinyproxy:
    port = free_port()
    config = workdir / "tinyproxy.conf"
    lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 30", "LogLevel Connect", "Allow 127.0.0.1",
             "MaxClients 64", *(f"ConnectPort {p}" for p in connect_ports)]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    config.write_text("\n".join(lines) + "\n")
    log = workdir / "tinyproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Tinyproxy(port, log, proc)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"tinyproxy did not start: {log.read_text(errors='replace')[-500:]}") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
