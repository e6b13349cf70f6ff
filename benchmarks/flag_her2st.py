"""FLAG vs ridge on the same features, her2st patient C leave-one-section-out (issue 15 item 1).

Same protocol as ``benchmarks/her2st_predictors.py`` (whose loader, HVG panel, targets and PCC it imports):
train on four of C2-C6, test on the fifth, top-50 HVGs chosen on the training sections, per-slide per-gene PCC
with zero-variance genes as 0, GSC, SSC (6-NN row-standardised Moran weights) and MSE. In every fold, ridge
(section-out alpha) and each FLAG variant are trained through ``train_predictor_on_batch`` on the SAME encoder
features, computed once per section.

    python benchmarks/flag_her2st.py                      # the ablation table of docs/benchmarks.md
    python benchmarks/flag_her2st.py --variants default,seed=1,seed=2 --folds C2,C4 --out flag.json

A variant is ``TOKEN[+TOKEN...]``: ``default`` (FlagSettings defaults), ``no-graph`` (``use_graph=False``: each
spot sees only itself), ``no-edge`` (``use_edge_conditions=False``), ``samples=N`` (``n_samples``),
``steps=N`` (training steps), ``sample-steps=N``, any other ``FlagSettings`` field as ``field=value``, and
``model.KEY=value`` for a FlagModel config override. Writes the table as JSON (``--out``) and a per-fold PNG
beside it (PCC per fold, ridge as black ticks).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from her2st_predictors import DATA, N_GENES, SECTIONS, fold_scores, hvg_panel, load_section, targets  # noqa: E402

ABLATIONS = (  # the paper's formulation as first implemented, its fixes one at a time, then ablations of the default
    "precondition=eps+predict=sample+steps=400",
    "precondition=eps+predict=sample+steps=400+samples=16",
    "precondition=eps+predict=mean+steps=400",
    "predict=sample",
    "default",
    "no-graph",
    "no-edge",
    "steps=400",
    "steps=2400",
    "samples=1",
)
METRICS = ("pcc", "gsc", "ssc", "mse", "mse_train_mean")
SHORTHAND = {
    "no-graph": ("model.use_graph", False),
    "no-edge": ("model.use_edge_conditions", False),
}
RENAME = {"samples": "n_samples", "sample-steps": "sample_steps"}


def _value(text: str) -> object:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variant(spec: str) -> dict:
    """``no-graph+steps=800`` -> FlagSettings keyword arguments (``model`` holds FlagModel overrides)."""
    from shared.downstream.flag import FlagSettings

    fields = {f.name for f in dataclasses.fields(FlagSettings)}
    kw: dict = {}
    model: dict = {}
    for token in spec.split("+"):
        if token in ("", "default"):
            continue
        if token in SHORTHAND:
            key, value = SHORTHAND[token]
        else:
            key, sep, text = token.partition("=")
            if not sep:
                raise SystemExit(f"variant {spec!r}: unknown token {token!r}")
            key, value = RENAME.get(key, key), _value(text)
        if key.startswith("model."):
            model[key[len("model.") :]] = value
        elif key in fields:
            kw[key] = value
        else:
            raise SystemExit(f"variant {spec!r}: {key!r} is not a FlagSettings field")
    if model:
        kw["model"] = model
    return kw


def run_fold(
    data: dict[str, dict], feats: dict[str, np.ndarray], test: str, variants: list[str], encoder: str
) -> dict[str, dict[str, float]]:
    """{method: metrics} for one held-out section: ridge first, then each FLAG variant."""
    from shared.downstream.predictor import SpotBatch, train_predictor_on_batch

    train_names = [s for s in SECTIONS if s != test]
    panel = hvg_panel([data[s] for s in train_names], train_names)

    def batch(names: list[str]) -> tuple[SpotBatch, np.ndarray]:
        b = SpotBatch(
            patches=None,
            coords=np.concatenate([data[s]["coords"] for s in names]),
            sections=np.concatenate([[s] * len(data[s]["coords"]) for s in names]).astype(object),
            mpp={s: float(data[s]["mpp"]) for s in names},
            features=np.concatenate([feats[s] for s in names]),
        )
        return b, np.concatenate([targets(data[s], panel) for s in names])

    train_batch, Y = batch(train_names)
    test_batch, truth = batch([test])
    out: dict[str, dict[str, float]] = {}
    for name in ["ridge", *variants]:
        t0 = time.time()
        kind, kw = ("ridge", {}) if name == "ridge" else ("flag", parse_variant(name))
        predictor = train_predictor_on_batch(train_batch, Y, panel, kind, encoder, progress=False, **kw)
        out[name] = {
            **fold_scores(predictor.predict(test_batch), truth, Y, test_batch.coords),
            "seconds": time.time() - t0,
        }
        r = out[name]
        print(
            f"  {test} {name:50s} PCC {r['pcc']:.3f} GSC {r['gsc']:.3f} SSC {r['ssc']:.3f} MSE {r['mse']:.3f} "
            f"({r['seconds']:.0f} s)",
            flush=True,
        )
    return out


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def summarise(folds: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict]:
    """{method: {metric: (mean, sd), 'pcc_ratio': mean over folds of PCC / ridge PCC, 'wins': folds > ridge}}."""
    methods = list(next(iter(folds.values())))
    out = {}
    for m in methods:
        s = {k: _mean_sd([folds[t][m][k] for t in folds]) for k in (*METRICS, "seconds")}
        ridge = [folds[t]["ridge"]["pcc"] for t in folds]
        s["pcc_ratio"] = float(np.mean([folds[t][m]["pcc"] for t in folds]) / np.mean(ridge))
        s["wins"] = int(sum(folds[t][m]["pcc"] > folds[t]["ridge"]["pcc"] for t in folds))
        out[m] = s
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def plot(folds: dict[str, dict[str, dict[str, float]]], summary: dict[str, dict], png: Path) -> None:
    """PCC per fold for each FLAG variant (bars) with the same fold's ridge PCC as a black tick on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    tests = list(folds)
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(methods) + 2), 5.2))
    width = 0.8 / len(tests)
    colours = plt.get_cmap("tab10")
    for i, t in enumerate(tests):
        x = np.arange(len(methods)) + (i - (len(tests) - 1) / 2) * width
        ax.bar(x, [folds[t][m]["pcc"] for m in methods], width, color=colours(i), label=f"test {t}")
        ax.hlines([folds[t]["ridge"]["pcc"]] * len(methods), x - width / 2, x + width / 2, color="k", lw=2)
    ridge = summary["ridge"]["pcc"][0]
    ax.axhline(ridge, color="k", ls="--", lw=1)
    ax.axhline(0, color="grey", lw=0.5)
    labels = [
        f"{m.replace('+', chr(10))}\n{summary[m]['pcc'][0]:.3f} ({summary[m]['pcc_ratio']:.2f}x ridge)" for m in methods
    ]
    ax.set_xticks(np.arange(len(methods)), labels, fontsize=7)
    ax.set_ylabel("mean per-gene PCC, held-out section")
    ax.set_title(
        f"FLAG vs ridge on the same features (her2st C, LOSO)\nblack tick = ridge in that fold; dashed = ridge mean "
        f"{ridge:.3f}",
        fontsize=9,
    )
    top = max(f[m]["pcc"] for f in folds.values() for m in methods)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), max(top, 0.2) * 1.3)
    ax.legend(fontsize=7, ncol=len(tests), loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(ABLATIONS))
    ap.add_argument("--encoder", default="stats")
    ap.add_argument("--folds", default=",".join(SECTIONS), help="held-out sections to run (default all five)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fedst-bench" / "her2st-C")
    ap.add_argument("--out", type=Path, default=Path("flag_her2st.json"))
    ap.add_argument("--replot", type=Path, help="only redraw the PNG of an earlier run's JSON")
    ap.add_argument("--jobs", type=int, default=2, help="folds run in parallel, one torch thread each (2 cores)")
    args = ap.parse_args()
    if args.replot:
        payload = json.loads(args.replot.read_text())
        plot(payload["folds"], payload["summary"], args.replot.with_suffix(".png"))
        return
    if not DATA.is_dir() and not args.cache.is_dir():
        raise SystemExit(f"{DATA}: her2st data not found (../shared/data beside the repository)")
    from shared.downstream.encoders import create_encoder

    t0 = time.time()
    data = {s: load_section(s, args.cache) for s in SECTIONS}
    encoder = create_encoder(args.encoder)
    feats = {s: encoder.embed(d["patches"]) for s, d in data.items()}
    print(f"data + {args.encoder} features: {sum(len(f) for f in feats.values())} spots ({time.time() - t0:.0f} s)")
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        parse_variant(v)  # fail before any training
    tests = args.folds.split(",")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_one_thread) as pool:
        jobs = {t: pool.submit(run_fold, data, feats, t, variants, args.encoder) for t in tests}
        folds = {t: jobs[t].result() for t in tests}
    summary = summarise(folds)
    print(
        f"\nher2st patient C, LOSO over {', '.join(folds)}, top-{N_GENES} HVGs, encoder {args.encoder}, "
        f"{dt.date.today()}"
    )
    w = max(40, *(len(m) for m in summary))
    print(
        f"{'method':{w}s} {'PCC':>14s} {'xridge':>6s} {'wins':>4s} {'GSC':>6s} {'SSC':>6s} {'MSE':>6s} {'s/fold':>6s}"
    )
    for m, s in summary.items():
        print(
            f"{m:{w}s} {s['pcc'][0]:.3f} +- {s['pcc'][1]:.3f} {s['pcc_ratio']:6.2f} {s['wins']:4d} {s['gsc'][0]:6.3f} "
            f"{s['ssc'][0]:6.3f} {s['mse'][0]:6.3f} {s['seconds'][0]:6.0f}"
        )
    print(
        f"{'(predicting the training mean)':{w}s} {'':14s} {'':6s} {'':4s} {'':6s} {'':6s} "
        f"{summary['ridge']['mse_train_mean'][0]:6.3f}"
    )
    payload = {"date": str(dt.date.today()), "encoder": args.encoder, "folds": folds, "summary": summary}
    args.out.write_text(json.dumps(payload, indent=1))
    plot(folds, summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
