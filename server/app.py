"""fedst ServerApp: reads the run config and runs the workflow (server/workflow.py). Kept thin on purpose."""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from server.transport import TransportGrid
    from server.workflow import Workflow, resolve_run_dir
    from shared.config import RunConfig
    from shared.errors import FedstError

    run = RunConfig.from_mapping(context.run_config)
    run_dir = resolve_run_dir(run, context.run_id)
    try:
        Workflow(grid if run.transport == "flower" else TransportGrid(grid), run, run_dir, context.run_id).run_all()
    except FedstError as exc:
        # One plain line for `flwr log` before Flower's traceback; the run fails with it (`flwr ls`: status-details).
        log(ERROR, "fedst: %s", exc)
        raise
    print(f"fedst: report written to {run_dir / 'summary.md'}", flush=True)
