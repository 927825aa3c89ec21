"""Stubs generated from the pinned etcd v3 API protos in proto/etcd/ (by setup.py; never edited)."""
