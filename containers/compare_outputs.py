"""Compare two ``smoulder demo`` output folders, e.g. one run in the image and one on the host.

    .venv/bin/python containers/compare_outputs.py HOST_DIR IMAGE_DIR

Prints, for the phantom (``bids/``) and the derivatives (``derivatives/``): the files only one
side has, then every table (``.tsv``), image (``.nii.gz``), JSON and other file that differs,
with how much. The Nipype work folder is left out (its hashes hold absolute paths), and the run
id in the names of ``logs/`` (``20261207T121031Z-4669e4``) is masked. Exits 1 when a key table
(lesions, lesion change, atrophy) differs by more than ``--rtol``, so a test can call it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from smoulder.images import load_image, read_tsv

#: The tables the container must reproduce: lesions per session, lesion change, atrophy.
KEY_TABLES = re.compile(
    r"desc-(lesions_stats|lesions_longitudinal|activity_longitudinal|atrophy_stats)\.tsv$"
)
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")


def listing(root: Path) -> dict[str, Path]:
    """Return ``{name with the run id masked: file}`` of ``bids/`` and ``derivatives/``."""
    out = {}
    for top in ("bids", "derivatives"):
        for path in sorted((root / top).rglob("*")):
            if path.is_file():
                out[RUN_ID.sub("RUNID", str(path.relative_to(root)))] = path
    return out


def table_difference(a: Path, b: Path) -> tuple[float, str]:
    """Return the largest relative difference of two TSV tables' cells, and where it is.

    Text cells count as 0 when equal and ``inf`` when not; other rows or columns are ``inf``.
    """
    rows_a, rows_b = read_tsv(a), read_tsv(b)
    if len(rows_a) != len(rows_b):
        return math.inf, f"{len(rows_a)} vs {len(rows_b)} rows"
    if rows_a and rows_a[0].keys() != rows_b[0].keys():
        return math.inf, "other columns"
    worst, where = 0.0, ""
    for r, (x, y) in enumerate(zip(rows_a, rows_b, strict=True), start=1):
        for column, u in x.items():
            v = y[column]
            if u == v:
                continue
            try:
                fu, fv = float(u), float(v)
                rel = abs(fu - fv) / max(abs(fu), abs(fv), 1e-12)
            except ValueError:
                rel = math.inf
            if rel > worst:
                worst, where = rel, f"row {r} {column}: {u} vs {v}"
    return worst, where


def image_difference(a: Path, b: Path) -> str:
    """Return how two NIfTI images differ: ``""`` when equal in grid and voxels."""
    ia = load_image(a, ndim=None, allow_nan=True)
    ib = load_image(b, ndim=None, allow_nan=True)
    if ia.shape != ib.shape or not np.allclose(ia.affine, ib.affine, atol=1e-6):
        return f"grid differs: {ia.shape} vs {ib.shape}"
    da, db = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
    if np.array_equal(da, db, equal_nan=True):
        return ""
    diff = np.abs(da.astype(np.float64) - db.astype(np.float64))
    changed = np.count_nonzero(diff > 0)
    scale = float(np.nanmax(np.abs(da))) or 1.0
    close = np.allclose(da, db, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)
    return (
        f"{changed} of {da.size} voxels differ, max |diff| {np.nanmax(diff):.3g} "
        f"(image max {scale:.3g}){', allclose' if close else ''}"
    )


def arrays_difference(a: Path, b: Path) -> str:
    """Return the arrays two ``.npz`` files differ in (``""`` when all are equal)."""
    with np.load(a) as za, np.load(b) as zb:
        if za.files != zb.files:
            return f"arrays {za.files} vs {zb.files}"
        return ", ".join(k for k in za.files if not np.array_equal(za[k], zb[k]))


def json_difference(a: Path, b: Path) -> str:
    """Return the top-level keys two JSON files differ in (``""`` when equal)."""
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    if ja == jb:
        return ""
    if isinstance(ja, dict) and isinstance(jb, dict):
        return "keys " + ", ".join(
            sorted(k for k in ja.keys() | jb.keys() if ja.get(k) != jb.get(k))
        )
    return "content differs"


def compare(host: Path, image: Path, *, rtol: float) -> int:
    """Print the differences of two demo folders; return 1 when a key table is off by > rtol."""
    la, lb = listing(host), listing(image)
    only_a, only_b = sorted(la.keys() - lb.keys()), sorted(lb.keys() - la.keys())
    print(f"files: {len(la)} host, {len(lb)} image, {len(la.keys() & lb.keys())} in both")
    for name in only_a:
        print(f"  only host:  {name}")
    for name in only_b:
        print(f"  only image: {name}")
    counts = {"equal": 0, "differ": 0}
    failed = []
    for name in sorted(la.keys() & lb.keys()):
        a, b = la[name], lb[name]
        if a.read_bytes() == b.read_bytes():
            counts["equal"] += 1
            continue
        if name.endswith(".tsv"):
            worst, where = table_difference(a, b)
            note = "equal values" if worst == 0 else f"max rel diff {worst:.3g} ({where})"
            if KEY_TABLES.search(name) and worst > rtol:
                failed.append(name)
        elif name.endswith((".nii.gz", ".nii")):
            note = image_difference(a, b) or "same voxels and grid (header bytes differ)"
        elif name.endswith(".npz"):
            note = arrays_difference(a, b) or "same arrays (zip member times differ)"
        elif name.endswith(".json"):
            note = json_difference(a, b) or "same content (formatting differs)"
        else:
            note = f"{a.stat().st_size} vs {b.stat().st_size} bytes"
        counts["differ"] += 1
        print(f"  differs: {name}: {note}")
    print(f"byte-identical: {counts['equal']}, different: {counts['differ']}")
    for name in only_a + only_b:
        if KEY_TABLES.search(name):
            failed.append(name)
    if failed:
        print(f"key tables off by more than rtol={rtol:g}: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host", type=Path, help="output folder of the reference run")
    parser.add_argument("image", type=Path, help="output folder of the run to check")
    parser.add_argument("--rtol", type=float, default=1e-6, help="key tables' relative tolerance")
    args = parser.parse_args(argv)
    return compare(args.host, args.image, rtol=args.rtol)


if __name__ == "__main__":
    sys.exit(main())
