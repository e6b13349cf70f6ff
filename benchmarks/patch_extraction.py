"""Spot-centred patch extraction: pyramidal TIFF via openslide vs decoding the JPEG, and reads from a store.

    python benchmarks/patch_extraction.py [--naive-patches 8] [--repeats 3]

On her2st C2 (9274 x 9911 JPEG, 187 spots with counts), all in one run:
- fedst: `open_slide(tif).read_patch(cx, cy, field_um, 224)` on the pyramidal TIFF made from C2.jpg, with
  field_um = 224 px x mpp (a native-resolution 224 px patch, the same pixels as the naive crop);
- naive: for each patch, decode the whole JPEG with PIL and crop (what a script without a pyramid does);
- naive, decoded once: decode the JPEG once, keep it in memory, crop every patch (fast, memory-hungry);
- store: random batches of 32 patches read from a prepared store's memory-mapped patches.npy.
Peak memory: the rise of the process's peak resident set size while the method runs (Linux VmHWM from
/proc/self/status, reset through /proc/self/clear_refs just before; resource.getrusage ru_maxrss where that
is unavailable), each method in a fresh subprocess so that one method's peak cannot hide another's. Skips
cleanly (exit 0) when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDST_SHARED_DATA", REPO.parent / "shared" / "data")) / "her2st"
JPEG, SPOTS, COUNTS = DATA / "images" / "C2.jpg", DATA / "spots" / "C2_selection.tsv", DATA / "counts" / "C2.tsv.gz"
OUT_PX = 224


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _reset_peak() -> float:
    """Reset the peak-RSS mark (Linux >= 4.0: write 5 to clear_refs) and return the current RSS in MB.

    ru_maxrss survives exec (a child would inherit the parent's peak), so VmHWM is used where it can be reset.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    current = _status_mb("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _spots() -> list[tuple[float, float]]:
    import pandas as pd

    table = pd.read_csv(SPOTS, sep="\t")
    return [(float(x), float(y)) for x, y in zip(table["pixel_x"], table["pixel_y"])]


def run_method(method: str, workdir: Path, limit: int, repeats: int) -> dict:
    """Runs inside a fresh subprocess; returns patches/s and the peak-RSS rise of this method alone."""
    import numpy as np
    from PIL import Image

    from shared.ingest.slide import open_slide
    from shared.store import PatchStore

    Image.MAX_IMAGE_PIXELS = None
    spots = _spots()
    baseline = _reset_peak()
    start = time.perf_counter()
    n = 0
    if method == "fedst":
        tif = Path((workdir / "tif_path").read_text())
        with open_slide(tif) as slide:
            field_um = OUT_PX * slide.mpp
            for _ in range(repeats):
                for cx, cy in spots:
                    patch = slide.read_patch(cx, cy, field_um, OUT_PX)
                    n += 1
    elif method == "naive":
        for cx, cy in spots[:limit]:
            with Image.open(JPEG) as image:
                image.load()
                left, top = round(cx - OUT_PX / 2), round(cy - OUT_PX / 2)
                patch = np.asarray(image.crop((left, top, left + OUT_PX, top + OUT_PX)).convert("RGB"))
            n += 1
    elif method == "naive_once":
        with Image.open(JPEG) as image:
            whole = np.asarray(image.convert("RGB"))
        for _ in range(repeats):
            for cx, cy in spots:
                left, top = round(cx - OUT_PX / 2), round(cy - OUT_PX / 2)
                patch = whole[max(top, 0) : top + OUT_PX, max(left, 0) : left + OUT_PX].copy()
                n += 1
    elif method.startswith("store"):
        store = PatchStore(workdir / method)
        rng = np.random.default_rng(0)
        for _ in range(repeats * 20):
            for batch in np.array_split(rng.permutation(store.n_spots), max(1, store.n_spots // 32)):
                patch = np.asarray(store.patches[np.sort(batch)])
                n += len(batch)
    else:
        raise SystemExit(f"unknown method {method}")
    elapsed = time.perf_counter() - start
    del patch
    return {
        "method": method,
        "patches": n,
        "seconds": elapsed,
        "patches_per_s": n / elapsed,
        "peak_rss_rise_mb": max(0.0, _peak_rss_mb() - baseline),
    }


def _child(method: str, workdir: Path, limit: int, repeats: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--workdir",
        str(workdir),
        "--naive-patches",
        str(limit),
        "--repeats",
        str(repeats),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _prepare(workdir: Path) -> float:
    """Pyramidal TIFF from C2.jpg (timed) + stores at 224 and 64 px for the read benchmark."""
    from shared.ingest import load_site
    from shared.ingest.slide import open_slide
    from shared.store.prepare import prepare_store

    start = time.perf_counter()
    # the legacy-ST reader derives the mpp from the array geometry and converts the JPEG with it (once)
    toml = workdir / "site.toml"
    toml.write_text(
        f'site = "her2st-C"\n[[sections]]\nid = "C2"\nformat = "legacy-st"\n'
        f'counts = "{COUNTS}"\nspots = "{SPOTS}"\nimage = "{JPEG}"\n'
    )
    site = load_site(toml, cache_dir=workdir / "cache")
    convert_s = time.perf_counter() - start
    tif = site.sections[0].slide_path
    (workdir / "tif_path").write_text(str(tif))
    with open_slide(tif) as slide:
        field_224 = OUT_PX * slide.mpp
    for px, name in ((OUT_PX, "store224"), (64, "store64")):
        prepare_store(
            toml,
            workdir / name,
            panel=DATA / "histogene_genes.npy",
            patch_px=px,
            field_um=field_224 if px == OUT_PX else 112.0,
            max_tiles_per_section=0,
            progress=False,
            cache_dir=workdir / "cache",
        )
    return convert_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--naive-patches", type=int, default=8, help="patches for the decode-per-patch baseline")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the 187 spots for the fast methods")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_method(args.child, args.workdir, args.naive_patches, args.repeats)))
        return
    if not (JPEG.is_file() and SPOTS.is_file() and COUNTS.is_file()):
        print(f"skipped: her2st C2 not found under {DATA} (../shared/data is absent)")
        return
    with tempfile.TemporaryDirectory(prefix="fedst-bench-") as tmp:
        workdir = Path(tmp)
        convert_s = _prepare(workdir)
        rows = [
            _child(m, workdir, args.naive_patches, args.repeats)
            for m in ("naive", "naive_once", "fedst", "store224", "store64")
        ]
    naive = rows[0]["patches_per_s"]
    fedst = rows[2]["patches_per_s"]
    labels = {
        "naive": "naive: decode JPEG per patch + crop",
        "naive_once": "naive: decode JPEG once, crop all",
        "fedst": "fedst: openslide pyramidal TIFF read_patch",
        "store224": "store: memmap read, 224 px (batches of 32)",
        "store64": "store: memmap read, 64 px (batches of 32)",
    }
    print(f"her2st C2, {OUT_PX} px spot-centred patches; JPEG -> pyramidal TIFF + spot table load: {convert_s:.2f} s")
    print(
        f"{'method':46s} {'patches':>8s} {'patches/s':>11s} {'x naive':>9s} {'x fedst':>9s} {'peak RSS rise MB':>17s}"
    )
    for row in rows:
        print(
            f"{labels[row['method']]:46s} {row['patches']:8d} {row['patches_per_s']:11.1f} "
            f"{row['patches_per_s'] / naive:9.1f} {row['patches_per_s'] / fedst:9.2f} {row['peak_rss_rise_mb']:17.1f}"
        )
    print("peak memory = rise of peak RSS (VmHWM, reset via clear_refs) during the method, fresh subprocess each")


if __name__ == "__main__":
    main()
