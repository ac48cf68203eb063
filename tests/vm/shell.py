"""A shell in the guest, spoken to over its serial console: send a command, read its output and exit status.

Why our own protocol: the guest has no network and no agent, only a tty. Each command travels as one line
`<id> <base64 of the script>` (so no byte of it is taken as a tty control character), and its output comes back
framed by `@@VMKIT-OUT <id>@@` and `@@VMKIT-END <id> <status>@@`. Background jobs in the guest may print
`@@VMKIT-EVENT <text>@@` lines at any time; they are collected apart and never mixed into a command's output.
Every wait has a deadline; a timeout raises with the console's tail.
"""

from __future__ import annotations

import base64
import itertools
import re
import socket
import time
from collections.abc import Callable

READY = "@@VMKIT-READY@@"
EVENT = re.compile(r"@@VMKIT-EVENT ([^@\n]*)@@\n?")

# Runs as the vmkit initramfs's script (chrooted into the host's read-only `/`, so host tools are there). Raw
# mode: no echo, no line editing, no \n -> \r\n; `dmesg -n 1` keeps kernel messages off the console.
AGENT = """exec </dev/ttyS0 >/dev/ttyS0 2>&1
stty raw -echo
dmesg -n 1
echo "@@VMKIT-READY@@"
while IFS=' ' read -r id code; do
    printf '%s' "$code" | base64 -d > /tmp/vmkit-command.sh
    printf '@@VMKIT-OUT %s@@\\n' "$id"
    sh /tmp/vmkit-command.sh </dev/null 2>&1
    status=$?
    printf '\\n@@VMKIT-END %s %s@@\\n' "$id" "$status"
done
"""


class GuestError(AssertionError):
    """The guest did not answer in time, or a command failed: the message carries its output or the console."""


class GuestShell:
    """The host's end of the agent's console socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.transcript = ""  # everything the console said, for error messages
        self._ids = itertools.count(1)

    def tail(self, size: int = 3000) -> str:
        return self.transcript[-size:]

    def _read(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"guest: no {what} within {timeout:.0f}s; console tail:\n{self.tail()}")
            self._sock.settimeout(min(left, 1.0))
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise GuestError(f"guest console closed while waiting for {what}; console tail:\n{self.tail()}")
            self.transcript += data.decode(errors="replace").replace("\r", "")

    def wait_ready(self, timeout: float) -> None:
        self._read(lambda: READY in self.transcript, timeout, "shell prompt (boot did not finish)")

    def pump(self, seconds: float) -> None:
        """Read whatever the console says for `seconds` (background jobs' events)."""
        end = time.monotonic() + seconds
        self._read(lambda: time.monotonic() >= end, seconds + 1, "console data")

    def events(self) -> list[str]:
        """The texts of all `@@VMKIT-EVENT ...@@` lines seen so far, in order."""
        return EVENT.findall(self.transcript)

    def wait_events(self, predicate: Callable[[list[str]], bool], timeout: float, what: str) -> list[str]:
        self._read(lambda: predicate(self.events()), timeout, what)
        return self.events()

    def run(self, script: str, timeout: float = 30.0) -> tuple[int, str]:
        """(exit status, output) of `script` run by the guest's /bin/sh."""
        command_id = next(self._ids)
        encoded = base64.b64encode(script.encode()).decode()
        start = len(self.transcript)
        self._sock.sendall(f"{command_id} {encoded}\n".encode())
        end = re.compile(rf"@@VMKIT-OUT {command_id}@@\n(.*?)\n@@VMKIT-END {command_id} (\d+)@@", re.S)
        found: list[re.Match[str]] = []

        def done() -> bool:
            match = end.search(self.transcript, start)
            if match:
                found.append(match)
            return match is not None

        self._read(done, timeout, f"end of `{script[:80]}`")
        return int(found[0].group(2)), EVENT.sub("", found[0].group(1))

    def check(self, script: str, timeout: float = 30.0) -> str:
        """Output of `script`; GuestError when it exits non-zero."""
        status, output = self.run(script, timeout)
        if status != 0:
            raise GuestError(f"guest: `{script}` exited {status}:\n{output}")
        return output
