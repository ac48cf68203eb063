"""Our volumes as VM disks: a QEMU guest driven through QMP (machine.py) with a shell on its console (shell.py)."""
