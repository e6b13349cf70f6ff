"""The consortium workflow on the server: pretrain -> adapt -> synthesize -> downstream, one Flower run.

Each phase is its own message action (``train.pretrain``, ``train.adapt``, ``query.synthesize``,
``evaluate.downstream``). Training phases run through a fedst strategy (server/strategy.py) and checkpoint
after every round; the other phases broadcast one message and collect scalar metrics per site. With
``secagg = true`` pretraining instead runs through Flower's legacy SecAgg+ workflow (server/secagg.py, plain
``train`` messages, given a narrow `SecAggContext`, not this class), then the other phases continue here on the
message API, in the same Flower run. Every path sorts a round's replies through one bookkeeping
(server/rounds.py) into the typed run record that becomes results.json (server/results.py). Sites are labelled by
the names they declare (server/sites.py).
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from server.checkpoint import claim_run_dir, load_checkpoint, save_checkpoint
from server.report import write_run_report
from server.results import PhaseRecord, RoundRecord, RunRecord, rounds_from_json, rounds_to_json, save_results
from server.rounds import RoundPolicy, RoundTally, failure_reason, wait_for_sites, weighted
from server.secagg import SecAggContext, secagg_train
from server.sites import SiteNames, answering_node, contract_problems
from server.strategy import arrays_to_numpy, make_strategy, numpy_to_arrays
from shared.backends import create_backend
from shared.config import RunConfig
from shared.errors import FedstError
from shared.io import write_json_atomic


def resolve_run_dir(run: RunConfig, run_id: int | str) -> Path:
    name = run.paths.run_name or f"run-{run_id}"
    return (Path(run.paths.out_dir).expanduser() / name).absolute()


def load_panel(run: RunConfig) -> list[str] | None:
    """The consortium gene panel (ordered), from ``consortium/panel.txt`` when a consortium is configured."""
    if not run.paths.consortium:
        return None
    path = Path(run.paths.consortium) / "panel.txt"
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def initial_central(run: RunConfig) -> dict[str, np.ndarray]:
    """The initial pretraining state: fresh (seeded), or from the warm-start weights the operator named."""
    if run.paths.warm_start:
        path = Path(run.paths.warm_start).expanduser()
        if not path.exists():
            raise FedstError(f"run config 'paths.warm-start': {path} does not exist")
        from safetensors.numpy import load_file

        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file():
            candidates = sorted(path.glob("*.safetensors")) if path.is_dir() else []
            if not candidates:
                raise FedstError(f"run config 'paths.warm-start': no .safetensors weights in {path}")
            file = candidates[0]
        state = load_file(str(file))
        backend = create_backend(run.backend, run)
        expected = backend.sampling_state(_fresh_central(run))
        problems = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
        if problems or set(state) != set(expected):
            raise FedstError(
                f"run config 'paths.warm-start': {file} does not match the {run.backend}/{run.preset} model "
                f"(first mismatching tensor: {(problems or sorted(set(state) ^ set(expected)))[0]!r})"
            )
        return backend.training_state({k: state[k] for k in expected})
    return _fresh_central(run)


def _fresh_central(run: RunConfig) -> dict[str, np.ndarray]:
    return create_backend(run.backend, run).initial_state(run.seed)


def initial_adapter(run: RunConfig, central: dict[str, np.ndarray], panel: list[str] | None) -> dict[str, np.ndarray]:
    if panel is None:
        raise FedstError(
            "run config 'adapt.federated' needs the consortium panel (set 'paths.consortium' to a folder with "
            "panel.txt)"
        )
    return create_backend(run.backend, run).initial_adapter(central, panel)


class Workflow:
    """Runs the configured phases against a Flower Grid and writes the run directory."""

    def __init__(self, grid: Grid, run: RunConfig, run_dir: Path, run_id: int | str = 0):
        self.grid = grid
        self.run = run
        self.run_dir = run_dir
        self.run_id = run_id
        self.panel = load_panel(run)
        self.sites = SiteNames()
        self.results = RunRecord(run=str(run_id), config=run.to_dict(), run_dir=str(run_dir))

    # -- helpers ------------------------------------------------------------------------------------------
    def base_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"default-work-root": str(self.run_dir / "sites")}
        if self.panel is not None:
            config["panel"] = list(self.panel)
        return config

    def wait_for_sites(self, what: str) -> list[int]:
        """The sites connected now, at least ``min-sites`` of them within ``round-timeout`` (else FedstError)."""
        return wait_for_sites(self.grid, self.run.min_sites, self.run.round_timeout, what)

    def save_results(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.results.sites = self.sites.table()
        save_results(self.run_dir, self.results)

    # -- phases -------------------------------------------------------------------------------------------
    def run_all(self) -> RunRecord:
        claim_run_dir(self.run_dir, self.run.phase_list[0], resume=self.run.resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "resolved-config.json", self.run.to_dict())
        central: dict[str, np.ndarray] | None = None
        try:
            for phase in self.run.phase_list:
                started = time.perf_counter()
                log(INFO, "fedst: phase %s", phase)
                if phase == "pretrain":
                    central = self.pretrain()
                elif phase == "adapt":
                    central = central if central is not None else self._latest_central()
                    self.adapt(create_backend(self.run.backend, self.run).sampling_state(central))
                elif phase == "synthesize":
                    self.broadcast(phase, "query.synthesize", RecordDict())
                elif phase == "downstream":
                    self.broadcast(phase, "evaluate.downstream", RecordDict())
                self.results.timing[phase] = time.perf_counter() - started
                self.save_results()
            self.results.status = "completed"
        except Exception as exc:
            self.results.status = "failed"
            self.results.error = str(exc)
            raise
        finally:
            self.results.sites = self.sites.table()
            write_run_report(self.run_dir, self.results)
        return self.results

    def _latest_central(self) -> dict[str, np.ndarray]:
        """The central model adaptation starts from when pretraining did not run in this process."""
        found = self._resumed("pretrain")
        return found[1] if found else initial_central(self.run)

    def _resumed(self, phase: str) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]] | None:
        """The newest checkpoint of ``phase`` when resuming, refused when the run config changed; else None."""
        if not self.run.resume or (found := load_checkpoint(self.run_dir, phase)) is None:
            return None
        meta = found[3]
        if meta.get("fingerprint") != self.run.fingerprint():
            changed = sorted(
                k for k in self.run.fingerprint() if meta.get("fingerprint", {}).get(k) != self.run.fingerprint()[k]
            )
            raise FedstError(f"resume: run config differs from the checkpoint's in {changed} ({self.run_dir})")
        return found

    def resume_point(
        self, phase: str
    ) -> tuple[int, dict[str, np.ndarray] | None, dict[str, np.ndarray], list[RoundRecord]]:
        """(completed rounds, model, optimiser state, round records) of the last checkpoint when resuming."""
        if (found := self._resumed(phase)) is None:
            return 0, None, {}, []
        offset, arrays, opt_state, meta = found
        log(INFO, "fedst: resuming %s after round %d", phase, offset)
        return (
            offset,
            arrays,
            opt_state,
            rounds_from_json(meta.get("history", []), self.run_dir / "checkpoints" / phase),
        )

    def checkpoint(
        self, phase: str, global_round: int, arrays: dict[str, np.ndarray], opt_state: dict[str, np.ndarray]
    ) -> None:
        """After every round: the model, optimiser state and the phase's round records on disk, results.json."""
        save_checkpoint(
            self.run_dir,
            phase,
            global_round,
            arrays,
            opt_state,
            {"fingerprint": self.run.fingerprint(), "history": rounds_to_json(self.results.phases[phase].rounds)},
        )
        self.save_results()

    def train_phase(
        self,
        phase: str,
        rounds: int,
        initial: dict[str, np.ndarray],
        extra_records: dict[str, Any] | None = None,
        strategy_kind: str = "pretrain",
    ) -> dict[str, np.ndarray]:
        """R rounds of `phase` through the strategy; checkpoint each round; resume from the last checkpoint."""
        nodes = self.wait_for_sites(phase)
        offset, resumed, opt_state, history = self.resume_point(phase)
        arrays = resumed if resumed is not None else initial
        block = self.results.phases[phase] = PhaseRecord(kind="train", rounds=history)
        if phase == "pretrain" and self.run.secure_aggregation.enabled:
            block.secure_aggregation = "SecAgg+"
            context = SecAggContext(
                grid=self.grid,
                run=self.run,
                run_id=int(self.run_id or 0),
                nodes=nodes,
                sites=self.sites,
                site_config=self.base_config(),
                round_offset=offset,
                checkpoint=lambda global_round, weights: self.checkpoint(phase, global_round, weights, {}),
                record=block.rounds.append,
            )
            return secagg_train(context, rounds, arrays)
        strategy = make_strategy(self.run, strategy_kind)
        strategy.import_state(opt_state)
        strategy.setup_phase(
            phase,
            self.run,
            round_offset=offset,
            extra_records=extra_records,
            extra_config=self.base_config(),
            sites=self.sites,
            record=block.rounds.append,
        )
        remaining = rounds - offset
        if remaining <= 0:
            return arrays

        def checkpoint(server_round: int, current: ArrayRecord):
            if server_round > 0:
                self.checkpoint(phase, server_round + offset, arrays_to_numpy(current), strategy.export_state())
            return None

        result = strategy.start(
            grid=self.grid,
            initial_arrays=numpy_to_arrays(arrays),
            num_rounds=remaining,
            timeout=self.run.round_timeout,
            train_config=ConfigRecord(),
            evaluate_fn=checkpoint,
        )
        return arrays_to_numpy(result.arrays)

    def pretrain(self) -> dict[str, np.ndarray]:
        return self.train_phase("pretrain", self.run.pretrain.rounds, initial_central(self.run))

    def adapt(self, central: dict[str, np.ndarray]) -> None:
        if self.run.adapt.federated:
            adapter = initial_adapter(self.run, central, self.panel)
            final = self.train_phase(
                "adapt",
                self.run.adapt.rounds,
                adapter,
                extra_records={"central": numpy_to_arrays(central)},
                strategy_kind="adapt",
            )
            from safetensors.numpy import save_file

            save_file(final, str(self.run_dir / "federated-adapter.safetensors"))
            return
        self.broadcast("adapt", "train.adapt", RecordDict({"central": numpy_to_arrays(central)}))

    def broadcast(self, phase: str, message_type: str, content: RecordDict) -> RoundRecord:
        """Send one message to every site; the phase's one round record (per-site scalar metrics, failures)."""
        nodes = self.wait_for_sites(phase)
        content["config"] = ConfigRecord(self.base_config())
        messages = [Message(content=content, message_type=message_type, dst_node_id=node) for node in nodes]
        block = self.results.phases[phase] = PhaseRecord(kind="broadcast")
        tally = RoundTally(message_type, 1, nodes, self.sites.label)
        replies = list(self.grid.send_and_receive(messages, timeout=self.run.round_timeout))
        for node, msg in sorted(((answering_node(m, messages), m) for m in replies), key=lambda pair: pair[0]):
            if msg.has_error():
                tally.fail(node, failure_reason(msg.error))
                continue
            self.sites.learn(node, msg.content)
            problems = contract_problems(msg.content, arrays=0, phase=phase)
            if problems:
                tally.fail(node, "privacy contract (reply discarded): " + "; ".join(problems))
            else:
                record = next(iter(msg.content.metric_records.values()), {})
                tally.accept(node, {k: float(v) for k, v in record.items()})
        row = tally.close(RoundPolicy.from_run(self.run), block.rounds.append)
        row.aggregate = weighted(row.sites)
        return row
