"""Globus Auth tokens for s2uc: native-app login, refresh, revocation, storage.

Tokens live in ``<home>/tokens.json`` (0600), keyed by the scope id the user
logged in for (the s2cs's Globus client id), never in the current directory.
Globus Auth's location comes from globus-sdk's own settings
(``GLOBUS_SDK_ENVIRONMENT``, ``GLOBUS_SDK_SERVICE_URL_AUTH``), which is also
how the tests point it at a local stand-in.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scistream.grpcutil import ControlError, ExitCode
from scistream.s2uc.config import home_dir, write_private_file

log = logging.getLogger(__name__)

CLIENT_ID = "4787c84e-9c55-4881-b941-cb6720cea11c"
DEFAULT_SCOPE = "c42c0dac-0a52-408e-a04f-5d31bfe0aef8"
# Refresh a little before expiry so a token does not die in flight.
_EXPIRY_MARGIN_S = 60


def scope_url(scope_id: str) -> str:
    return f"https://auth.globus.org/scopes/{scope_id}/scistream"


def _auth_client() -> Any:
    import globus_sdk  # slow import: only when talking to Globus

    return globus_sdk.NativeAppAuthClient(CLIENT_ID)


def _globus_error(exc: Exception, what: str) -> ControlError:
    import globus_sdk

    if isinstance(exc, globus_sdk.GlobusAPIError):
        return ControlError(f"Globus Auth refused {what}: {exc.http_status} {exc.code}", ExitCode.AUTH)
    if isinstance(exc, globus_sdk.NetworkError):
        return ControlError(
            f"cannot reach Globus Auth for {what}: {type(exc).__name__}", ExitCode.UNREACHABLE
        )
    return ControlError(f"{what} failed: {exc}", ExitCode.AUTH)


class TokenStore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or home_dir() / "tokens.json"

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ControlError(f"token store {self.path} is unreadable: {exc}", ExitCode.AUTH) from None
        return data if isinstance(data, dict) else {}

    def save(self, data: dict[str, dict[str, Any]]) -> None:
        write_private_file(self.path, json.dumps(data, indent=1).encode())

    def get(self, scope_id: str) -> dict[str, Any] | None:
        return self.load().get(scope_id)

    def put(self, scope_id: str, token: dict[str, Any]) -> None:
        data = self.load()
        data[scope_id] = token
        self.save(data)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _pick_token(by_rs: dict[str, dict[str, Any]], scope_id: str) -> dict[str, Any]:
    """The token for our scope: resource server == scope id, else the one whose scope names it."""
    if scope_id in by_rs:
        return by_rs[scope_id]
    for tok in by_rs.values():
        if scope_id in str(tok.get("scope", "")):
            return tok
    if by_rs:
        return next(iter(by_rs.values()))
    raise ControlError("Globus Auth returned no token", ExitCode.AUTH)


def _slim(tok: dict[str, Any]) -> dict[str, Any]:
    keys = ("access_token", "refresh_token", "expires_at_seconds", "scope", "resource_server", "token_type")
    return {k: tok.get(k) for k in keys}


def login(scope_id: str, read_code: Callable[[str], str], store: TokenStore | None = None) -> dict[str, Any]:
    """Native-app flow: ``read_code`` shows the URL and returns the pasted code."""
    st = store or TokenStore()
    client = _auth_client()
    try:
        client.oauth2_start_flow(requested_scopes=scope_url(scope_id), refresh_tokens=True)
        url = client.oauth2_get_authorize_url(query_params={"prompt": "login"})
    except Exception as exc:
        raise _globus_error(exc, "starting the login") from None
    code = read_code(url).strip()
    if not code:
        raise ControlError("no authorization code given", ExitCode.AUTH)
    try:
        response = client.oauth2_exchange_code_for_tokens(code)
    except Exception as exc:
        raise _globus_error(exc, "the authorization code") from None
    tok = _slim(_pick_token(response.by_resource_server, scope_id))
    st.put(scope_id, tok)
    return tok


def access_token(scope_id: str | None, store: TokenStore | None = None) -> str | None:
    """The access token to send for ``scope_id`` (refreshed when near expiry); None with no scope.

    A scope with no stored login is an error: the user asked for authentication.
    """
    if not scope_id:
        return None
    st = store or TokenStore()
    tok = st.get(scope_id)
    if not tok or not tok.get("access_token"):
        raise ControlError(
            f"not logged in for scope {scope_id}: run `s2uc login --scope {scope_id}`", ExitCode.AUTH
        )
    expires = tok.get("expires_at_seconds") or 0
    if expires and expires - _EXPIRY_MARGIN_S < time.time():
        refresh = tok.get("refresh_token")
        if not refresh:
            raise ControlError(
                f"the login for scope {scope_id} has expired: run `s2uc login --scope {scope_id}`",
                ExitCode.AUTH,
            )
        try:
            response = _auth_client().oauth2_refresh_token(refresh)
        except Exception as exc:
            err = _globus_error(exc, "refreshing the token")
            raise ControlError(f"{err.message}; run `s2uc login --scope {scope_id}`", ExitCode.AUTH) from None
        new = _slim(_pick_token(response.by_resource_server, scope_id))
        new["refresh_token"] = new.get("refresh_token") or refresh
        st.put(scope_id, new)
        log.debug("refreshed the token for scope %s", scope_id)
        tok = new
    return str(tok["access_token"])


def logout(store: TokenStore | None = None) -> list[str]:
    """Revoke every stored token at Globus Auth and delete the store; return the scopes."""
    st = store or TokenStore()
    data = st.load()
    failures: list[str] = []
    if data:
        client = _auth_client()
        for scope_id, tok in data.items():
            for kind in ("access_token", "refresh_token"):
                value = tok.get(kind)
                if not value:
                    continue
                try:
                    client.oauth2_revoke_token(value)
                except Exception as exc:
                    failures.append(f"{scope_id} {kind}: {_globus_error(exc, 'revocation').message}")
    # Delete even if revocation failed: the user asked to forget the tokens.
    st.clear()
    if failures:
        raise ControlError(
            "tokens deleted locally, but revocation failed for " + "; ".join(failures), ExitCode.AUTH
        )
    return list(data)
