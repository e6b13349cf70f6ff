"""fedst ServerApp: reads the run config and runs the workflow (server/workflow.py). Kept thin on purpose."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from server.workflow import Workflow, resolve_run_dir
    from shared.config import RunConfig

    run = RunConfig.from_mapping(context.run_config)
    run_dir = resolve_run_dir(run, context.run_id)
    Workflow(grid, run, run_dir, context.run_id).run_all()
    print(f"fedst: report written to {run_dir / 'summary.md'}", flush=True)
