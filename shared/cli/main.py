"""Entry point of the `fedst` console script.

Every command module below imports only typer at module level, so `fedst --help` stays fast; the work each
command does is imported inside the command. A FedstError becomes one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from shared.errors import FedstError

app = typer.Typer(
    name="fedst",
    help="Federated histology-to-gene-expression learning for spatial transcriptomics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from shared.cli import c2l, data, drift, experiment, federation, impute, predict

    app.add_typer(data.app, name="data")
    app.add_typer(c2l.app, name="c2l")
    for module in (drift, predict, impute, federation, experiment):
        module.register(app)


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
