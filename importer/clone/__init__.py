"""Moving a volume to another node: CDI's host-assisted clone formats and our sparse, resumable one."""
