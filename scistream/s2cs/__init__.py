"""s2cs: the SciStream control server (gRPC)."""
