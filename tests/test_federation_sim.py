"""The main job's path for real: `fedst demo` runs a Flower simulation (private SuperLink, 3 SuperNodes) of the
whole workflow on the generated consortium, and leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.results import load_results

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if text in cmdline and state[state.rfind(")") + 2] != "Z":
                found.append(int(entry))
    return found


def _demo(out: Path) -> subprocess.CompletedProcess:
    argv = ["demo", "--backend", "toy", "--sites", "3", "--rounds", "2", "--out", str(out)]
    return subprocess.run(
        [sys.executable, "-m", "shared.cli.main", *argv], cwd=REPO, capture_output=True, text=True, timeout=380
    )


def _site_metrics(results) -> dict:
    """Every per-site metric of every round, without the wall-clock ones."""
    return {
        (phase, row.round, site, key): value
        for phase, block in results.phases.items()
        for row in block.rounds
        for site, metrics in row.sites.items()
        for key, value in metrics.items()
        if "seconds" not in key
    }


@pytest.mark.timeout(800)
def test_fedst_demo_simulation_runs_every_phase_twice_in_one_folder_with_the_same_numbers(tmp_path):
    out = tmp_path / "demo"
    runs = []
    for attempt in range(2):  # a re-run in the same folder reuses its Flower home and consortium
        done = _demo(out)
        assert done.returncode == 0, f"run {attempt + 1}: " + done.stdout[-3000:] + done.stderr[-3000:]
        assert "pretrain round 2: 3 sites" in done.stdout and "downstream: done on 3 sites" in done.stdout
        # live progress read from the sites' progress.json: a line per phase round with each site's steps
        assert re.search(r"\] (pretrain|adapt) round [12]/2: site-\d", done.stdout), done.stdout[-3000:]
        report = Path(done.stdout.split("[fedst demo] report: ")[1].splitlines()[0])
        assert report.is_file() and report.parent.parent == out / "runs"
        runs.append(load_results(report.parent / "results.json"))
    first, second = runs
    assert first.run_dir != second.run_dir
    for results in runs:
        assert results.status == "completed" and results.config["backend"] == "toy"
        assert results.config["pretrain.rounds"] == 2  # `--rounds` reached the apps through `flwr run -c`
        assert set(results.phases) == {"pretrain", "adapt", "synthesize", "downstream"}
        assert len(results.phases["downstream"].last.sites) == 3
        assert all(len(r.sites) == 3 for r in results.phases["pretrain"].rounds)
    # the first site is the data-limited one (25% of its training spots labelled); the run's answer leads the
    # output and headline.json, from the sites' own scalars
    headline = json.loads((Path(first.run_dir) / "headline.json").read_text())
    assert headline["limited_site"] == "site-0" and set(headline["sites"]) == {"site-0", "site-1", "site-2"}
    limited, full = headline["sites"]["site-0"], headline["sites"]["site-1"]
    assert limited["labelled_fraction"] == 0.25 and full["labelled_fraction"] == 1.0
    assert limited["labelled_spots"] < 0.3 * full["labelled_spots"]
    assert {"real_pcc", "augmented_pcc", "audit_real_pcc", "audit_synthetic_pcc", "audit_passed"} <= set(limited)
    assert f"data-limited site site-0 (25% labelled, {limited['labelled_spots']} spots)" in done.stdout
    assert (Path(first.run_dir) / "summary.md").read_text().splitlines()[4].startswith("**data-limited site site-0")
    # same seed, same numbers: every per-site metric of every phase is bit-identical across the two runs
    assert _site_metrics(first) == _site_metrics(second) and len(_site_metrics(first)) > 30
    # each simulated site prepared its store from its SITE.toml into its own work dir and wrote its report
    site_reports = sorted((out / "sites").glob("*/*/report/report.md"))
    assert len(site_reports) == 6
    assert not _processes_mentioning(str(out))  # the private SuperLink and its children are gone
