"""Lesions in the susceptibility image's native grid, and the classifier's 4-channel patch.

The session's segmentation lives on the FLAIR grid; susceptibility (QSM, or the filtered phase)
on the GRE's own grid. Rims are thin (1–2 mm), so the lesion goes to the susceptibility image,
never the reverse: a lesion's FLAIR mask is resampled onto the GRE grid through the *inverse* of
the GRE's co-registration onto the FLAIR. That co-registration (the session's
``_from-MEGRE_to-FLAIR`` file, read by :meth:`~smoulder.registration.transforms.AffineTransform.
load`) maps FLAIR points to GRE points, the fixed → moving convention of
:mod:`smoulder.registration`; :mod:`smoulder.qsm.masks` moves the brain mask the same way.

The patch contract (what :mod:`smoulder.rims.network` reads): :data:`PATCH_SHAPE` voxels of a
cube around the lesion (:func:`lesion_box`: bounding box plus at least 3 mm, cubic in mm, in
the GRE grid's voxel axes), channels :data:`CHANNELS`, ``float32 (4, 24, 24, 24)``:

* ``susceptibility`` — χ (ppm, QSM) or filtered phase (rad), already sign-corrected to
  "paramagnetic positive", divided by :func:`susceptibility_scale` (the MAD of the lesion's
  perilesional white-matter shell, floored), so that QSM and phase inputs look alike; which one
  it was travels beside the patch as ``input_kind`` (``"qsm"`` or ``"phase"``);
* ``magnitude`` and ``flair`` — divided by their median over the patch's brain voxels (its
  non-zero voxels without a brain mask);
* ``mask`` — the lesion's partial-volume fraction in ``[0, 1]``.

A lesion at the image border gets the same patch, zero beyond the image (the normalised
background of every channel), never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from smoulder.errors import InputError, RegistrationError
from smoulder.grids import resample_to_grid, voxel_sizes
from smoulder.registration.transforms import resample, resample_array
from smoulder.rims.rules import InputKind, LesionRegions, lesion_regions, spread_floor

if TYPE_CHECKING:
    from smoulder.registration.transforms import AffineTransform

#: Voxels of the network's patch.
PATCH_SHAPE: tuple[int, int, int] = (24, 24, 24)
#: The patch's channels, in order.
CHANNELS: tuple[str, ...] = ("susceptibility", "magnitude", "flair", "mask")
#: Least margin (mm) between a lesion's bounding box and the faces of its patch box.
MIN_MARGIN_MM = 3.0
#: Least fraction of a lesion's voxels inside the GRE field of view for it to be assessed.
MIN_FOV_FRACTION = 0.5


# ------------------------------------------------------------------------- lesions on the GRE


def lesion_labels_in_gre(
    lesions_flair: nib.Nifti1Image, gre: nib.Nifti1Image, flair_to_gre: AffineTransform
) -> np.ndarray:
    """Return the lesion instance map resampled onto the GRE grid (labels kept, dtype kept).

    All instances at once, label-aware (:func:`~smoulder.registration.transforms.resample` with
    ``"label"``): every voxel takes the instance whose interpolated indicator is largest.

    Args:
        lesions_flair: lesion instances (0 background, 1…N) on the FLAIR grid.
        gre: an image on the GRE grid (echo-1 magnitude or the χ map).
        flair_to_gre: the GRE's co-registration onto the FLAIR: maps FLAIR points to GRE points.

    Returns:
        Integer labels of the GRE grid's shape; 0 where no lesion (and outside the FLAIR).
    """
    moved = resample(lesions_flair, gre, flair_to_gre.inverse(), interpolation="label")
    return np.asarray(moved.dataobj)


def lesion_mask_in_gre(
    lesion_mask_flair: nib.Nifti1Image,
    gre: nib.Nifti1Image,
    flair_to_gre: AffineTransform,
    *,
    label: int | None = None,
) -> np.ndarray:
    """Return one lesion's partial-volume fraction on the GRE grid (float32 in ``[0, 1]``).

    The lesion's binary mask is resampled linearly through ``flair_to_gre.inverse()``, on the
    part of the GRE grid around the lesion only (the rest is zero), so mapping every lesion of a
    session one by one stays cheap.

    Args:
        lesion_mask_flair: the lesion's mask (non-zero inside), or the instance map with
            ``label``, on the FLAIR grid.
        gre: an image on the GRE grid.
        flair_to_gre: maps FLAIR points to GRE points (the GRE's co-registration onto the FLAIR).
        label: the instance to take from an instance map; ``None``: every non-zero voxel.

    Returns:
        An array of the GRE grid's shape; all zero when the lesion lies outside the GRE's field
        of view.

    Raises:
        InputError: the mask (or the instance ``label``) has no voxel.
    """
    data = np.asanyarray(lesion_mask_flair.dataobj)
    binary = (data == label) if label is not None else (data != 0)
    binary = binary.reshape(binary.shape[:3])
    if not binary.any():
        what = "lesion mask" if label is None else f"lesion instance {label}"
        raise InputError(what, expected="at least one voxel", found="an empty mask")
    idx = np.argwhere(binary)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 2, np.array(binary.shape) - 1)
    moving = _crop_image(binary, lesion_mask_flair.affine, lo, hi)
    gre_shape = tuple(int(n) for n in gre.shape[:3])
    out = np.zeros(gre_shape, np.float32)
    corners = _box_corners_world(moving.affine, moving.shape[:3])
    box = _voxel_box(flair_to_gre.apply(corners), gre.affine, gre_shape, pad=2)
    if box is None:
        return out
    g_lo, g_hi = box
    reference = nib.Nifti1Image(np.zeros(tuple(g_hi - g_lo + 1), np.uint8), _shifted(gre, g_lo))
    try:
        moved = resample(moving, reference, flair_to_gre.inverse(), interpolation="linear")
    except RegistrationError:  # no GRE voxel of the box lands on the lesion's FLAIR crop
        return out
    out[tuple(slice(a, b + 1) for a, b in zip(g_lo, g_hi, strict=True))] = np.clip(
        np.asarray(moved.dataobj), 0.0, 1.0
    )
    return out


def field_of_view_fraction(
    lesion_mask_flair: nib.Nifti1Image,
    gre: nib.Nifti1Image,
    flair_to_gre: AffineTransform,
    *,
    label: int | None = None,
    valid: np.ndarray | None = None,
) -> float:
    """Return the fraction of a lesion's FLAIR voxels that land inside the GRE field of view.

    Each voxel centre goes through ``flair_to_gre`` (FLAIR points → GRE points) and counts when
    it falls within the GRE grid (half a voxel beyond the outer voxel centres, as resampling
    reads it) and, with ``valid``, on a valid voxel (nearest).

    Args:
        lesion_mask_flair: the lesion's mask, or the instance map with ``label``, FLAIR grid.
        gre: an image on the GRE grid.
        flair_to_gre: maps FLAIR points to GRE points.
        label: the instance to take from an instance map; ``None``: every non-zero voxel.
        valid: boolean array of the GRE grid where susceptibility is defined (the QSM mask);
            ``None``: the whole grid.

    Returns:
        A fraction in ``[0, 1]``; 0 for an empty mask.

    Examples:
        >>> from smoulder.registration.transforms import AffineTransform
        >>> m = np.zeros((10, 10, 10), np.uint8); m[8:10, 4:6, 4:6] = 1
        >>> flair = nib.Nifti1Image(m, np.eye(4))
        >>> gre = nib.Nifti1Image(np.zeros((9, 10, 10), np.float32), np.eye(4))
        >>> field_of_view_fraction(flair, gre, AffineTransform.identity())  # x = 9 is outside
        0.5
    """
    data = np.asanyarray(lesion_mask_flair.dataobj)
    binary = (data == label) if label is not None else (data != 0)
    idx = np.argwhere(binary.reshape(binary.shape[:3]))
    if len(idx) == 0:
        return 0.0
    world = _to_world(lesion_mask_flair.affine, idx.astype(np.float64))
    vox = _to_voxels(gre.affine, flair_to_gre.apply(world))
    shape = np.array(gre.shape[:3])
    inside = np.all((vox >= -0.5) & (vox <= shape - 0.5), axis=1)
    if valid is not None:
        nearest = np.clip(np.rint(vox[inside]).astype(int), 0, shape - 1)
        keep = np.asarray(valid, bool)[tuple(nearest.T)]
        inside[np.flatnonzero(inside)[~keep]] = False
    return float(inside.mean())


def in_field_of_view(
    lesion_mask_flair: nib.Nifti1Image,
    gre: nib.Nifti1Image,
    flair_to_gre: AffineTransform,
    *,
    label: int | None = None,
    valid: np.ndarray | None = None,
    min_fraction: float = MIN_FOV_FRACTION,
) -> bool:
    """Return whether enough of a lesion lies in the GRE field of view to be assessed.

    A lesion below ``min_fraction`` (:func:`field_of_view_fraction`) is "not assessed", never
    "no rim". Arguments as :func:`field_of_view_fraction`.
    """
    fraction = field_of_view_fraction(
        lesion_mask_flair, gre, flair_to_gre, label=label, valid=valid
    )
    return fraction >= min_fraction


# ------------------------------------------------------------------------------------- boxes


@dataclass(frozen=True)
class LesionBox:
    """A cube (in mm) around one lesion, placed in the voxel coordinates of the GRE grid.

    Attributes:
        centre_vox: the cube's centre, GRE voxel coordinates (may be fractional).
        half_width_mm: half its edge length, mm (the same along every voxel axis).
        voxel_mm: the GRE grid's voxel sizes (mm), for the conversion to voxels.
    """

    centre_vox: tuple[float, float, float]
    half_width_mm: float
    voxel_mm: tuple[float, float, float]

    @property
    def half_width_vox(self) -> np.ndarray:
        """Return the half edge length in voxels along each axis."""
        return self.half_width_mm / np.asarray(self.voxel_mm)

    def slices(self, shape: tuple[int, ...], *, pad: int = 1) -> tuple[slice, slice, slice]:
        """Return the voxel slices of ``shape`` covering the cube (plus ``pad``), clipped to it."""
        lo, hi = self._voxel_range(pad)
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.asarray(shape[:3]) - 1)
        return tuple(slice(int(a), int(max(b + 1, a))) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]

    def is_padded(self, shape: tuple[int, ...]) -> bool:
        """Return whether part of the cube lies outside a grid of ``shape`` (a border lesion)."""
        lo, hi = self._voxel_range(0)
        return bool(np.any(lo < 0) or np.any(hi > np.asarray(shape[:3]) - 1))

    def patch_affine(
        self, affine: np.ndarray, shape: tuple[int, int, int] = PATCH_SHAPE
    ) -> np.ndarray:
        """Return the voxel-to-world matrix of the ``shape`` patch filling the cube.

        The patch's voxels tile the cube (centres half a patch voxel inside its faces), its
        axes parallel to the GRE grid's: patch voxel ``i`` lies at GRE voxel
        ``centre + (i - (n - 1) / 2) * step`` with ``step = 2 * half_width_vox / n``.

        Examples:
            >>> box = LesionBox((10.0, 10.0, 10.0), 6.0, (1.0, 1.0, 1.0))
            >>> box.patch_affine(np.eye(4), (12, 12, 12))[:3, 3].tolist()  # first voxel centre
            [4.5, 4.5, 4.5]
        """
        n = np.asarray(shape, float)
        step = 2 * self.half_width_vox / n
        to_gre = np.diag([*step, 1.0])
        to_gre[:3, 3] = np.asarray(self.centre_vox) - (n - 1) / 2 * step
        return np.asarray(affine, float) @ to_gre

    def _voxel_range(self, pad: int) -> tuple[np.ndarray, np.ndarray]:
        centre, half = np.asarray(self.centre_vox), self.half_width_vox
        return np.floor(centre - half).astype(int) - pad, np.ceil(centre + half).astype(int) + pad


def lesion_box(
    lesion_mask: np.ndarray, affine: np.ndarray, *, margin_mm: float = MIN_MARGIN_MM
) -> LesionBox:
    """Return the cube around a lesion: its bounding box plus ``margin_mm``, cubic in mm.

    The bounding box is that of the voxels with a fraction ≥ 0.5 (of any non-zero voxel when
    none reaches it), measured along the grid's voxel axes; the cube's half edge is half the
    longest side plus the margin, and it is centred on the bounding box.

    Args:
        lesion_mask: the lesion's fraction (or binary mask) on the GRE grid.
        affine: the GRE grid's voxel-to-world matrix.
        margin_mm: distance added on every side of the longest extent (mm, ≥ 0).

    Returns:
        The :class:`LesionBox`.

    Raises:
        InputError: the mask is empty or the margin negative.

    Examples:
        >>> m = np.zeros((20, 20, 20)); m[5:9, 5:7, 5:6] = 1  # 4 × 2 × 1 voxels of 0.5 mm
        >>> box = lesion_box(m, np.diag([0.5, 0.5, 0.5, 1.0]), margin_mm=3.0)
        >>> box.centre_vox, box.half_width_mm
        ((6.5, 5.5, 5.0), 4.0)
    """
    if not margin_mm >= 0:
        raise InputError("lesion box margin", expected="a margin ≥ 0 mm", found=repr(margin_mm))
    mask = np.asarray(lesion_mask)
    idx = np.argwhere(mask >= 0.5)
    if len(idx) == 0:
        idx = np.argwhere(mask > 0)
    if len(idx) == 0:
        raise InputError("lesion mask", expected="at least one voxel > 0", found="an empty mask")
    lo, hi = idx.min(0), idx.max(0)
    voxel_mm = voxel_sizes(affine)
    extent_mm = (hi - lo + 1) * voxel_mm
    centre = (lo + hi) / 2.0
    return LesionBox(
        tuple(float(c) for c in centre),  # type: ignore[arg-type]
        float(extent_mm.max() / 2 + margin_mm),
        tuple(float(v) for v in voxel_mm),  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------------------ patches


def susceptibility_scale(
    susceptibility: np.ndarray,
    lesion_mask: np.ndarray,
    affine: np.ndarray,
    *,
    input_kind: InputKind,
    wm: np.ndarray | None = None,
    other_lesions: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    regions: LesionRegions | None = None,
) -> float:
    """Return the robust scale of a lesion's susceptibility: its shell's MAD, floored (ppm/rad).

    The shell is the perilesional white matter of :func:`smoulder.rims.rules.lesion_regions`;
    the MAD (median absolute deviation from the median, unscaled) is floored at
    :func:`smoulder.rims.rules.spread_floor` of the input kind, which is also the scale when
    the shell is empty.

    Args:
        susceptibility: sign-corrected χ (ppm) or filtered phase (rad) on the GRE grid.
        lesion_mask: the lesion's fraction on the same grid.
        affine: the grid's voxel-to-world matrix.
        input_kind: ``"qsm"`` or ``"phase"``.
        wm: normal-appearing white-matter probability (or mask) on the grid; ``None``: any
            tissue around the lesion.
        other_lesions: the session's other lesions (boolean), kept out of the shell.
        valid: where the susceptibility is defined (the QSM mask).
        regions: the lesion's :func:`~smoulder.rims.rules.lesion_regions` of these arguments,
            when computed already.

    Returns:
        The scale, in the input's unit.
    """
    floor = spread_floor(input_kind)
    if regions is None:
        regions = lesion_regions(
            lesion_mask, affine, wm=wm, other_lesions=other_lesions, valid=valid
        )
    values = np.asarray(susceptibility)[regions.slices][regions.shell]
    if values.size == 0:
        return floor
    mad = float(np.median(np.abs(values - np.median(values))))
    return max(mad, floor)


def extract_patch(
    box: LesionBox,
    *,
    susceptibility: np.ndarray,
    magnitude: np.ndarray,
    lesion_mask: np.ndarray,
    gre_affine: np.ndarray,
    flair: nib.Nifti1Image,
    flair_to_gre: AffineTransform,
    scale: float,
    brain_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Return the lesion's ``float32 (4, 24, 24, 24)`` patch, channels :data:`CHANNELS`.

    Every channel is sampled once (linear) on the patch grid filling ``box``
    (:meth:`LesionBox.patch_affine`): the GRE-grid arrays directly, the FLAIR through
    ``flair_to_gre`` (patch points → FLAIR points is its inverse). Beyond the image every channel
    is 0, so a border lesion gets a padded patch. Normalisation as the patch contract says (see
    the module docstring).

    Args:
        box: the lesion's cube (:func:`lesion_box`, margin ≥ :data:`MIN_MARGIN_MM`).
        susceptibility: sign-corrected χ (ppm) or filtered phase (rad), GRE grid, paramagnetic
            positive.
        magnitude: the GRE magnitude (echo 1 or combined), GRE grid.
        lesion_mask: the lesion's fraction on the GRE grid (:func:`lesion_mask_in_gre`).
        gre_affine: the GRE grid's voxel-to-world matrix.
        flair: the session's FLAIR (its own grid).
        flair_to_gre: maps FLAIR points to GRE points (the GRE's co-registration onto the FLAIR).
        scale: the susceptibility's robust scale (:func:`susceptibility_scale`), > 0.
        brain_mask: brain (or QSM) mask on the GRE grid, for the intensity medians; ``None``:
            the patch's non-zero voxels.

    Returns:
        The patch, float32, shape ``(len(CHANNELS), *PATCH_SHAPE)``.

    Raises:
        InputError: ``scale`` is not a positive number or the GRE arrays differ in shape.
    """
    if not (np.isfinite(scale) and scale > 0):
        raise InputError("susceptibility scale", expected="a number > 0", found=repr(scale))
    shape = np.shape(susceptibility)[:3]
    for name, arr in (("magnitude", magnitude), ("lesion mask", lesion_mask)):
        if np.shape(arr)[:3] != shape:
            raise InputError(
                name, expected=f"the susceptibility's GRE grid {shape}", found=str(np.shape(arr))
            )
    patch_affine = box.patch_affine(gre_affine)
    chi = _sample_on_patch(susceptibility, gre_affine, box, patch_affine)
    mag = _sample_on_patch(magnitude, gre_affine, box, patch_affine)
    mask = np.clip(_sample_on_patch(lesion_mask, gre_affine, box, patch_affine), 0.0, 1.0)
    flair_patch = _flair_on_patch(flair, flair_to_gre, patch_affine)
    brain = None
    if brain_mask is not None:
        brain = _sample_on_patch(np.asarray(brain_mask, np.float32), gre_affine, box, patch_affine)
        brain = brain >= 0.5
    out = np.stack([chi / scale, _by_median(mag, brain), _by_median(flair_patch, brain), mask])
    return np.ascontiguousarray(out, np.float32)


def _sample_on_patch(
    data: np.ndarray, affine: np.ndarray, box: LesionBox, patch_affine: np.ndarray
) -> np.ndarray:
    """Return GRE-grid ``data`` sampled (linear, 0 outside) on the patch grid, via a crop."""
    crop = box.slices(np.shape(data), pad=2)
    sub = np.asarray(np.asarray(data)[crop], np.float32)
    if sub.size == 0:  # the cube lies wholly outside the image
        return np.zeros(PATCH_SHAPE, np.float32)
    sub_affine = np.asarray(affine, float) @ _translation([s.start for s in crop])
    return resample_to_grid(sub, sub_affine, PATCH_SHAPE, patch_affine, order=1)


def _flair_on_patch(
    flair: nib.Nifti1Image, flair_to_gre: AffineTransform, patch_affine: np.ndarray
) -> np.ndarray:
    """Return the FLAIR sampled on the patch grid through the inverse of ``flair_to_gre``."""
    gre_to_flair = flair_to_gre.inverse()
    corners = _box_corners_world(patch_affine, PATCH_SHAPE)
    flair_shape = tuple(int(n) for n in flair.shape[:3])
    box = _voxel_box(gre_to_flair.apply(corners), flair.affine, flair_shape, pad=2)
    if box is None:
        return np.zeros(PATCH_SHAPE, np.float32)
    lo, hi = box
    crop = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))
    moving = np.asarray(flair.dataobj[crop], np.float32)  # a proxy reads only the crop
    moving = moving.reshape(moving.shape[:3])
    moving_affine = _shifted(flair, lo)
    try:
        moved = resample_array(moving, moving_affine, PATCH_SHAPE, patch_affine, gre_to_flair)
    except RegistrationError:  # no patch voxel lands on the FLAIR
        return np.zeros(PATCH_SHAPE, np.float32)
    return np.asarray(moved, np.float32)


def _by_median(values: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
    """Return ``values`` divided by their median over ``brain`` (the non-zero voxels without)."""
    inside = values[brain] if brain is not None and brain.any() else values[values != 0]
    median = float(np.median(inside)) if inside.size else 0.0
    return values / median if median > 0 else values


# ------------------------------------------------------------------------------------ helpers


def _translation(offset_vox: list[int] | np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = np.asarray(offset_vox, float)
    return m


def _shifted(img: nib.Nifti1Image, lo: np.ndarray) -> np.ndarray:
    """Return the affine of ``img``'s sub-grid starting at voxel ``lo``."""
    return np.asarray(img.affine, float) @ _translation(lo)


def _crop_image(source: Any, affine: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> nib.Nifti1Image:
    """Return voxels ``lo..hi`` (inclusive, inside the grid) of a 3D array or array proxy.

    Slicing a nibabel proxy (``img.dataobj``) reads only what it needs where the format allows.
    """
    crop = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))
    sub = np.asarray(source[crop], np.float32)
    sub = sub.reshape(sub.shape[:3])
    return nib.Nifti1Image(sub, np.asarray(affine, float) @ _translation(lo))


def _box_corners_world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Return the ``(8, 3)`` world points of the outer faces' corners of a grid."""
    n = np.asarray(shape[:3], float)
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    return _to_world(affine, corners * n - 0.5)


def _voxel_box(
    world: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], *, pad: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the voxel range ``(lo, hi)`` (inclusive) of a grid covering ``world`` points.

    Padded by ``pad`` voxels and clipped to the grid; ``None`` when it misses the grid.
    """
    vox = _to_voxels(affine, world)
    lo = np.floor(vox.min(0)).astype(int) - pad
    hi = np.ceil(vox.max(0)).astype(int) + pad
    lo, hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(shape[:3]) - 1)
    return None if np.any(hi < lo) else (lo, hi)


def _to_world(affine: np.ndarray, vox: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, float)
    return vox @ a[:3, :3].T + a[:3, 3]


def _to_voxels(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(np.asarray(affine, float))
    return world @ inv[:3, :3].T + inv[:3, 3]
