"""Entry point of the `fedst` console script: the composition root above the layers.

The command groups are contributed by the packages through the ``fedst.commands`` entry-point group declared in
pyproject.toml (``shared.cli.*`` for the library commands, ``server.cli`` and ``server.experiment.cli`` for the
lead's commands), the way pytest or Flower discover plugins. So this module imports neither ``server`` nor
``client``: the layers stay one-directional and a partner installing the client alone still gets a working CLI.
Every command module imports only typer at module level, so `fedst --help` stays fast; the work each command does
is imported inside the command. A FedstError becomes one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer

from shared.errors import FedstError

COMMAND_GROUP = "fedst.commands"

app = typer.Typer(
    name="fedst",
    help="Federated histology-to-gene-expression learning for spatial transcriptomics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"fedst {version('fedst')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print fedst's version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """Federated histology-to-gene-expression learning for spatial transcriptomics."""


def _register() -> None:
    found = sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)
    if not found:
        raise SystemExit(f"fedst is not installed (no '{COMMAND_GROUP}' entry points): run pip install -e .")
    for entry in found:
        entry.load()(app)


_register()


def main() -> None:
    try:
        app()
    except FedstError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
