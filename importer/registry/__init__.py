"""Container registry client (distribution API v2): references, auth challenges, manifests, verified blobs."""
