"""Registration engines on small phantom volumes: known transforms are recovered."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from smoulder.errors import RegistrationError
from smoulder.phantom.dataset import generate_dataset
from smoulder.phantom.generate import PhantomConfig
from smoulder.registration.engines import halfway, register
from smoulder.registration.fields import exponentiate, sample, smooth_random_velocity, warp
from smoulder.registration.torch_engine import DeformableSettings

RES_MM = 4.0


@pytest.fixture(scope="module")
def phantom4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = PhantomConfig(resolution_mm=RES_MM, sessions=1, lesions=4, seed=2)
    return generate_dataset(tmp_path_factory.mktemp("reg"), cfg)


def images(root: Path) -> tuple[nib.Nifti1Image, nib.Nifti1Image, np.ndarray]:
    anat = root / "sub-01/ses-01/anat"
    truth = root / "derivatives/truth/sub-01/ses-01/anat"
    t1w = nib.load(str(anat / "sub-01_ses-01_T1w.nii.gz"))
    flair = nib.load(str(anat / "sub-01_ses-01_FLAIR.nii.gz"))
    mask = (
        np.asarray(nib.load(str(truth / "sub-01_ses-01_space-T1w_desc-brain_mask.nii.gz")).dataobj)
        > 0
    )
    return t1w, flair, mask


def rigid(
    angles_deg: tuple[float, float, float], shift_mm: tuple[float, float, float]
) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    m[:3, 3] = shift_mm
    return m


def brain_points(img: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(img.affine, np.argwhere(mask))


@pytest.mark.parametrize("engine", ["torch", "greedy"])
@pytest.mark.parametrize(("modality", "metric"), [("T1w", "mi"), ("FLAIR", "mi"), ("T1w", "ncc")])
def test_rigid_recovers_a_header_rotation(
    phantom4: Path, modality: str, metric: str, engine: str
) -> None:
    t1w, flair, mask = images(phantom4)
    moving_src = t1w if modality == "T1w" else flair
    truth = rigid((4.0, -3.0, 5.0), (5.0, -4.0, 3.0))
    # moving the header is exact: a fixed point p shows up at truth @ p in the moving world
    moving = nib.Nifti1Image(np.asarray(moving_src.dataobj, np.float32), truth @ moving_src.affine)
    reg = register(t1w, moving, transform="rigid", metric=metric, engine=engine, device="cpu")
    pts = brain_points(t1w, mask)
    err = np.linalg.norm(reg.forward.apply(pts) - nib.affines.apply_affine(truth, pts), axis=1)
    assert err.mean() < 0.15 * RES_MM, err.mean()
    back = reg.inverse.apply(reg.forward.apply(pts))
    assert np.abs(back - pts).max() < 1e-6


def deformed_pair(
    phantom4: Path,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image, np.ndarray, np.ndarray]:
    """Return fixed, moving, brain mask and the true moving-space point of each brain voxel."""
    t1w, _, mask = images(phantom4)
    data = np.asarray(t1w.dataobj, np.float32)
    vel = smooth_random_velocity(
        data.shape, np.random.default_rng(4), max_voxels=1.0, smoothness_voxels=3.0
    )
    moved = warp(data, exponentiate(vel))
    shift = rigid((2.0, 0.0, -2.0), (2.0, 1.0, -1.0))
    moving = nib.Nifti1Image(moved, shift @ t1w.affine)
    idx = np.argwhere(mask).T.astype(np.float32)
    back = exponentiate(-vel)
    true_vox = idx + np.stack([sample(back[i], idx) for i in range(3)])
    true_world = nib.affines.apply_affine(moving.affine, true_vox.T)
    return t1w, moving, mask, true_world


@pytest.mark.parametrize("engine", ["greedy", "torch"])
def test_deformable_beats_affine(phantom4: Path, engine: str) -> None:
    fixed, moving, mask, true_world = deformed_pair(phantom4)
    pts = brain_points(fixed, mask)
    lin = register(fixed, moving, transform="affine", engine="torch", fixed_mask=mask)
    reg = register(fixed, moving, transform="deformable", engine=engine, fixed_mask=mask)
    err_lin = np.linalg.norm(lin.forward.apply(pts) - true_world, axis=1).mean()
    err = np.linalg.norm(reg.forward.apply(pts) - true_world, axis=1).mean()
    assert err < 0.8 * err_lin, (err, err_lin)
    consistency = np.linalg.norm(reg.inverse.apply(reg.forward.apply(pts)) - pts, axis=1).mean()
    assert consistency < 0.1 * RES_MM


def test_halfway_is_inverse_consistent_and_symmetric(phantom4: Path) -> None:
    fixed, moving, mask, true_world = deformed_pair(phantom4)
    hw = halfway(fixed, moving, engine="greedy", mask_a=mask)
    pts = brain_points(fixed, mask)
    there = hw.a_to_b.apply(pts)
    assert np.linalg.norm(hw.b_to_a.apply(there) - pts, axis=1).mean() < 0.1
    assert np.linalg.norm(there - true_world, axis=1).mean() < 0.5 * RES_MM
    # halfway: each image moves by half the total, so the two legs have equal length
    mid = hw.to_a.inverse().apply(pts)
    leg_a = np.linalg.norm(mid - pts, axis=1).mean()
    leg_b = np.linalg.norm(hw.to_b.apply(mid) - mid, axis=1).mean()
    assert leg_a == pytest.approx(leg_b, rel=0.25)


def test_halfway_on_a_brain_region_is_smaller_and_as_accurate(phantom4: Path) -> None:
    """A halfway grid restricted to the brain and a margin has fewer voxels than the field of
    view's, covers the brain, and recovers the true deformation there as well."""
    fixed, moving, mask, true_world = deformed_pair(phantom4)
    whole = halfway(fixed, moving, engine="greedy", mask_a=mask)
    hw = halfway(fixed, moving, engine="greedy", mask_a=mask, region_a=mask)
    assert np.prod(hw.reference.shape) < 0.9 * np.prod(whole.reference.shape)
    pts = brain_points(fixed, mask)
    grid_pts = nib.affines.apply_affine(
        np.linalg.inv(hw.reference.affine), hw.to_a.inverse().apply(pts)
    )
    assert (grid_pts > -0.5).all() and (grid_pts < np.array(hw.reference.shape) - 0.5).all()
    there = hw.a_to_b.apply(pts)
    error = np.linalg.norm(there - true_world, axis=1).mean()
    error_whole = np.linalg.norm(whole.a_to_b.apply(pts) - true_world, axis=1).mean()
    assert error < max(1.1 * error_whole, 0.1 * RES_MM)
    assert np.linalg.norm(hw.b_to_a.apply(there) - pts, axis=1).mean() < 0.1


def thin_in_plane(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return ``img`` with x and y voxels halved (linear), slices kept: a thick-slice image."""
    from scipy import ndimage

    data = ndimage.zoom(np.asarray(img.dataobj, np.float32), (2, 2, 1), order=1, grid_mode=True)
    affine = img.affine @ np.diag([0.5, 0.5, 1.0, 1.0])
    affine[:3, 3] = nib.affines.apply_affine(img.affine, [-0.25, -0.25, 0.0])
    return nib.Nifti1Image(data, affine)


def test_halfway_grid_of_thick_slices_has_the_images_voxel_volume(phantom4: Path) -> None:
    fixed, moving, mask, true_world = deformed_pair(phantom4)
    a, b = thin_in_plane(fixed), thin_in_plane(moving)  # 2 x 2 x 4 mm voxels
    hw = halfway(a, b, engine="greedy")
    # isotropic, with the voxel volume of the inputs (16 mm³): not their finest 2 mm
    np.testing.assert_allclose(hw.reference.header.get_zooms(), [16 ** (1 / 3)] * 3, rtol=1e-6)
    pts = brain_points(fixed, mask)
    there = hw.a_to_b.apply(pts)
    assert np.linalg.norm(hw.b_to_a.apply(there) - pts, axis=1).mean() < 0.1
    assert np.linalg.norm(there - true_world, axis=1).mean() < 0.5 * RES_MM


def test_same_seed_same_transform(phantom4: Path) -> None:
    t1w, flair, _ = images(phantom4)
    moving = nib.Nifti1Image(
        np.asarray(flair.dataobj, np.float32), rigid((3, 0, 0), (2, 0, 0)) @ flair.affine
    )
    a = register(t1w, moving, transform="rigid", engine="torch", seed=3)
    b = register(t1w, moving, transform="rigid", engine="torch", seed=3)
    np.testing.assert_array_equal(a.forward.steps[0].matrix, b.forward.steps[0].matrix)


def test_greedy_deformable_is_deterministic(phantom4: Path) -> None:
    fixed, moving, mask, _ = deformed_pair(phantom4)
    a = register(fixed, moving, engine="greedy", seed=5, threads=2)
    b = register(fixed, moving, engine="greedy", seed=5, threads=2)
    np.testing.assert_array_equal(a.forward.steps[0].disp_mm, b.forward.steps[0].disp_mm)
    np.testing.assert_array_equal(a.inverse.steps[0].disp_mm, b.inverse.steps[0].disp_mm)


def test_errors_speak(phantom4: Path) -> None:
    t1w, flair, mask = images(phantom4)
    with pytest.raises(RegistrationError, match="empty"):
        register(t1w, flair, transform="rigid", fixed_mask=np.zeros_like(mask))
    four_d = nib.Nifti1Image(np.zeros((*t1w.shape, 2), np.float32), t1w.affine)
    with pytest.raises(RegistrationError, match="3D"):
        register(t1w, four_d, transform="rigid")
    blank = nib.Nifti1Image(np.zeros(t1w.shape, np.float32), t1w.affine)
    with pytest.raises(RegistrationError, match="no signal"):
        register(t1w, blank, transform="rigid")
    far = nib.Nifti1Image(
        np.asarray(flair.dataobj, np.float32), rigid((0, 0, 0), (900.0, 0, 0)) @ flair.affine
    )
    with pytest.raises(RegistrationError, match="overlap"):
        register(t1w, far, transform="rigid", engine="torch", initialise="header")
    with pytest.raises(RegistrationError, match="transform"):
        register(t1w, flair, transform="bspline")


def test_fireants_engine_maps_points_like_the_others(phantom4: Path) -> None:
    pytest.importorskip("fireants")
    t1w, _, mask = images(phantom4)
    truth = rigid((3.0, -2.0, 2.0), (3.0, -2.0, 2.0))
    moving = nib.Nifti1Image(np.asarray(t1w.dataobj, np.float32), truth @ t1w.affine)
    # few iterations: a smoke test of the engine and of its coordinate conventions
    short = DeformableSettings(shrink=(4, 2), iterations=(60, 30))
    reg = register(t1w, moving, metric="ncc", engine="fireants", device="cpu", settings=short)
    pts = brain_points(t1w, mask)
    err = np.linalg.norm(reg.forward.apply(pts) - nib.affines.apply_affine(truth, pts), axis=1)
    assert err.mean() < 0.25 * RES_MM, err.mean()
    back = np.linalg.norm(reg.inverse.apply(reg.forward.apply(pts)) - pts, axis=1).mean()
    assert back < 0.1 * RES_MM, back


def test_register_command_writes_transforms_that_ants_applies(
    phantom4: Path, tmp_path: Path
) -> None:
    import ants

    from smoulder.cli import main

    fixed, moving, mask, true_world = deformed_pair(phantom4)
    nib.save(fixed, tmp_path / "fixed.nii.gz")
    nib.save(moving, tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    args = ["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz")]
    labels = ["--fixed-label", "ses1", "--moving-label", "ses2", "--prefix", "sub-01_"]
    assert main([*args, "-o", str(out), *labels, "--engine", "greedy"]) == 0
    xfm = out / "sub-01_from-ses2_to-ses1_mode-image_xfm.nii.gz"
    ours = np.asarray(nib.load(out / "sub-01_space-ses1_desc-ses2.nii.gz").dataobj)
    theirs = ants.apply_transforms(
        ants.image_read(str(tmp_path / "fixed.nii.gz")),
        ants.image_read(str(tmp_path / "moving.nii.gz")),
        [str(xfm)],
        interpolator="linear",
    ).numpy()
    inside = mask & (ours > 0)
    scale = np.percentile(ours[inside], 99)
    assert np.abs(ours - theirs)[inside].mean() < 0.01 * scale
    assert (out / "sub-01_from-ses1_to-ses2_mode-image_xfm.nii.gz").exists()
    logjac = np.asarray(nib.load(out / "sub-01_space-ses1_desc-logjacobian.nii.gz").dataobj)
    assert np.isfinite(logjac).all() and logjac[mask].std() > 0
    assert not list(out.glob("*.part*"))

    half = tmp_path / "half"
    assert main([*args, "-o", str(half), *labels, "--halfway", "--engine", "greedy"]) == 0
    for stem in ("from-ses1_to-halfway", "from-ses2_to-halfway", "from-ses2_to-ses1"):
        assert (half / f"sub-01_{stem}_mode-image_xfm.nii.gz").exists(), stem
    assert (half / "sub-01_space-halfway_desc-ses2.nii.gz").exists()


def test_register_command_names_a_missing_file(tmp_path: Path, capsys) -> None:
    from smoulder.cli import main

    status = main(["register", str(tmp_path / "nope.nii.gz"), str(tmp_path / "b.nii"), "-o", "x"])
    assert status == 2
    assert "nope.nii.gz" in capsys.readouterr().err
