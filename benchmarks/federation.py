"""Federation overhead benchmark: where the time of a federated round goes, and how many bytes move.

For the `tiny` C2L-ST preset and the ~25M-parameter `base` preset (at 32 px so it runs on CPU):
- serialisation: state dict -> ArrayRecord -> Flower protobuf bytes and back (time, bytes per message);
- per-round wall time in a Flower simulation and in a loopback deployment (SuperLink + SuperNodes as
  processes), split into local compute (measured inside the site task) and the rest (communication,
  serialisation, ClientApp process start + imports, scheduling) = overhead;
- bytes per round per site (Flower's own network-traffic counters, `flwr ls`);
- per-message ClientApp overhead in deployment (a fresh process per message): the import cost of the handler.

Ratios are against the local compute measured in the same run (never absolute wall-clock targets).
Usage: python benchmarks/federation.py [--models tiny,base] [--modes simulation,deployment] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def serialisation(preset: str, patch_px: int = 32) -> dict:
    import numpy as np
    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from server.strategy import numpy_to_arrays
    from shared.federation.c2l_backend import C2LBackend

    state = C2LBackend(preset, patch_px).initial_state(0)
    params = int(sum(v.size for v in state.values()))
    t0 = time.perf_counter()
    content = RecordDict({"arrays": numpy_to_arrays(state), "metrics": MetricRecord({"num-examples": 1.0}),
                          "config": ConfigRecord({"server-round": 1})})
    blob = recorddict_to_proto(content).SerializeToString()
    t1 = time.perf_counter()
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(blob)
    back = recorddict_from_proto(proto)
    restored = {k: v.numpy() for k, v in back["arrays"].items()}
    t2 = time.perf_counter()
    assert all(np.array_equal(restored[k], state[k]) for k in state)
    return {"preset": preset, "parameters": params, "message-bytes": len(blob), "encode-s": t1 - t0, "decode-s": t2 - t1}


def import_cost() -> dict:
    """Fresh-process cost of what a ClientApp message pays in deployment before any work."""
    out = {}
    for label, code in {
        "python": "pass",
        "flwr-clientapp-module": "import client.app",
        "handler-and-site": "import client.app, client.handlers, shared.federation.site",
        "plus-torch-and-c2l": "import client.handlers, shared.federation.c2l_backend, torch, shared.c2l.train, shared.c2l.adapt",
    }.items():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
        out[label] = time.perf_counter() - t0
    return out


def federated_rounds(mode: str, preset: str, rounds: int, work: Path, sites: int = 2) -> dict:
    """A pretrain-only run; per round: wall (server send -> all replies), max site compute, overhead."""
    from shared.federation import toy
    from shared.federation.procs import free_port, start, stop_tree
    from shared.federation.runner import SuperLink, supernode_command

    stores = [toy.write_toy_store(work / f"store-{i}", n_spots=64, n_tiles=64, patch_px=32, seed=i).path for i in range(sites)]
    consortium = work / "consortium"
    for i, store in enumerate(stores):
        (consortium / f"site-{i}").parent.mkdir(parents=True, exist_ok=True)
        if not (consortium / f"site-{i}").exists():
            (consortium / f"site-{i}").symlink_to(store)
    config = {"backend": "c2l", "preset": preset, "patch-px": 32, "phases": "pretrain", "rounds-pretrain": rounds,
              "local-steps": 2, "batch-size": 4, "out-dir": str(work / "runs"), "run-name": f"{mode}-{preset}",
              "min-sites": sites, "sites-root": str(work / "sites"), "max-update-norm": 1e9}
    procs = []
    t0 = time.perf_counter()
    with SuperLink(work / f"flwr-{mode}-{preset}", simulation=(mode == "simulation")) as link:
        try:
            if mode == "simulation":
                config["consortium"] = str(consortium)
                run_id = link.submit(REPO, config, federation_config=f"num_supernodes={sites} client_resources_num_cpus=1")
            else:
                for i, store in enumerate(stores):
                    cmd = supernode_command(link.address, {"data-path": str(store), "work-dir": str(work / f"site-{mode}-{i}")}, free_port())
                    procs.append(start(cmd, work / f"supernode-{i}.log", env=link.env))
                run_id = link.submit(REPO, config)
            info = link.wait(run_id, timeout=3000)
        finally:
            for proc in procs:
                stop_tree(proc)
    total = time.perf_counter() - t0
    results = json.loads((work / "runs" / config["run-name"] / "results.json").read_text())
    rows = results["phases"]["pretrain"]["rounds"]
    per_round = []
    for row in rows:
        compute = max(m["compute-seconds"] for m in row["sites"].values())
        per_round.append({"round": row["round"], "wall-s": row["wall-seconds"], "compute-s": compute,
                          "overhead-s": row["wall-seconds"] - compute,
                          "overhead-fraction": (row["wall-seconds"] - compute) / row["wall-seconds"]})
    traffic = info.get("network-traffic", {})
    return {"mode": mode, "preset": preset, "sites": sites, "status": info.get("status"), "run-total-s": total,
            "rounds": per_round, "bytes-per-round-per-site": traffic.get("total-bytes", 0) / max(rounds * sites, 1),
            "network-traffic": traffic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,base")
    parser.add_argument("--modes", default="simulation,deployment")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args()
    report: dict = {"device": "cpu", "serialisation": [], "rounds": [], "clientapp-imports-s": import_cost()}
    print("fresh-process import cost per ClientApp message (s):", json.dumps(report["clientapp-imports-s"]))
    for preset in args.models.split(","):
        ser = serialisation(preset)
        report["serialisation"].append(ser)
        print(f"[{preset}] {ser['parameters']:,} params; message {ser['message-bytes'] / 1e6:.1f} MB; "
              f"encode {ser['encode-s'] * 1e3:.0f} ms, decode {ser['decode-s'] * 1e3:.0f} ms")
    with tempfile.TemporaryDirectory(prefix="fedst-bench-") as tmp:
        for preset in args.models.split(","):
            for mode in args.modes.split(","):
                res = federated_rounds(mode, preset, args.rounds, Path(tmp) / f"{mode}-{preset}")
                report["rounds"].append(res)
                for row in res["rounds"]:
                    print(f"[{preset} {mode}] round {row['round']}: wall {row['wall-s']:.1f} s = compute {row['compute-s']:.1f} s"
                          f" + overhead {row['overhead-s']:.1f} s ({100 * row['overhead-fraction']:.0f}% of the round)")
                print(f"[{preset} {mode}] bytes per round per site: {res['bytes-per-round-per-site'] / 1e6:.2f} MB; status {res['status']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report: {args.out}")


if __name__ == "__main__":
    main()
