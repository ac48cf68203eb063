"""The CSI services: each validates its request, then makes one call down to storage."""
