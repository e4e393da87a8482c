"""The NBD engine: wire format, serving loop, and kernel control."""
