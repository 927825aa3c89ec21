"""The cluster key of a multi-node gateway: 32 bytes every s2cs node of one facility
shares (``--etcd-key-file``), with which session keys are encrypted before they are
written to etcd, so etcd (and its backups) never holds a session key in clear.

The file holds the key as 64 hex characters and a newline (what ``scistream
cluster-key FILE`` writes) or as 32 raw bytes. Like every secret of the gateway it
must be a regular file that neither group nor others may read or write.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import click

KEY_BYTES = 32
_HEX_CHARS = 2 * KEY_BYTES
_READ_AT_MOST = 4096  # anything longer is not a key; never slurp a device or a log


class ClusterKeyError(Exception):
    """The cluster key cannot be used; the message is one sentence for the operator."""


def _decode(data: bytes, path: str) -> bytes:
    if len(data) == KEY_BYTES:
        return data
    text = data[:-1] if data.endswith(b"\n") else data
    if len(text) == _HEX_CHARS:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise ClusterKeyError(
        f"the cluster key {path} holds {len(data)} bytes that are neither {KEY_BYTES} raw bytes "
        f"nor {_HEX_CHARS} hex characters; make a key with `scistream cluster-key FILE` and copy "
        "that same file to every node"
    )


def load_cluster_key(path: str | os.PathLike[str]) -> bytes:
    """The 32-byte key in ``path``; ClusterKeyError (one sentence) if it is missing,
    not a regular file, open to group or others, or not a key."""
    shown = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the start; fstat judges
        # what was opened (a symlink to the key, as a mounted secret is, is fine).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ClusterKeyError(
            f"the cluster key {shown} does not exist; make one with `scistream cluster-key {shown}` "
            "and copy that same file to every node of the facility"
        ) from None
    except OSError as exc:
        raise ClusterKeyError(f"cannot read the cluster key {shown}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ClusterKeyError(f"the cluster key {shown} is not a regular file")
        if st.st_mode & 0o077:
            raise ClusterKeyError(
                f"the cluster key {shown} is open to group or others (mode {stat.filemode(st.st_mode)}); "
                f"it decrypts every session key in etcd: chmod 600 {shown}"
            )
        data = os.read(fd, _READ_AT_MOST + 1)
    except OSError as exc:
        raise ClusterKeyError(f"cannot read the cluster key {shown}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not data:
        raise ClusterKeyError(
            f"the cluster key {shown} is empty; make a key with `scistream cluster-key FILE` and "
            "copy that same file to every node"
        )
    return _decode(data, shown)


def write_cluster_key(path: str | os.PathLike[str], *, force: bool = False) -> None:
    """A new random key in ``path`` (64 hex characters and a newline), mode 0600 from its
    creation on. An existing file is kept unless ``force``: every node must hold the
    same key, and a replaced one makes the session keys already in etcd unreadable."""
    target = Path(path)
    data = (os.urandom(KEY_BYTES).hex() + "\n").encode("ascii")
    if not force:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ClusterKeyError(
                f"{target} already exists; not replacing a cluster key (every node of the facility "
                "must hold the same one, and the session keys in etcd are encrypted with it): give "
                "--force to replace it"
            ) from None
        except OSError as exc:
            raise ClusterKeyError(f"cannot create {target}: {exc.strerror}") from None
        try:
            _write_all(fd, data, target)
        except ClusterKeyError:
            target.unlink(missing_ok=True)  # ours (O_EXCL): half a key must not stay behind
            raise
        return
    # --force: a new file beside it, renamed over it, so no reader sees half a key.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ClusterKeyError(f"cannot create {tmp}: {exc.strerror}") from None
    try:
        _write_all(fd, data, target)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: bytes, target: Path) -> None:
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        raise ClusterKeyError(f"cannot write {target}: {exc.strerror}") from None
    finally:
        os.close(fd)


@click.command("cluster-key")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--force", is_flag=True, help="Replace an existing file (the nodes must then all get the new one)."
)
def cluster_key(file: str, force: bool) -> None:
    """Write a new cluster key to FILE (mode 0600) for a gateway of several s2cs nodes.

    Every node of the facility needs this same file, given to its s2cs with
    --etcd-key-file: session keys are encrypted with it before they go to etcd.
    """
    try:
        write_cluster_key(file, force=force)
    except ClusterKeyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote a new cluster key to {file} (mode 0600)")
    click.echo(
        f"copy this same file to every s2cs node of the facility and start each with --etcd-key-file {file}"
    )
