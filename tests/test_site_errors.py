"""Nothing but the contract leaves a site, errors included (issue 13.2): a failing site's reply carries a fixed
code and category, the server stores only what it recognises, and the details stay in the site's own log —
checked on the codes, on the ClientApp guard, and in a real deployment with the c2l backend."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from flwr.app import Context, Error, RecordDict

from client.guard import SITE_ERROR_LOG, SiteFailure, error_category, guarded
from server.procs import free_port, start, stop_tree
from server.rounds import failure_reason
from server.superlink import REPO, SuperLink, supernode_command
from shared.c2l.toy import write_toy_store
from shared.contract import SITE_ERROR_CODES, site_error_category, site_error_reason
from shared.errors import ConfigError, FedstError, PanelMismatchError, PrivacyBudgetError

PANEL = [f"G{i}" for i in range(6)]


def test_codes_round_trip_and_forged_or_free_text_reasons_are_not_stored():
    for category, code in SITE_ERROR_CODES.items():
        reason = site_error_reason(category)
        assert reason == f"fedst-site-error {code} {category}"
        assert site_error_category(f"<class 'client.guard.SiteFailure'>:<'{reason}'>") == category  # Flower's wrap
    assert site_error_reason("made-up") == "fedst-site-error 19 internal"
    assert site_error_category("FileNotFoundError: /data/patient-17/slide.tif") == "unrecognised"
    assert site_error_category("fedst-site-error 10 panel-mismatch") == "unrecognised"  # code and name disagree
    assert site_error_category("") == "unrecognised"
    error = Error(code=2, reason="fedst-site-error 12 panel-mismatch /data/patient-17 has XIST")
    assert failure_reason(error) == "error: panel-mismatch (code 2)"  # only the category, never the trailing text
    dead = Error(code=5, reason="Error: Node Unavailable - The destination node is currently unavailable. ...")
    assert failure_reason(dead) == "error: node-unavailable (code 5)"  # Flower's own failures by their code's name


def test_exceptions_map_to_their_category():
    assert error_category(FedstError("x")) == "data-invalid"
    assert error_category(ConfigError("x")) == "config-invalid"
    assert error_category(PanelMismatchError("x")) == "panel-mismatch"
    assert error_category(PrivacyBudgetError("x")) == "privacy-budget"
    assert error_category(MemoryError()) == "out-of-memory"
    assert error_category(KeyError("spot-AAAC-1")) == "internal"


def test_guard_keeps_the_details_on_the_site(tmp_path):
    context = Context(
        run_id=7, node_id=1, node_config={"work-dir": str(tmp_path / "w")}, state=RecordDict(), run_config={}
    )
    msg = SimpleNamespace(metadata=SimpleNamespace(message_type="train.pretrain"))  # Message() needs a Flower task

    def broken(_msg, _context):
        raise PanelMismatchError("store /data/patient-17 has 'XIST' where the consortium has 'G5'")

    with pytest.raises(SiteFailure) as caught:
        guarded(broken, msg, context)
    assert str(caught.value) == "fedst-site-error 12 panel-mismatch" and caught.value.__cause__ is None
    local = (tmp_path / "w" / SITE_ERROR_LOG).read_text()
    assert "patient-17" in local and "train.pretrain run 7 failed (panel-mismatch)" in local and "Traceback" in local
    with pytest.raises(SiteFailure, match="^fedst-site-error 12 panel-mismatch$"):  # an inner guard's category stays
        guarded(lambda m, c: guarded(broken, m, c), msg, context)


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_in_deployment_with_c2l_a_failing_site_reveals_only_its_category(tmp_path):
    """Real SuperLink + 3 SuperNodes, c2l backend: one site's store has another gene panel and a revealing path.
    The run completes with the other two; results.json and the ServerApp's log (`flwr log`) hold the category only;
    the site's own log holds the details."""
    secret = "patient-XYZ-4711"
    stores = [
        write_toy_store(
            tmp_path / (secret if i == 2 else f"store-{i}"),
            n_spots=24,
            n_tiles=16,
            panel=[*PANEL[:-1], "XIST"] if i == 2 else PANEL,
            patch_px=32,
            seed=i,
            missing_gene_in_section_b=False,
        ).path
        for i in range(3)
    ]
    consortium = tmp_path / "consortium"
    consortium.mkdir()
    (consortium / "panel.txt").write_text("\n".join(PANEL) + "\n")
    started = []
    link = SuperLink(tmp_path / "flwr", simulation=False)
    try:
        with link:
            for i, store in enumerate(stores):
                node = {"data-path": str(store), "work-dir": str(tmp_path / f"work-{i}"), "site": f"site-{i}"}
                cmd = supernode_command(link.address, node, free_port())
                started.append(start(cmd, tmp_path / f"supernode-{i}.log", env=link.env))
            overrides = {
                "backend": "c2l",
                "preset": "tiny",
                "patch-px": 32,
                "phases": "pretrain",
                "pretrain.rounds": 1,
                "pretrain.steps": 1,
                "pretrain.batch-size": 2,
                "min-sites": 2,
                "failure-tolerance": 1,
                "paths.consortium": str(consortium),
                "out-dir": str(tmp_path / "runs"),
                "run-name": "deploy",
            }
            run_id = link.submit(REPO, overrides)
            info = link.wait(run_id, timeout=540)
            server_log = link.logs(run_id)
            assert info["status"] == "finished:completed", server_log[-3000:]
    finally:
        for proc in started:
            stop_tree(proc)
    saved = (tmp_path / "runs" / "deploy" / "results.json").read_text()
    results = json.loads(saved)
    (row,) = results["phases"]["pretrain"]["rounds"]
    assert sorted(row["sites"]) == ["site-0", "site-1"]
    assert list(row["failed"].values()) == ["error: panel-mismatch (code 2)"]
    for text in (saved, server_log):
        assert secret not in text and "XIST" not in text
    local = (tmp_path / "work-2" / SITE_ERROR_LOG).read_text()
    assert secret in local and "'XIST' where the consortium has 'G5'" in local
