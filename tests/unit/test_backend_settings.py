"""Each backend declares the settings it reads (``known_settings``), and only those get through.

``s2cs --backend-option KEY=VALUE`` fills ``BackendOptions.extra``; create_backend refuses a
key the chosen backend does not declare. The declarations are checked against the code: every
key a backend module reads from ``extra`` is declared, and every declared key is read.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from scistream.s2cs.backends import BACKENDS, UnknownBackendSetting, create_backend
from scistream.s2cs.backends.base import Backend, BackendOptions
from scistream.s2cs.backends.haproxy import CERT_SETTINGS
from scistream.s2cs.backends.supervisor import SubprocessBackend

READS = re.compile(r'(?:extra\.get|_setting_float)\(\s*"(\w+)"')


def backend_classes() -> dict[str, type[Backend]]:
    classes: dict[str, type[Backend]] = {}
    for module, name in BACKENDS.values():
        cls = getattr(importlib.import_module(module), name)
        classes[cls.name] = cls
    return classes


def keys_read_by(cls: type[Backend]) -> set[str]:
    """The literal keys the class's module (and its base class's) read from ``extra``."""
    sources = [inspect.getsource(inspect.getmodule(cls))]  # type: ignore[arg-type]
    keys: set[str] = set()
    if issubclass(cls, SubprocessBackend):
        sources.append(inspect.getsource(inspect.getmodule(SubprocessBackend)))  # type: ignore[arg-type]
        keys.add(f"{cls.name}_bin")  # extra.get(f"{self.name}_bin")
    if "operator_certs(" in sources[0]:
        keys |= set(CERT_SETTINGS)
    for text in sources:
        keys |= set(READS.findall(text))
    return keys


@pytest.mark.parametrize("name", sorted(backend_classes()))
def test_declared_settings_are_exactly_those_read(name: str) -> None:
    cls = backend_classes()[name]
    declared = set(cls.known_settings)
    assert len(declared) == len(cls.known_settings), "a setting is declared twice"
    read = keys_read_by(cls)
    assert read - declared == set(), f"{name} reads settings it does not declare"
    assert declared - read == set(), f"{name} declares settings it never reads"


def test_certificate_settings_belong_to_the_backends_that_can_use_certificates() -> None:
    classes = backend_classes()
    # native: gateway certificates for 1.x clients (DESIGN decision 9)
    for name in ("haproxy", "nginx", "native"):
        assert set(CERT_SETTINGS) <= set(classes[name].known_settings)
        assert "certs" in classes[name].wan_keys
    assert not set(CERT_SETTINGS) & set(classes["stunnel"].known_settings)
    assert classes["stunnel"].wan_keys == frozenset({"psk"})


def test_create_backend_refuses_unknown_keys_and_lists_the_valid_ones(tmp_path: object) -> None:
    def options(**extra: str) -> BackendOptions:
        return BackendOptions(state_dir=str(tmp_path), listener_ip="127.0.0.1", extra=extra)

    with pytest.raises(UnknownBackendSetting) as err:
        create_backend("StunnelSubprocess", options(tls_cert="/gw.pem"))
    assert str(err.value) == (
        "unknown backend option 'tls_cert' for --type stunnel; valid keys: connect_timeout, "
        "drain_timeout, idle_timeout, start_timeout, stop_timeout, stunnel_bin"
    )
    with pytest.raises(UnknownBackendSetting) as err:
        create_backend("nginx", options(nginx_worker="2", bogus="1"))
    message = str(err.value)
    assert message.startswith(
        "unknown backend options 'bogus', 'nginx_worker' (did you mean 'nginx_workers'?) for --type nginx"
    )
    assert "tls_server_name" in message
    # Every declared key is accepted by its backend (construction only: nothing starts).
    for name, cls in backend_classes().items():
        backend = create_backend(name, options(**{key: "1" for key in cls.known_settings}))
        assert type(backend) is cls and dict(backend.options.extra) == dict.fromkeys(cls.known_settings, "1")
