"""Image formats: read docker-archive, OCI layouts and plain layer tars into one model."""
