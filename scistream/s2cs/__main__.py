"""``python -m scistream.s2cs``: the same as the ``s2cs`` command."""

from scistream.s2cs.cli import main

main()
