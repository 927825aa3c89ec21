"""s2ds: the data-plane daemon of a gateway node, its client, and the standalone forwarder.

s2cs reaches the daemon only through :class:`scistream.s2ds.client.S2dsClient`
at :func:`scistream.s2ds.paths.default_control_address` (or a configured one).
"""

from scistream.s2ds.paths import default_control_address

__all__ = ["default_control_address"]
