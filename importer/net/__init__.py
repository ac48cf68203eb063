"""HTTP plumbing shared by every remote source: proxies, TLS trust, connection pools, extra headers."""
