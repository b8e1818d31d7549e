"""Measure the FLAIR contrast of real MS lesions: the evidence behind the synthetic FLAIR prior.

On the open_ms longitudinal cases (patients 01 and 03; not the segmentation benchmark's cases),
the experts' mask of new and enlarging lesions (``gt.nii.gz``, common space) is mapped onto
study 2's raw FLAIR with the shipped ITK affine (``study2_FLAIR_to_common_space.txt``, read by
:func:`smoulder.registration.itk.load_affine`: a point of the common space goes to the
FLAIR's), white matter and cortex are taken from smoulder's own segmentation of that FLAIR,
and each lesion's mean is divided by theirs.

    python models/smoulder_seg/docs/flair_contrast.py ../shared/data/open_ms/longitudinal
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from smoulder.registration.itk import load_affine
from smoulder.segmentation.classes import CLASSES
from smoulder.segmentation.inference import segment


def lesion_contrast(case: Path) -> dict[str, np.ndarray]:
    """Per-lesion mean FLAIR over the white matter's and the cortex's mean for one case."""
    gt = nib.load(case / "gt.nii.gz")
    flair = nib.load(case / "study2_FLAIR.nii.gz")
    f = flair.get_fdata()
    labels, n = ndi.label(np.asarray(gt.dataobj) > 0)
    idx = np.argwhere(labels > 0)
    to_flair = load_affine(case / "study2_FLAIR_to_common_space.txt")  # common → FLAIR (RAS)
    vox = nib.affines.apply_affine(np.linalg.inv(flair.affine) @ to_flair @ gt.affine, idx)
    values = ndi.map_coordinates(f, vox.T, order=1)
    dseg = np.asarray(segment(flair, None).dseg.dataobj)
    wm = f[dseg == CLASSES.index("WM")].mean()
    gm = f[dseg == CLASSES.index("cortical_GM")].mean()
    which = labels[tuple(idx.T)]
    means = np.array([values[which == k].mean() for k in range(1, n + 1)])
    return {"over_wm": means / wm, "over_gm": means / gm, "voxels_over_wm": values / wm}


def main(root: Path) -> None:
    for name in ("patient01", "patient03"):
        r = lesion_contrast(root / name)
        q = np.percentile(r["over_wm"], [0, 50, 100]).round(2)
        print(
            f"{name}: {len(r['over_wm'])} lesions; mean/WM min {q[0]} median {q[1]} max {q[2]}; "
            f"mean/cortex median {np.median(r['over_gm']):.2f}; "
            f"voxel-wise /WM median {np.median(r['voxels_over_wm']):.2f}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
