"""`fedst data ...`: prepare, inspect and generate site data."""

import typer

app = typer.Typer(help="Prepare, inspect and generate site data.", no_args_is_help=True)
