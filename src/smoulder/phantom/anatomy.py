"""Phantom anatomy: partial-volume tissue fractions of a whole head on a regular grid.

The brain comes from nilearn's packaged MNI152 2009 template (GM/WM probability maps and brain
mask; no download) or from a whole-brain label map (e.g. SynthSeg's training maps). A head is
built around it (CSF, skull and scalp shells at prescribed distances from the brain) and a neck
below it (vertebral bone ring and soft tissue). The spinal canal is left empty here: the cord
and its CSF are drawn analytically per session (see :mod:`smoulder.phantom.cord`) so that the
true cross-sectional area is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from smoulder.errors import InputError
from smoulder.grids import voxel_sizes

#: Tissue classes held in :attr:`Anatomy.fractions`, in order. Air is ``1 - sum(fractions)``.
CLASSES: tuple[str, ...] = ("csf", "gm", "deep_gm", "wm", "soft_tissue", "bone")
BRAIN_CLASSES: tuple[str, ...] = ("gm", "deep_gm", "wm")

#: FreeSurfer/SynthSeg labels → class. Labels not listed inside the head are soft tissue.
FREESURFER_CLASSES: dict[str, tuple[int, ...]] = {
    "csf": (4, 5, 14, 15, 24, 43, 44, 72),
    "gm": (3, 8, 17, 18, 42, 47, 53, 54),
    "deep_gm": (10, 11, 12, 13, 26, 28, 49, 50, 51, 52, 58, 60),
    "wm": (2, 7, 16, 41, 46, 85),
}


@dataclass
class Anatomy:
    """Tissue fractions ``(len(classes), X, Y, Z)`` on a grid, with what is needed to extend it.

    Attributes:
        fractions: float32 partial-volume fractions, summing to at most 1 per voxel.
        affine: voxel-to-world (RAS mm) matrix of the grid (axis-aligned, positive diagonal).
        classes: class name of each channel of ``fractions``.
        cord_top_mm: world (x, y, z) where the medulla leaves the brain and the cord begins.
        source: where the anatomy came from (for provenance).
    """

    fractions: np.ndarray
    affine: np.ndarray
    classes: tuple[str, ...] = CLASSES
    cord_top_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    source: str = ""
    canal_radius_mm: float = 8.0
    meta: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the grid."""
        return tuple(int(n) for n in self.fractions.shape[1:])  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in millimetres."""
        return tuple(float(s) for s in voxel_sizes(self.affine))  # type: ignore[return-value]

    def channel(self, name: str) -> np.ndarray:
        """Return the fraction map of class ``name``."""
        return self.fractions[self.classes.index(name)]


def regular_grid(
    lo_mm: np.ndarray, hi_mm: np.ndarray, spacing_mm: float
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Return ``(affine, shape)`` of an RAS grid of ``spacing_mm`` voxels covering ``[lo, hi]``.

    Examples:
        >>> aff, shape = regular_grid(np.array([0., 0, 0]), np.array([9., 9, 4]), 2.0)
        >>> shape, float(aff[0, 0]), float(aff[2, 3])
        ((5, 5, 3), 2.0, 0.0)
    """
    shape = tuple(
        int(np.floor((h - lo) / spacing_mm)) + 1 for lo, h in zip(lo_mm, hi_mm, strict=True)
    )
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = lo_mm
    return affine, shape  # type: ignore[return-value]


def resample_fraction(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
) -> np.ndarray:
    """Return a partial-volume map resampled to a new grid (see :func:`resample_box`), in [0, 1]."""
    return np.clip(resample_box(data, src_affine, dst_affine, dst_shape), 0.0, 1.0)


def resample_box(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, ...],
) -> np.ndarray:
    """Return ``data`` resampled to a grid, approximating an average over each new voxel.

    When the destination voxels are larger, the source is first smoothed with a Gaussian whose
    variance matches the box of a destination voxel (an anti-alias filter), so that sampled
    values approximate voxel averages, as an acquisition with larger voxels would record them.
    Complex data are resampled as real and imaginary parts (so intravoxel dephasing shows).

    This simulates an acquisition (box-averaging into larger voxels) and is not
    :func:`smoulder.grids.resample_to_grid`, which only interpolates: the phantom keeps its
    own trilinear step (one general ``affine_transform``) because the shared function's fast
    path for axis-aligned grids rounds differently (by ~1e-8 on GRE echoes), and the phantom's
    images must stay bit-identical for a given seed.
    """
    if data.dtype.kind == "c":
        re = resample_box(data.real, src_affine, dst_affine, dst_shape)
        im = resample_box(data.imag, src_affine, dst_affine, dst_shape)
        return (re + 1j * im).astype(np.complex64)
    if tuple(data.shape) == tuple(dst_shape) and np.allclose(src_affine, dst_affine):
        return data.astype(np.float32, copy=False)
    ratio = voxel_sizes(dst_affine) / voxel_sizes(src_affine)
    sigma = np.where(ratio > 1, np.sqrt(np.maximum(ratio**2 - 1, 0)) / np.sqrt(12) * 1.0, 0.0)
    src = data.astype(np.float32)
    if np.any(sigma > 0):
        src = ndimage.gaussian_filter(src, sigma)
    vox2vox = np.linalg.inv(src_affine) @ dst_affine
    out = ndimage.affine_transform(
        src,
        vox2vox[:3, :3],
        offset=vox2vox[:3, 3],
        output_shape=dst_shape,
        order=1,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )
    return out.astype(np.float32)


def mni_brain() -> tuple[np.ndarray, np.ndarray, str]:
    """Return ``(fractions (4, X, Y, Z) of csf/gm/deep_gm/wm, affine, source)`` from nilearn.

    CSF is what the brain mask holds beyond grey and white matter.
    """
    from nilearn import datasets  # deferred: importing nilearn takes ~1 s

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    gm = np.asarray(gm_img.get_fdata(), np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), np.float32)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    frac = np.stack([csf, gm * mask, np.zeros_like(gm), wm * mask])
    return frac, gm_img.affine.copy(), "nilearn MNI152 2009 (ICBM152 nonlinear symmetric 09a)"


def label_map_brain(path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Return ``(fractions (4, X, Y, Z) of csf/gm/deep_gm/wm, affine, source)`` from a label map.

    Raises:
        InputError: the file is not a 3D integer label map with brain labels.
    """
    img = nib.load(str(path))
    labels = np.asarray(img.dataobj)
    if labels.ndim != 3:
        raise InputError(
            path, expected="a 3D label map", found=f"{labels.ndim}D shape {labels.shape}"
        )
    labels = np.rint(labels).astype(np.int32)
    frac = np.stack(
        [
            np.isin(labels, FREESURFER_CLASSES[c]).astype(np.float32)
            for c in ("csf", "gm", "deep_gm", "wm")
        ]
    )
    if frac[3].sum() == 0 or frac[1].sum() == 0:
        raise InputError(
            path,
            expected="FreeSurfer labels with cerebral white (2/41) and grey matter (3/42)",
            found=f"labels {np.unique(labels)[:12].tolist()}",
        )
    # hard labels → mild partial volume at boundaries, as an acquisition would see them
    frac = np.stack([ndimage.gaussian_filter(f, 0.5) for f in frac])
    return frac, img.affine.copy(), f"label map {Path(path).name}"


def build_anatomy(
    brain: np.ndarray,
    brain_affine: np.ndarray,
    *,
    resolution_mm: float,
    source: str,
    margin_mm: float = 22.0,
    neck_mm: float = 45.0,
    canal_radius_mm: float = 8.0,
) -> Anatomy:
    """Return a whole-head :class:`Anatomy` on an RAS grid of ``resolution_mm`` around ``brain``.

    Args:
        brain: ``(4, X, Y, Z)`` fractions of csf, gm, deep_gm, wm.
        brain_affine: voxel-to-world matrix of ``brain``.
        resolution_mm: voxel size of the output grid.
        source: provenance text.
        margin_mm: room left around the brain for skull, scalp and head motion.
        neck_mm: length of neck added below the lowest brain slice.
        canal_radius_mm: radius of the spinal canal left empty for the cord model.
    """
    parenchyma = brain[1:].sum(0)
    idx = np.argwhere(brain.sum(0) > 0.05)
    lo_i, hi_i = idx.min(0), idx.max(0)
    corners = np.array(
        [
            [a, b, c, 1.0]
            for a in (lo_i[0], hi_i[0])
            for b in (lo_i[1], hi_i[1])
            for c in (lo_i[2], hi_i[2])
        ]
    )
    world = (brain_affine @ corners.T).T[:, :3]
    lo, hi = world.min(0) - margin_mm, world.max(0) + margin_mm
    bottom_mm = float(world[:, 2].min())
    lo[2] = bottom_mm - neck_mm
    affine, shape = regular_grid(lo, hi, resolution_mm)
    fr = np.stack([resample_fraction(c, brain_affine, affine, shape) for c in brain])

    # the medulla's centre on the lowest 4 mm of parenchyma: where the cord leaves the head
    pts = np.argwhere(parenchyma > 0.3)
    wpts = (brain_affine @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]
    low = wpts[wpts[:, 2] < wpts[:, 2].min() + 4.0]
    cord_top = (float(low[:, 0].mean()), float(low[:, 1].mean()), bottom_mm)

    # head shells at prescribed distances from the brain: CSF, skull, scalp
    brain_mask = ndimage.binary_closing(fr.sum(0) > 0.5, iterations=2)
    brain_mask = ndimage.binary_fill_holes(brain_mask)
    dist = ndimage.distance_transform_edt(~brain_mask, sampling=resolution_mm).astype(np.float32)

    def inside(d_mm: float) -> np.ndarray:
        return np.clip((d_mm - dist) / resolution_mm + 0.5, 0.0, 1.0)

    free = np.clip(1.0 - fr.sum(0), 0.0, 1.0)
    csf_shell = free * inside(2.0)
    bone = free * (inside(8.0) - inside(2.0))
    soft = free * (inside(14.0) - inside(8.0))

    # neck below the brain: a vertebral ring around an empty canal, inside soft tissue
    world_grid = _world_coords(affine, shape)
    below = np.clip((bottom_mm - world_grid[2]) / resolution_mm + 0.5, 0.0, 1.0)
    r = np.hypot(world_grid[0] - cord_top[0], world_grid[1] - cord_top[1])
    rn = np.hypot((world_grid[0] - cord_top[0]) / 55.0, (world_grid[1] - cord_top[1] - 15.0) / 50.0)
    canal = np.clip((canal_radius_mm - r) / resolution_mm + 0.5, 0.0, 1.0)
    ring = np.clip((canal_radius_mm + 7.0 - r) / resolution_mm + 0.5, 0.0, 1.0) - canal
    neck = np.clip((1.0 - rn) * 55.0 / resolution_mm + 0.5, 0.0, 1.0)
    neck_soft = np.clip(neck - ring - canal, 0.0, 1.0)

    keep = 1.0 - below
    out = np.zeros((len(CLASSES), *shape), np.float32)
    out[0] = (fr[0] + csf_shell) * keep
    out[1] = fr[1] * keep
    out[2] = fr[2] * keep
    out[3] = fr[3] * keep
    out[4] = soft * keep + neck_soft * below
    out[5] = bone * keep + ring * below
    return Anatomy(
        fractions=out,
        affine=affine,
        cord_top_mm=cord_top,
        source=source,
        canal_radius_mm=canal_radius_mm,
    )


def _world_coords(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Return world coordinates ``(3, X, Y, Z)`` of every voxel of an axis-aligned grid."""
    axes = [
        affine[i, i] * np.arange(n, dtype=np.float32) + affine[i, 3] for i, n in enumerate(shape)
    ]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def load_anatomy(resolution_mm: float, *, label_map: str | Path | None = None) -> Anatomy:
    """Return the phantom's base anatomy at ``resolution_mm``: MNI152 or a given label map."""
    if label_map is None:
        brain, aff, source = mni_brain()
    else:
        brain, aff, source = label_map_brain(label_map)
    return build_anatomy(brain, aff, resolution_mm=resolution_mm, source=source)
