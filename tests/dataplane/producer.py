"""A producer in its own process (so a test can kill it): serves the seed's pattern stream
to every connection, forever. Prints its port on the first line of stdout.

Usage: python producer.py SEED
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from pathlib import Path

# Run as a script, this file has tests/dataplane on sys.path, not tests/ (where streams.py is).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from streams import send_stream


def main() -> int:
    seed = int(sys.argv[1])
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    sys.stdout.write(f"{lsock.getsockname()[1]}\n")
    sys.stdout.flush()

    def serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            send_stream(conn, 1 << 50, seed)

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
