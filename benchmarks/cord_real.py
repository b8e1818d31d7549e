"""Cord CSA on real spinal-cord crops against their manual masks.

The crops (``shared/data/spinal_cord``: ``t1/t1w`` and ``t2/t2`` with ``*_seg-manual``) hold no
brain, so the cord is measured without an anchor. Ours and the manual CSA are compared over
the slices both have, each angle-corrected with the same centreline (the manual CSA is the
mask's voxel count × in-plane voxel area × cos angle); Dice compares our binary mask
(fraction ≥ 0.5) with the manual one.

Run ``python benchmarks/cord_real.py [shared_dir]`` to print the records.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from smoulder.cord import measure_cord, slice_csa_mm2
from smoulder.cord.slices import Contrast

#: (case, image, manual mask, contrast), relative to ``shared/data/spinal_cord``.
CASES: list[tuple[str, str, str, Contrast]] = [
    ("spinal_cord-t1", "t1/t1w.nii.gz", "t1/t1w_seg-manual.nii.gz", "T1"),
    ("spinal_cord-t2", "t2/t2.nii.gz", "t2/t2_seg-manual.nii.gz", "T2"),
]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Return the Dice overlap of two boolean masks (1.0 when both are empty).

    Examples:
        >>> dice(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool))
        0.6666666666666666
    """
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def real_cord_case(root: Path, case: str, image: str, manual: str, contrast: Contrast) -> dict:
    """Return the record of one crop: our CSA, the manual CSA, their error, Dice, run time."""
    img = nib.load(root / image)
    data = np.asarray(img.dataobj, np.float32)
    mask = np.asarray(nib.load(root / manual).dataobj) > 0.5
    start = time.perf_counter()
    result = measure_cord(data, img.affine, contrast)
    wall = time.perf_counter() - start
    record: dict[str, Any] = {"case": case, "status": result.status, "wall_s": round(wall, 2)}
    if result.centreline is None:
        return record | {"csa_mm2": None, "manual_csa_mm2": None, "csa_error_pct": None}
    ours = result.slice_csa_mm2
    theirs = slice_csa_mm2(mask.astype(np.float32), img.affine, result.centreline)
    both = np.isfinite(ours) & (ours > 0) & (theirs > 0)
    csa, manual_csa = float(ours[both].mean()), float(theirs[both].mean())
    return record | {
        "csa_mm2": round(csa, 2),
        "manual_csa_mm2": round(manual_csa, 2),
        "csa_error_pct": round(100.0 * (csa - manual_csa) / manual_csa, 2),
        "dice": round(dice(result.fraction >= 0.5, mask), 3),
        "slices": int(both.sum()),
    }


def real_cord_cases(shared: Path) -> list[dict]:
    """Return one record per real crop under ``shared`` (the ``shared`` or ``shared/data``
    folder): ``case``, ``csa_mm2``, ``manual_csa_mm2``, ``csa_error_pct`` (signed, ours versus
    manual over the slices both have), ``dice``, ``slices``, ``status`` and ``wall_s``.
    """
    root = Path(shared)
    for candidate in (root / "spinal_cord", root / "data" / "spinal_cord"):
        if candidate.is_dir():
            root = candidate
            break
    else:
        raise FileNotFoundError(f"{shared}: expected a spinal_cord folder, found none")
    return [real_cord_case(root, *case) for case in CASES]


def main(argv: list[str] | None = None) -> int:
    """Print the records of the crops under ``argv[0]`` (default ``../shared/data``)."""
    args = sys.argv[1:] if argv is None else argv
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    for record in real_cord_cases(Path(args[0]) if args else default):
        print(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
