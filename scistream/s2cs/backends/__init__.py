"""Data-plane backends of s2cs (see base.py for the contract)."""
