"""The run's answer in one file: did the synthetic pairs help the data-limited site? (``headline.json``).

The product exists for the site with the fewest labelled spots, so the run's report, ``fedst demo``'s last lines
and ``headline.json`` lead with that site's real-only vs real+synthetic held-out PCC, next to the audit that says
whether its synthetic images show their expression. Built only from the per-site scalars the sites sent
(downstream and synthesize phases of results.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.results import RunRecord
from shared.io import write_json_atomic

HEADLINE_FILE = "headline.json"
HELPS_BY = 0.02
"""A gain below this many PCC points is within the seed-to-seed spread of the demo: "no clear effect"."""


def _pcc(metrics: dict[str, float], arm: str) -> float | None:
    for key in (f"{arm}-pcc_per_slide_mean", f"{arm}-pcc"):  # c2l's metric name, then the toy backend's
        if key in metrics:
            return float(metrics[key])
    return None


def headline(results: RunRecord) -> dict[str, Any] | None:
    """``{"limited_site", "verdict", "sites": {NAME: {labelled_fraction, labelled_spots, real_pcc, augmented_pcc,
    audit_real_pcc, audit_synthetic_pcc, audit_passed, epsilon}}}``; None before the downstream phase has results."""
    downstream = results.phases.get("downstream")
    scores = downstream.last.sites if downstream is not None and downstream.last is not None else {}
    if not scores:
        return None
    synthesize = results.phases.get("synthesize")
    audits = synthesize.last.sites if synthesize is not None and synthesize.last is not None else {}
    adapt = results.phases.get("adapt")
    adapted = adapt.last.sites if adapt is not None and adapt.last is not None else {}
    sites: dict[str, dict[str, Any]] = {}
    for name, metrics in sorted(scores.items()):
        audit = audits.get(name, {})
        passed = audit.get("audit-passed")
        sites[name] = {
            "labelled_fraction": float(metrics.get("labelled-fraction", 1.0)),
            "labelled_spots": int(metrics["labelled-spots"]) if "labelled-spots" in metrics else None,
            "real_pcc": _pcc(metrics, "real"),
            "augmented_pcc": _pcc(metrics, "augmented"),
            "audit_real_pcc": audit.get("audit-real-pcc"),
            "audit_synthetic_pcc": audit.get("audit-synthetic-pcc"),
            "audit_passed": None if passed is None else bool(passed),
            "epsilon": adapted.get(name, {}).get("epsilon"),  # the site's cumulative DP spend; None: DP off
        }
    limited = min(
        sites, key=lambda s: (sites[s]["labelled_spots"] or 0, sites[s]["labelled_fraction"], s)
    )  # the fewest labelled spots is what makes a site data-limited
    return {"limited_site": limited, "verdict": verdict(limited, sites[limited]), "sites": sites}


def verdict(name: str, site: dict[str, Any]) -> str:
    """One line a reader can act on."""
    real, augmented = site["real_pcc"], site["augmented_pcc"]
    share = f"{site['labelled_fraction']:.0%} labelled" + (
        f", {site['labelled_spots']} spots" if site["labelled_spots"] is not None else ""
    )
    if real is None or augmented is None:
        return f"{name} ({share}): no real+synthetic result (synthesis did not run)"
    gain = augmented - real
    audit = {True: "audit passed", False: "audit FAILED", None: "no audit"}[site["audit_passed"]]
    return (
        f"data-limited site {name} ({share}): held-out PCC real+synthetic {augmented:.3f} vs real-only {real:.3f} "
        f"({gain:+.3f}): {effect(gain)}; {audit}"
    )


def effect(gain: float) -> str:
    """What a real+synthetic minus real-only PCC difference means (the run report says it per site, too)."""
    if gain >= HELPS_BY:
        return "the synthetic pairs help"
    if gain <= -HELPS_BY:
        return "the synthetic pairs hurt"
    return f"no clear effect (|gain| < {HELPS_BY:g})"


def write_headline(run_dir: Path, results: RunRecord) -> dict[str, Any] | None:
    found = headline(results)
    if found is not None:
        write_json_atomic(Path(run_dir) / HEADLINE_FILE, found)
    return found


def headline_markdown(found: dict[str, Any]) -> list[str]:
    """The per-site table summary.md and the demo's output start with, the data-limited site first."""
    order = [found["limited_site"]] + sorted(s for s in found["sites"] if s != found["limited_site"])
    lines = [
        f"**{found['verdict']}**",
        "",
        "| site | labelled | real-only PCC | real+synthetic PCC | gain | audit: real / synthetic probe PCC | epsilon |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in order:
        s = found["sites"][name]
        gain = (
            f"{s['augmented_pcc'] - s['real_pcc']:+.3f}"
            if s["real_pcc"] is not None and s["augmented_pcc"] is not None
            else ""
        )
        audit = (
            f"{s['audit_real_pcc']:.3f} / {s['audit_synthetic_pcc']:.3f} "
            f"({'passed' if s['audit_passed'] else 'failed'})"
            if s["audit_real_pcc"] is not None and s["audit_synthetic_pcc"] is not None
            else ""
        )
        spots = f" ({s['labelled_spots']} spots)" if s["labelled_spots"] is not None else ""
        lines.append(
            f"| {name}{' (data-limited)' if name == found['limited_site'] else ''} | "
            f"{s['labelled_fraction']:.0%}{spots} | {_fmt(s['real_pcc'])} | {_fmt(s['augmented_pcc'])} | {gain} | "
            f"{audit} | {'DP off' if s['epsilon'] is None else format(s['epsilon'], '.3g')} |"
        )
    return lines


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
