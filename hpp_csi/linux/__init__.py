"""Linux primitives: mounts, loop devices, XFS and its quotas, reflink copies, safe opens, atomic writes."""
