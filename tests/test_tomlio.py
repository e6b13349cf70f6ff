"""Every TOML fedst writes goes through tomli-w: paths with quotes and backslashes round-trip through tomllib."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
from flwr.common.config import parse_config_args

from server.demo import her2st_consortium
from server.experiment.config import ResolvedSite
from server.experiment.data import write_site_toml
from server.superlink import add_connection, supernode_command, write_overrides
from shared.synthetic.consortium import _site_table
from shared.tomlio import dumps, value, write_toml

AWKWARD = 'a "quoted" dir\\with back\\slash'


def test_a_path_with_a_quote_round_trips(tmp_path: Path):
    path = tmp_path / AWKWARD / "x.h5ad"
    table = {"site": 'st"e', "panel": path, "sections": [{"id": "A", "image": path, "mpp": 0.72}]}
    written = write_toml(tmp_path / "site.toml", table)
    assert tomllib.loads(written.read_text()) == {
        "site": 'st"e',
        "panel": str(path),
        "sections": [{"id": "A", "image": str(path), "mpp": 0.72}],
    }
    assert tomllib.loads(f"k = {value(path)}") == {"k": str(path)}
    assert [value(v) for v in (True, 3, 0.5)] == ["true", "3", "0.5"]


def test_write_toml_keeps_an_unchanged_file(tmp_path: Path):
    path = write_toml(tmp_path / "a.toml", {"x": 1})
    before = path.stat().st_mtime_ns
    write_toml(path, {"x": 1})
    assert path.stat().st_mtime_ns == before
    write_toml(path, {"x": 2})
    assert tomllib.loads(path.read_text()) == {"x": 2}


def test_site_toml_writers_survive_awkward_paths(tmp_path: Path):
    base = tmp_path / AWKWARD
    site = ResolvedSite(
        name="site-0",
        sections=({"id": "S0", "format": "hest", "h5ad": str(base / "S0.h5ad"), "image": str(base / "S0.tif")},),
        held_out=("S0",),
    )
    written = write_site_toml(site, tmp_path / "exp" / "site.toml", base / "panel.txt")
    assert tomllib.loads(written.read_text()) == {
        "site": "site-0",
        "panel": str(base / "panel.txt"),
        "sections": [dict(site.sections[0])],
    }

    data = tmp_path / AWKWARD / "her2st"
    for sub in ("counts", "spots", "images"):
        (data / sub).mkdir(parents=True)
    np.save(data / "histogene_genes.npy", np.array(["ERBB2", "GRB7"], dtype=object))
    out = her2st_consortium(data, tmp_path / "consortium", 2)
    parsed = tomllib.loads((out / "site-1" / "site.toml").read_text())
    assert parsed["site"] == "her2st-1" and parsed["panel"] == "../panel.txt"
    assert [s["id"] for s in parsed["sections"]] == ["C4", "C5", "C6"]
    assert parsed["sections"][0]["counts"] == str(data / "counts" / "C4.tsv.gz")
    assert "mpp" not in parsed["sections"][0]  # each section's ST-pitch fit, as `fedst data inspect` reports it

    assert tomllib.loads(dumps(_site_table("site-0", ["S0A"]))) == {
        "site": "site-0",
        "panel": "../panel.txt",
        "sections": [{"id": "S0A", "format": "hest", "h5ad": "S0A.h5ad", "image": "S0A.tif"}],
    }


def test_flower_files_and_flags_survive_awkward_paths(tmp_path: Path):
    path = tmp_path / AWKWARD
    overrides = write_overrides(tmp_path / "overrides.toml", {"data-path": str(path), "num-server-rounds": 2})
    assert tomllib.loads(overrides.read_text()) == {"data-path": str(path), "num-server-rounds": 2}
    add_connection(tmp_path / "home", "local", "127.0.0.1:9093", path / "ca.pem")
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert config["superlink"]["local"] == {"address": "127.0.0.1:9093", "root-certificates": str(path / "ca.pem")}
    # Flower's --node-config parser splits on a regex that allows no quote inside a quoted value: test spaces
    # and backslashes, which it does carry.
    spaced = tmp_path / "a dir\\with back\\slash"
    cmd = supernode_command("127.0.0.1:9092", {"site": "site-0", "data-path": str(spaced), "rounds": 2}, 9100)
    pairs = cmd[cmd.index("--node-config") + 1]
    assert parse_config_args([pairs]) == {"site": "site-0", "data-path": str(spaced), "rounds": 2}


def test_add_connection_twice_keeps_one_valid_table_per_name(tmp_path):
    """`fedst demo` re-run in one folder used to append a second [superlink.fedst-demo] (invalid TOML for flwr)."""
    add_connection(tmp_path, "fedst-demo", "127.0.0.1:1111")
    add_connection(tmp_path, "fedst-demo", "127.0.0.1:2222")
    add_connection(tmp_path, "tls", "127.0.0.1:3333", root_certificates=tmp_path / 'ca "x".crt')
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"] == {
        "default": "fedst-demo",
        "fedst-demo": {"address": "127.0.0.1:2222", "insecure": True},
        "tls": {"address": "127.0.0.1:3333", "root-certificates": str(tmp_path / 'ca "x".crt')},
    }
