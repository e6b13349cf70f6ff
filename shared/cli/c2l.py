"""`fedst c2l ...`: central pretraining, gene-conditioned adaptation, synthesis and audit."""

import typer

app = typer.Typer(help="C2L-ST: central diffusion model, local gene-conditioned adaptation, synthesis.", no_args_is_help=True)
