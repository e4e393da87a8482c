"""containerd 1.6's gRPC API (snapshots, content, images, leases, diff), made by ``generate-api`` from its .proto files."""
