"""Tests of the rule-based rim detector and of lesion patches in the GRE grid.

Every case is a small synthetic volume made on the fly: a spherical lesion at 0.8 mm, white
matter at −0.03 ppm, lesion at +0.01 ppm, optionally a paramagnetic shell of 1.5 mm inside the
edge (complete, or a cap of part of the sphere), a vein of 0.6 mm radius, and Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest

from smoulder.registration.transforms import AffineTransform
from smoulder.rims.patches import (
    CHANNELS,
    MIN_MARGIN_MM,
    PATCH_SHAPE,
    LesionBox,
    extract_patch,
    field_of_view_fraction,
    in_field_of_view,
    lesion_box,
    lesion_labels_in_gre,
    lesion_mask_in_gre,
    susceptibility_scale,
)
from smoulder.rims.rules import RimMeasures, lesion_regions, measure_rim

VOXEL_MM = 0.8
SHAPE = (44, 44, 44)
WM_PPM, LESION_PPM, VEIN_PPM = -0.03, 0.01, 0.40


@dataclass
class Case:
    """A synthetic session on one grid: χ (ppm), magnitude, lesion fraction, WM probability."""

    chi: np.ndarray
    magnitude: np.ndarray
    lesion: np.ndarray
    wm: np.ndarray
    affine: np.ndarray


def _fraction(distance_mm: np.ndarray) -> np.ndarray:
    """Return the partial-volume fraction of a region of signed distance ``distance_mm``."""
    return np.clip(0.5 - distance_mm / VOXEL_MM, 0.0, 1.0)


def _points_mm(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Return the world points ``(3, *shape)`` of a grid's voxel centres."""
    idx = np.indices(shape, dtype=float)
    return np.tensordot(affine[:3, :3], idx, axes=1) + affine[:3, 3, None, None, None]


def _line_distance(points: np.ndarray, through: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Return the distance (mm) of ``points`` ``(3, …)`` from an infinite line."""
    d = direction / np.linalg.norm(direction)
    rel = points - through.reshape(3, 1, 1, 1)
    along = np.tensordot(d, rel, axes=1)
    return np.linalg.norm(rel - d.reshape(3, 1, 1, 1) * along, axis=0)


def make_case(
    *,
    rim_ppm: float = 0.0,
    rim_mm: float = 1.5,
    coverage: float = 1.0,
    cap_axis: tuple[float, float, float] = (1.0, 0.0, 0.0),
    iso_rim: bool = False,
    vein: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
    radius_mm: float = 4.5,
    centre_vox: tuple[float, float, float] | None = None,
    noise_ppm: float = 0.01,
    shape: tuple[int, int, int] = SHAPE,
    seed: int = 0,
) -> Case:
    """Return a synthetic lesion; ``vein``: (a point, a direction) in mm from the lesion centre."""
    affine = np.diag([VOXEL_MM] * 3 + [1.0])
    centre = np.array(centre_vox if centre_vox is not None else [(n - 1) / 2 for n in shape])
    centre_mm = centre * VOXEL_MM
    pts = _points_mm(shape, affine)
    rel = pts - centre_mm.reshape(3, 1, 1, 1)
    r = np.linalg.norm(rel, axis=0)
    lesion = _fraction(r - radius_mm)
    rim = lesion - _fraction(r - radius_mm + rim_mm)
    if coverage < 1.0:
        axis = np.asarray(cap_axis) / np.linalg.norm(cap_axis)
        cos = np.tensordot(axis, rel, axes=1) / np.maximum(r, 1e-6)
        rim *= np.clip((cos - (1.0 - 2.0 * coverage)) / 0.15 + 0.5, 0.0, 1.0)
    chi = WM_PPM * (1 - lesion) + LESION_PPM * lesion + (rim_ppm - LESION_PPM) * rim
    magnitude = 1.0 - 0.2 * lesion
    if iso_rim:
        magnitude = magnitude - 0.3 * rim  # visible on the magnitude, χ unchanged
    if vein is not None:
        point, direction = (np.asarray(v, float) for v in vein)
        in_vein = _fraction(_line_distance(pts, centre_mm + point, direction) - 0.6)
        chi = chi * (1 - in_vein) + VEIN_PPM * in_vein
        magnitude = magnitude * (1 - 0.6 * in_vein)
    rng = np.random.default_rng(seed)
    chi = chi + rng.normal(0.0, noise_ppm, shape)
    wm = 1.0 - lesion
    return Case(
        chi.astype(np.float32),
        magnitude.astype(np.float32),
        lesion.astype(np.float32),
        wm.astype(np.float32),
        affine,
    )


def measure(case: Case) -> RimMeasures:
    return measure_rim(case.chi, case.lesion, case.affine, input_kind="qsm", wm=case.wm)


# ------------------------------------------------------------------------------ the detector


def test_clear_rim_is_called() -> None:
    m = measure(make_case(rim_ppm=0.07))
    assert m.rim_consensus and m.rule_call
    assert m.rim_coverage > 0.9
    assert m.rim_mean > m.core_mean > m.shell_mean
    assert not m.central_vein


def test_clear_rimless_lesion_is_not_called() -> None:
    m = measure(make_case())
    assert not m.rim_consensus
    assert m.rim_coverage < 0.3
    assert abs(m.core_mean - LESION_PPM) < 0.005
    assert abs(m.shell_mean - WM_PPM) < 0.005


def test_iso_rim_is_not_called() -> None:
    m = measure(make_case(iso_rim=True))
    assert not m.rim_consensus
    assert m.rim_coverage < 0.3


@pytest.mark.parametrize(
    "direction",
    [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (0.0, 1.0, 1.0)],
    ids=["axial", "in-plane", "oblique"],
)
def test_vein_beside_a_lesion_is_not_called(direction: tuple[float, float, float]) -> None:
    # the vein's axis is tangent to the lesion surface: 0.6 mm radius, touching the edge
    m = measure(make_case(vein=((4.5 + 0.6, 0.0, 0.0), direction)))
    assert not m.rim_consensus
    assert m.rim_coverage < 0.3
    assert not m.central_vein


def test_partial_rim_of_a_third_is_not_called_and_covers_a_third() -> None:
    m = measure(make_case(rim_ppm=0.07, coverage=1 / 3, cap_axis=(1.0, 0.0, 0.0)))
    assert not m.rim_consensus and not m.rule_call
    assert abs(m.rim_coverage - 1 / 3) < 0.15


def test_partial_cap_facing_the_slices_passes_consensus_but_is_not_called() -> None:
    # a cap about the slice axis shows complete rings on the slices that cut it, as a rater
    # would see them; its 3D coverage keeps it from the rule-based call
    m = measure(make_case(rim_ppm=0.07, coverage=1 / 3, cap_axis=(0.0, 0.0, 1.0)))
    assert m.rim_consensus
    assert abs(m.rim_coverage - 1 / 3) < 0.15
    assert not m.rule_call


def test_central_vein_is_signed_and_not_a_rim() -> None:
    m = measure(make_case(vein=((0.0, 0.0, 0.0), (0.3, 0.2, 1.0))))
    assert m.central_vein
    assert not m.rim_consensus


@pytest.mark.parametrize("seed", range(3))
def test_rim_call_is_stable_over_noise(seed: int) -> None:
    assert measure(make_case(rim_ppm=0.06, seed=seed, noise_ppm=0.015)).rim_consensus
    assert measure(make_case(rim_ppm=0.06, seed=seed, noise_ppm=0.015)).rule_call
    assert not measure(make_case(seed=seed, noise_ppm=0.015)).rim_consensus


def test_row_names_carry_units() -> None:
    case = make_case(rim_ppm=0.07)
    qsm = measure(case).row()
    phase = measure_rim(case.chi, case.lesion, case.affine, input_kind="phase").row()
    assert {"rim_chi_ppm", "core_chi_ppm", "shell_chi_ppm", "rim_coverage"} <= set(qsm)
    assert {"rim_phase_rad", "core_phase_rad", "shell_phase_rad"} <= set(phase)
    assert isinstance(qsm["rim_consensus"], bool) and isinstance(qsm["central_vein"], bool)


def test_regions_keep_other_lesions_out_of_the_shell() -> None:
    case = make_case()
    other = np.zeros(SHAPE, bool)
    other[:, :, :8] = True
    regions = lesion_regions(case.lesion, case.affine, wm=case.wm, other_lesions=other)
    assert not (regions.shell & other[regions.slices]).any()
    assert not (regions.band & regions.core).any()
    assert regions.core.any() and regions.band.any() and regions.shell.any()


# ------------------------------------------------------------------------------------ patches


def _gre(case: Case) -> nib.Nifti1Image:
    return nib.Nifti1Image(case.magnitude, case.affine)


def _patch(
    case: Case,
    flair: nib.Nifti1Image,
    to_gre: AffineTransform,
    box: LesionBox | None = None,
) -> np.ndarray:
    scale = susceptibility_scale(case.chi, case.lesion, case.affine, input_kind="qsm", wm=case.wm)
    return extract_patch(
        box or lesion_box(case.lesion, case.affine),
        susceptibility=case.chi,
        magnitude=case.magnitude,
        lesion_mask=case.lesion,
        gre_affine=case.affine,
        flair=flair,
        flair_to_gre=to_gre,
        scale=scale,
    )


def test_patch_follows_the_contract() -> None:
    case = make_case(rim_ppm=0.07)
    patch = _patch(
        case, nib.Nifti1Image(1.0 + case.lesion, case.affine), AffineTransform.identity()
    )
    assert patch.shape == (len(CHANNELS), *PATCH_SHAPE) and patch.dtype == np.float32
    chi, mag, flair, mask = patch
    assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask[12, 12, 12] == 1.0
    assert 0.8 < np.median(mag) < 1.2 and 0.8 < np.median(flair[flair > 0]) < 1.5
    assert chi[mask > 0.9].mean() > 0  # rims and core above the white matter, in shell MADs


def test_box_is_cubic_in_mm_with_the_margin() -> None:
    lesion = np.zeros((30, 30, 10), np.float32)
    lesion[10:18, 12:16, 4:6] = 1.0
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    box = lesion_box(lesion, affine)
    assert box.half_width_mm == pytest.approx(4.0 / 2 + MIN_MARGIN_MM)  # 8 × 0.5 mm is longest
    assert box.half_width_vox.tolist() == pytest.approx([10.0, 10.0, 2.5])


def test_border_lesion_gives_a_padded_patch() -> None:
    case = make_case(rim_ppm=0.07, centre_vox=(2.0, 20.0, 41.0))
    box = lesion_box(case.lesion, case.affine)
    assert box.is_padded(case.chi.shape)
    patch = _patch(
        case, nib.Nifti1Image(1.0 + case.lesion, case.affine), AffineTransform.identity()
    )
    assert patch.shape == (len(CHANNELS), *PATCH_SHAPE)
    assert np.isfinite(patch).all()
    assert (patch[1, 0] == 0).all()  # beyond the image along the first axis: zero padding
    assert patch[3].max() == 1.0


def _rigid(
    angles_deg: tuple[float, float, float], shift_mm: tuple[float, float, float]
) -> np.ndarray:
    """Return a 4×4 rotation (about x, then y, then z) with a translation."""
    m = np.eye(4)
    for axis, deg in enumerate(angles_deg):
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        i, j = [a for a in range(3) if a != axis]
        rot = np.eye(4)
        rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
        m = rot @ m
    m[:3, 3] = shift_mm
    return m


def test_patch_through_a_rigid_equals_the_patch_on_the_matching_grid() -> None:
    case = make_case(rim_ppm=0.07, radius_mm=4.0, centre_vox=(20.0, 23.0, 21.0))
    gre = _gre(case)
    centre_mm = np.array([20.0, 23.0, 21.0]) * VOXEL_MM

    def flair_at(points_gre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the lesion mask and a FLAIR at GRE-space points ``(3, …)``."""
        rel = points_gre - centre_mm.reshape(3, 1, 1, 1)
        inside = np.linalg.norm(rel, axis=0) <= 4.0
        return inside.astype(np.uint8), (1.0 + inside + 0.02 * rel[0]).astype(np.float32)

    # the matching grid: the FLAIR already on the GRE grid, identity transform
    mask_same, flair_same = flair_at(_points_mm(SHAPE, case.affine))
    # a FLAIR of 1 mm voxels on a rotated, shifted grid; flair_to_gre maps FLAIR → GRE points
    to_gre = _rigid((8.0, -5.0, 12.0), (3.0, -2.0, 1.5))
    flair_affine = np.linalg.inv(to_gre) @ _rigid((0.0, 0.0, 30.0), (-6.0, -10.0, -5.0))
    flair_shape = (48, 48, 40)
    points_gre = np.tensordot(to_gre[:3, :3], _points_mm(flair_shape, flair_affine), axes=1)
    mask_rot, flair_rot = flair_at(points_gre + to_gre[:3, 3, None, None, None])
    transform = AffineTransform(to_gre)

    fraction = lesion_mask_in_gre(nib.Nifti1Image(mask_rot, flair_affine), gre, transform)
    direct = mask_same.astype(bool)
    mapped = fraction >= 0.5
    dice = 2 * (mapped & direct).sum() / (mapped.sum() + direct.sum())
    assert dice > 0.85
    centroid = np.argwhere(mapped).mean(0) * VOXEL_MM
    assert np.linalg.norm(centroid - centre_mm) < 0.3  # the mask lands where it should

    labels = lesion_labels_in_gre(nib.Nifti1Image(mask_rot * 7, flair_affine), gre, transform)
    assert labels[20, 23, 21] == 7 and labels[2, 2, 2] == 0

    case_same = Case(case.chi, case.magnitude, direct.astype(np.float32), case.wm, case.affine)
    box = lesion_box(case_same.lesion, case.affine)
    same = _patch(case_same, nib.Nifti1Image(flair_same, case.affine), AffineTransform.identity())
    case_rot = Case(case.chi, case.magnitude, fraction, case.wm, case.affine)
    rotated = _patch(case_rot, nib.Nifti1Image(flair_rot, flair_affine), transform, box)
    for channel in (2, 3):  # FLAIR and mask: through the rigid vs on the matching grid
        r = np.corrcoef(same[channel].ravel(), rotated[channel].ravel())[0, 1]
        assert r > 0.9, CHANNELS[channel]
    assert np.abs(same[3] - rotated[3]).mean() < 0.05
    np.testing.assert_allclose(same[1], rotated[1])  # GRE channels: the same voxels


def test_field_of_view_decides_not_assessed() -> None:
    mask = np.zeros((30, 30, 30), np.uint8)
    mask[10:14, 10:14, 10:14] = 1
    flair = nib.Nifti1Image(mask, np.eye(4))
    gre = nib.Nifti1Image(np.zeros((30, 30, 30), np.float32), np.eye(4))
    assert in_field_of_view(flair, gre, AffineTransform.identity())
    shifted = np.eye(4)
    shifted[2, 3] = 25.0  # the lesion lands above the GRE slab
    assert field_of_view_fraction(flair, gre, AffineTransform(shifted)) == 0.0
    assert not in_field_of_view(flair, gre, AffineTransform(shifted))
    assert lesion_mask_in_gre(flair, gre, AffineTransform(shifted)).max() == 0.0
    valid = np.zeros((30, 30, 30), bool)
    valid[:, :, :12] = True  # the QSM mask covers half the lesion
    assert field_of_view_fraction(flair, gre, AffineTransform.identity(), valid=valid) == 0.5


def test_scale_is_floored_on_noise_free_data() -> None:
    case = make_case(noise_ppm=0.0)
    scale = susceptibility_scale(case.chi, case.lesion, case.affine, input_kind="qsm", wm=case.wm)
    assert scale == pytest.approx(0.005)
    noisy = make_case(noise_ppm=0.02)
    scale = susceptibility_scale(noisy.chi, noisy.lesion, noisy.affine, input_kind="qsm")
    assert 0.01 < scale < 0.02  # the MAD of N(0, σ) is 0.674 σ
