"""``python -m scistream.appctrl`` is ``appctrl``."""

from scistream.appctrl.cli import main

main(prog_name="appctrl")
