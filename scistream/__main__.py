"""``python -m scistream`` is the ``scistream`` command (demo, certs, health)."""

from scistream.cli import main

main(prog_name="scistream")
