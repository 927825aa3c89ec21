"""``scistream``: the umbrella command (demo, certificates, the cluster key)."""

from __future__ import annotations

import logging

import click

from scistream import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scistream")
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail to stderr.")
def main(verbose: bool) -> None:
    """SciStream gateway tools. `scistream demo` shows the whole product in one command."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _register() -> None:
    # Each subcommand lives with the code it drives; import lazily-failing
    # modules here so `scistream --help` works even if one part is broken.
    try:
        from scistream.demo import demo

        main.add_command(demo)
    except ImportError as exc:  # pragma: no cover - only while a part is missing
        logging.getLogger(__name__).debug("demo unavailable: %s", exc)
    from scistream.healthcheck import health
    from scistream.s2cs.clusterkey import cluster_key

    main.add_command(cluster_key)

    main.add_command(health)
    try:
        from scistream.certs import certs

        main.add_command(certs)
    except ImportError as exc:  # pragma: no cover
        logging.getLogger(__name__).debug("certs unavailable: %s", exc)


_register()
