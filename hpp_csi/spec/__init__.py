"""Python stubs generated from protos/csi.proto by `make protos`; never edit by hand."""
