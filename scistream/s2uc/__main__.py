"""``python -m scistream.s2uc`` is ``s2uc``."""

from scistream.s2uc.cli import main

main(prog_name="s2uc")
