"""`python -m scistream.s2ds` is `s2ds`."""

from scistream.s2ds.cli import main

main()
