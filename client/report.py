"""A site's own report (``work-dir/report/``): real vs synthetic patches, its metrics and epsilon. Never sent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def site_report(work: Path, store, site: str, n: int = 8) -> Path:
    """``work/report/``: sample grid real vs synthetic, the site's metrics and epsilon (stays on site)."""
    from shared.store.format import PatchStore, is_store

    out = work / "report"
    out.mkdir(exist_ok=True)
    history = json.loads((work / "metrics.json").read_text()) if (work / "metrics.json").is_file() else []
    from shared.c2l.plots import image_grid

    rows = [("real", np.asarray(store.patches[: min(n, store.n_spots)]))]
    if is_store(work / "synthetic-store"):
        syn = PatchStore(work / "synthetic-store")
        rows.append(("synthetic", np.asarray(syn.patches[: min(n, syn.n_spots)])))
    image_grid(rows, out / "samples_real_vs_synthetic.png", f"site {site}: real vs synthetic patches")
    eps = [h["epsilon"] for h in history if "epsilon" in h]
    lines = [
        f"# site {site}: local report (never leaves the site)",
        "",
        f"store: `{store.path}` ({store.n_spots} spots, {store.n_tiles} tiles, {len(store.panel)} genes)",
        "",
        f"DP epsilon spent in adaptation: {eps[-1]:.3g}" if eps else "DP: not used in adaptation",
        "",
        "| phase | round | metrics |",
        "|---|---|---|",
    ]
    for h in history:
        lines.append(
            f"| {h['phase']} | {h['round']} | "
            + ", ".join(f"{k}={v:.4g}" for k, v in h.items() if k not in ("phase", "round"))
            + " |"
        )
    lines += ["", "![samples](samples_real_vs_synthetic.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out
