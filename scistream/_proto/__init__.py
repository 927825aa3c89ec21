"""Generated gRPC / protobuf stubs (built from proto/ by setup.py; never edited)."""
