"""The stunnel backend: one foreground stunnel per session, TLS 1.3 PSK (or the 1.x interop mode).

PROD runs stunnel as the TLS server (WAN listeners, plain connections to the
producer); CONS as the TLS client (plain listeners for the consumer, TLS to the
PROD gateway). The key file holds ``identity:key`` and lives, mode 0600, only
as long as the session. stunnel cannot limit bandwidth (a plan's rate_limit is
reported as not enforced) and has no counters to read (usage is unknown).
Security ``plain`` is refused: use the native, haproxy or nginx backend.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import ClassVar

from scistream.s2cs.backends.base import SessionPlan
from scistream.s2cs.backends.proxyconf import stunnel_config, stunnel_psk_file
from scistream.s2cs.backends.supervisor import TIMEOUT_SETTINGS, SubprocessBackend, write_private


class StunnelBackend(SubprocessBackend):
    name = "stunnel"
    package = "stunnel4"
    known_settings: ClassVar[tuple[str, ...]] = ("stunnel_bin", *TIMEOUT_SETTINGS)
    security_modes: ClassVar[frozenset[str]] = frozenset({"tls", "compat"})
    # stunnel has no graceful stop: SIGTERM closes every connection.
    drain_signal: ClassVar[signal.Signals | None] = None

    def default_binary(self) -> str:
        # Debian installs stunnel4; upstream builds install stunnel.
        return "stunnel4" if shutil.which("stunnel4") else "stunnel"

    def _write_files(self, plan: SessionPlan, path: Path) -> list[str]:
        psk = path / "psk.txt"
        write_private(psk, stunnel_psk_file(plan))
        conf = path / "stunnel.conf"
        write_private(
            conf,
            stunnel_config(
                plan,
                psk_file=str(psk),
                idle_timeout_s=self._idle_timeout(),
                connect_timeout_s=self._connect_timeout(),
            ),
        )
        return [self.binary, str(conf)]
