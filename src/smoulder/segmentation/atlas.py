"""Priors in MNI space for lesion location: what lies below the tentorium, and the ventricles.

Lesion location needs to know what lies below the tentorium (brainstem, cerebellum, fourth
ventricle) and which CSF is ventricular, which the tissue classes do not say. smoulder ships
probability maps of both on the MNI152 2009 template's 2 mm grid (:data:`PRIOR`,
:data:`VENTRICLES`), built once by :func:`build_prior` from the 20 SynthSeg training label
maps (Billot et al., Medical Image Analysis 2023; Apache-2.0): each map's parenchyma is
registered affinely (12 degrees of freedom, correlation) to the template's grey + white matter
probability (:data:`TEMPLATE`), and its labels are averaged there.

For a session, :func:`template_transform` registers the template's parenchyma to the
session's (GM + WM + lesion probability, at 2 mm) the same way; :func:`read_prior` reads a
prior at the voxels asked for and :func:`ventricle_mask` cuts the session's CSF to the
ventricles' envelope. An affine fit places the tentorium to within a few millimetres: a lesion
on the boundary (cerebral peduncles, upper vermis) may fall either side.

Rebuild the priors (about a minute on 2 cores)::

    python -m smoulder.segmentation.atlas ../shared/data/synthseg_label_maps OUT.nii.gz
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from smoulder.grids import covering_grid, resample_image, resample_to_grid, sample_world

#: FreeSurfer labels below the tentorium: left/right cerebellar white matter and cortex,
#: brainstem, fourth ventricle.
INFRATENTORIAL_LABELS = (7, 8, 46, 47, 16, 15)
#: FreeSurfer labels of the supratentorial ventricles: lateral (and inferior lateral), third.
VENTRICLE_LABELS = (4, 5, 43, 44, 14)
#: FreeSurfer labels of parenchyma (cortex, deep grey matter, white matter, cerebellum,
#: brainstem, hippocampus, amygdala, ventral diencephalon).
PARENCHYMA_LABELS: tuple[int, ...] = (2, 3, 7, 8, 10, 11, 12, 13, 16, 17, 18, 26, 28)
PARENCHYMA_LABELS += (41, 42, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)
#: The shipped prior: percent probability (uint8) on the MNI152 2009 2 mm grid.
PRIOR = Path(__file__).resolve().parent / "data" / "infratentorial_mni152_2mm.nii.gz"
#: The template's parenchyma (GM + WM probability, percent, uint8) it is registered with,
#: written beside the prior so that a session need not load nilearn's templates.
TEMPLATE = PRIOR.with_name("parenchyma_mni152_2mm.nii.gz")
#: The ventricles' prior (percent, uint8), built with the infratentorial one.
VENTRICLES = PRIOR.with_name("ventricles_mni152_2mm.nii.gz")
#: Ventricular CSF is CSF where at least this share of the label maps had ventricle: a wide
#: envelope (enlarged ventricles of atrophy stay inside it), cut to the session's own CSF.
VENTRICLE_ENVELOPE = 0.05
#: Grid (mm) on which sessions are registered to the template.
REGISTRATION_MM = 2.0
#: Scales (singular values of the fitted affine) of a plausible session-to-template fit: a
#: brain is rarely 30 % smaller or larger than MNI152 along an axis.
PLAUSIBLE_SCALES = (0.7, 1.4)


@lru_cache(maxsize=1)
def template_parenchyma() -> nib.Nifti1Image:
    """Return the MNI152 2009 template's GM + WM probability (0–1) at 2 mm (:data:`TEMPLATE`)."""
    return _shipped(TEMPLATE, "the template parenchyma shipped with the prior")


def _nilearn_parenchyma() -> nib.Nifti1Image:
    """Return the template's GM + WM probability at 2 mm, in percent, from nilearn's maps."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2)
    data = np.asarray(gm.get_fdata(), np.float32) + np.asarray(wm.get_fdata(), np.float32)
    return nib.Nifti1Image(np.rint(100 * np.clip(data, 0, 1)).astype(np.uint8), gm.affine)


def _load(path: str | Path) -> nib.Nifti1Image:
    """Return the NIfTI image at ``path``."""
    return cast(nib.Nifti1Image, nib.load(path))


def _fit(fixed: nib.Nifti1Image, moving: nib.Nifti1Image, device: str = "cpu") -> np.ndarray:
    """Return the 12-parameter affine (world, fixed point → moving point) between two maps."""
    from smoulder.registration import torch_engine as te

    settings = te.AffineSettings(dof=12, metric="ncc", shrink=(4, 2, 1), iterations=(100, 60, 30))
    return te.affine(
        np.asarray(fixed.dataobj, np.float32),
        fixed.affine,
        np.asarray(moving.dataobj, np.float32),
        moving.affine,
        settings=settings,
        device=device,
    )


def _on_grid(data: np.ndarray, affine: np.ndarray, spacing_mm: float) -> nib.Nifti1Image:
    """Return ``data`` resampled (linear) onto a RAS grid of ``spacing_mm`` voxels covering it."""
    img = nib.Nifti1Image(data, affine)
    return resample_image(img, *covering_grid(img, spacing_mm))


def build_prior(label_maps: Sequence[Path], out: Path) -> Path:
    """Write the infratentorial prior built from FreeSurfer-style ``label_maps``; return ``out``.

    The template parenchyma it was registered with goes beside it
    (``parenchyma_mni152_2mm.nii.gz``), and so does the ventricles' prior
    (``ventricles_mni152_2mm.nii.gz``, :data:`VENTRICLE_LABELS`) made the same way.

    Raises:
        ValueError: no label maps given.
    """
    from smoulder.images import save_nifti

    if not label_maps:
        raise ValueError("label_maps: expected at least one FreeSurfer-style label map, found none")
    percent = _nilearn_parenchyma()
    save_nifti(
        np.asarray(percent.dataobj), percent.affine, out.with_name(TEMPLATE.name), dtype=np.uint8
    )
    template = nib.Nifti1Image(np.asarray(percent.dataobj, np.float32) / 100.0, percent.affine)
    total = np.zeros(template.shape, np.float64)
    ventricles = np.zeros(template.shape, np.float64)
    for path in label_maps:
        img = _load(path)
        labels = np.asarray(img.dataobj).astype(np.int32)
        parenchyma = _on_grid(
            np.isin(labels, PARENCHYMA_LABELS).astype(np.float32), img.affine, REGISTRATION_MM
        )
        # the template's voxels, carried into the label map's world by the fitted affine
        moved = _fit(template, parenchyma) @ template.affine
        for acc, wanted in ((total, INFRATENTORIAL_LABELS), (ventricles, VENTRICLE_LABELS)):
            acc += resample_to_grid(np.isin(labels, wanted), img.affine, template.shape, moved)
        print(f"{Path(path).name}: registered", flush=True)
    vent = np.rint(100 * ventricles / len(label_maps)).astype(np.uint8)
    save_nifti(vent, template.affine, out.with_name(VENTRICLES.name), dtype=np.uint8)
    prior = np.rint(100 * total / len(label_maps)).astype(np.uint8)
    return save_nifti(prior, template.affine, out, dtype=np.uint8)


def _shipped(path: Path, what: str) -> nib.Nifti1Image:
    """Return a shipped percent map (uint8) as a 0–1 float image; a clear error if it is gone."""
    from smoulder.errors import InputError

    if not path.is_file():
        raise InputError(str(path), expected=what, found="no such file")
    img = _load(path)
    return nib.Nifti1Image(np.asarray(img.dataobj, np.float32) / 100.0, img.affine)


@lru_cache(maxsize=1)
def infratentorial_prior() -> nib.Nifti1Image:
    """Return the shipped infratentorial prior (0–1, MNI152 2 mm)."""
    return _shipped(PRIOR, "the shipped infratentorial prior")


@lru_cache(maxsize=1)
def _ventricle_prior() -> nib.Nifti1Image:
    return _shipped(VENTRICLES, "the shipped ventricles' prior")


def template_transform(
    parenchyma: np.ndarray, affine: np.ndarray, *, device: str = "cpu"
) -> np.ndarray | None:
    """Return the affine (world mm, session point → MNI152 point) of a session's brain.

    Args:
        parenchyma: the session's parenchyma probability (GM + WM + lesion) on its grid.
        affine: that grid's voxel-to-world matrix.
        device: where the registration runs.

    Returns:
        4×4 matrix, or ``None`` (with a warning) when the fit is implausible: a scale outside
        :data:`PLAUSIBLE_SCALES`, e.g. a field of view that misses much of the brain.
    """
    session = _on_grid(np.asarray(parenchyma, np.float32), affine, REGISTRATION_MM)
    to_template = _fit(session, template_parenchyma(), device)
    scales = np.linalg.svd(to_template[:3, :3], compute_uv=False)
    low, high = PLAUSIBLE_SCALES
    if scales.min() < low or scales.max() > high:
        warnings.warn(
            "MNI152 priors: the template did not fit this brain (scales "
            f"{', '.join(f'{v:.2f}' for v in scales)}, expected {low}-{high}); no lesion is "
            "called infratentorial and ventricles come from the CSF alone",
            stacklevel=2,
        )
        return None
    return to_template


def read_prior(
    prior: nib.Nifti1Image, to_template: np.ndarray, affine: np.ndarray, where: np.ndarray
) -> np.ndarray:
    """Return ``prior`` (0–1, MNI152) at the voxels ``where`` of a grid, 0 elsewhere."""
    out = np.zeros(where.shape, np.float32)
    if where.any():
        idx = np.argwhere(where)
        world = (affine @ np.c_[idx, np.ones(len(idx))].T).T
        out[where] = sample_world(prior, (to_template @ world.T)[:3].T)
    return out


def ventricle_mask(csf: np.ndarray, affine: np.ndarray, to_template: np.ndarray) -> np.ndarray:
    """Return the session's ventricular CSF: ``csf`` inside the ventricles' envelope."""
    return read_prior(_ventricle_prior(), to_template, affine, csf) >= VENTRICLE_ENVELOPE


def main(argv: list[str] | None = None) -> int:
    """Build the prior from a folder of label maps (``training_seg_*.nii.gz``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("label_maps", type=Path, help="folder of FreeSurfer-style label maps")
    p.add_argument("out", type=Path, help="output NIfTI")
    args = p.parse_args(argv)
    maps = sorted(args.label_maps.glob("*.nii.gz"))
    print(f"{build_prior(maps, args.out)} from {len(maps)} label maps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
