"""The nginx backend: one foreground nginx (``daemon off``) per session, stream module.

nginx runs with its prefix, pid file and error log in the session directory,
so it needs no root-owned paths. Like HAProxy it cannot do TLS 1.3 with an
external PSK: security ``tls`` uses the per-session certificates the PROD
s2cs mints, or operator certificates (``tls_cert``, ``tls_key``, ``tls_ca``,
``tls_server_name``; see haproxy.py), and ``compat`` is refused. It
enforces rate_limit (per connection, see proxyconf.nginx_config) and has no
counters to read (usage is unknown). Settings: ``nginx_workers`` (default 1),
``nginx_stream_module`` (path of ngx_stream_module.so when nginx was built
with the stream module as a dynamic module).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import ClassVar

from scistream.s2cs.backends.base import BackendError, BackendOptions, SessionPlan
from scistream.s2cs.backends.haproxy import (
    CERT_SETTINGS,
    CertModeBackend,
    operator_certs,
    session_cert_files,
)
from scistream.s2cs.backends.proxyconf import nginx_config
from scistream.s2cs.backends.supervisor import TIMEOUT_SETTINGS, SubprocessBackend, write_private

DEFAULT_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


class NginxBackend(CertModeBackend, SubprocessBackend):
    name = "nginx"
    package = "nginx-light and libnginx-mod-stream"
    known_settings: ClassVar[tuple[str, ...]] = (
        "nginx_bin",
        *TIMEOUT_SETTINGS,
        *CERT_SETTINGS,
        "nginx_workers",
        "nginx_stream_module",
    )
    enforces_rate_limit = True
    # SIGQUIT: graceful shutdown -- stop accepting, let open streams finish.
    drain_signal: ClassVar[signal.Signals | None] = signal.SIGQUIT

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.stream_module = ""

    async def _check_binary(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.binary, "-V", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        build = out.decode("utf-8", "replace")
        module = self.options.extra.get("nginx_stream_module", "")
        if "--with-stream=dynamic" in build or module:
            module = module or DEFAULT_STREAM_MODULE
            if not Path(module).is_file():
                raise BackendError(
                    f"nginx has no stream module ({module} is missing); "
                    "install libnginx-mod-stream or set nginx_stream_module"
                )
            self.stream_module = module
        elif "--with-stream" not in build:
            raise BackendError("this nginx was built without the stream module; the nginx backend needs it")

    def _check_settings(self) -> None:
        super()._check_settings()
        operator_certs(self.options.extra, "nginx")
        self._workers()

    def _workers(self) -> int:
        text = self.options.extra.get("nginx_workers", "1")
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise BackendError(f"backend setting nginx_workers={text!r} is not a positive number")
        return int(text)

    def _write_files(self, plan: SessionPlan, path: Path) -> list[str]:
        certs = session_cert_files(plan, path, combined=False) or operator_certs(self.options.extra, "nginx")
        conf = path / "nginx.conf"
        write_private(
            conf,
            nginx_config(
                plan,
                pid_file=str(path / "nginx.pid"),
                stream_module=self.stream_module,
                certs=certs,
                idle_timeout_s=self._idle_timeout(),
                connect_timeout_s=self._connect_timeout(),
                workers=self._workers(),
            ),
        )
        return [self.binary, "-p", f"{path}/", "-c", str(conf), "-e", "stderr"]
