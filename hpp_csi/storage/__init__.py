"""What a volume is and where it lives: pools, volumes, snapshots, records, publications."""
