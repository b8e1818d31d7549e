"""Tests of world-space transforms, ITK/ANTs file formats, resampling and Jacobian maps."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from smoulder.errors import InputError, RegistrationError
from smoulder.registration import fields
from smoulder.registration.itk import (
    load_affine,
    load_displacement_field,
    save_affine,
    save_displacement,
    save_displacement_field,
    swap_ras_lps,
)
from smoulder.registration.transforms import (
    AffineTransform,
    DisplacementTransform,
    TransformChain,
    jacobian_determinant_map,
    load_transform,
    log_jacobian_map,
    require_mask,
    resample,
    resample_array,
)

ants = pytest.importorskip("ants")

SHAPE = (32, 30, 28)


def rotation(axis: int, degrees: float) -> np.ndarray:
    """Return a 4×4 rotation about world ``axis``."""
    a = np.deg2rad(degrees)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[i, i] = m[j, j] = np.cos(a)
    m[i, j], m[j, i] = -np.sin(a), np.sin(a)
    return m


def grid_affine(spacing: tuple[float, float, float], *, degrees: float = 0.0) -> np.ndarray:
    """Return a voxel-to-world affine centred near the origin (signed spacing flips an axis)."""
    m = np.diag([*spacing, 1.0])
    m[:3, 3] = -0.5 * np.array(spacing) * (np.array(SHAPE) - 1)
    return rotation(2, degrees) @ m


def blobs(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    """Return a smooth positive test volume (a few Gaussian blobs on a low background)."""
    rng = np.random.default_rng(seed)
    grid = fields.identity_grid(shape)
    img = np.full(shape, 10.0, np.float32)
    for _ in range(6):
        centre = rng.uniform(0.25, 0.75, 3) * np.array(shape)
        width = rng.uniform(2.0, 5.0)
        dist2 = ((grid - centre[:, None, None, None]) ** 2).sum(0)
        img += rng.uniform(50, 100) * np.exp(-dist2 / (2 * width**2))
    return ndimage.gaussian_filter(img, 1.0)


def smooth_field(
    seed: int, *, max_voxels: float = 2.0, smoothness_voxels: float = 4.0, fade: bool = False
) -> np.ndarray:
    """Return a smooth diffeomorphic voxel displacement on ``SHAPE`` (optionally fading to 0)."""
    rng = np.random.default_rng(seed)
    weight = None
    if fade:
        weight = np.zeros(SHAPE, np.float32)
        weight[6:-6, 6:-6, 6:-6] = 1.0
        weight = ndimage.gaussian_filter(weight, 2.0)
    velocity = fields.smooth_random_velocity(
        SHAPE, rng, max_voxels=max_voxels, smoothness_voxels=smoothness_voxels, weight=weight
    )
    return fields.exponentiate(velocity)


def interior_points(affine: np.ndarray, margin: int = 6, step: int = 3) -> np.ndarray:
    """Return world points of grid voxels at least ``margin`` voxels from the border."""
    axes = [np.arange(margin, n - margin, step) for n in SHAPE]
    idx = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3, None]).T


def small_affine() -> np.ndarray:
    m = rotation(0, 6.0) @ rotation(1, -4.0)
    m[:3, 3] = [2.0, -1.5, 1.0]
    return m


GRIDS = {
    "iso 1 mm": grid_affine((1.0, 1.0, 1.0)),
    "anisotropic, x flipped": grid_affine((-1.5, 1.2, 1.6)),
    "oblique": grid_affine((1.3, 1.1, 1.4), degrees=12.0),
}


# ------------------------------------------------------------------------------- affine


@pytest.mark.parametrize(
    "matrix",
    [
        small_affine(),
        np.array(
            [[1.1, 0.2, 0.0, 3.0], [0.0, 0.9, 0.1, -2.0], [0.05, 0.0, 1.2, 1.0], [0, 0, 0, 1]]
        ),
        np.diag([-1.0, 1.0, 1.0, 1.0]),
    ],
    ids=["rigid", "sheared scaling", "flip"],
)
def test_affine_composed_with_inverse_is_identity(matrix: np.ndarray) -> None:
    transform = AffineTransform(matrix)
    points = np.random.default_rng(0).uniform(-80, 80, (50, 3))
    back = transform.inverse().apply(transform.apply(points))
    np.testing.assert_allclose(back, points, atol=1e-9)
    np.testing.assert_allclose(transform.inverse().matrix @ matrix, np.eye(4), atol=1e-12)


# ------------------------------------------------------------------------------- displacement


@pytest.mark.parametrize("affine", GRIDS.values(), ids=GRIDS.keys())
def test_displacement_inverse_is_consistent(affine: np.ndarray) -> None:
    u_vox = smooth_field(2, max_voxels=2.5, smoothness_voxels=6.0)
    forward = DisplacementTransform.from_voxel_field(u_vox, affine)
    assert np.abs(forward.disp_mm).max() > 2.0  # a few millimetres
    inverse = forward.inverse()
    points = interior_points(affine)
    for first, second in [(forward, inverse), (inverse, forward)]:
        error_mm = np.linalg.norm(second.apply(first.apply(points)) - points, axis=1)
        assert error_mm.max() < 0.05


def test_displacement_from_voxel_field_resamples_as_fields_warp() -> None:
    affine = GRIDS["oblique"]
    u_vox = smooth_field(3)
    image = blobs(SHAPE)
    img = nib.Nifti1Image(image, affine)
    ours = resample(img, img, DisplacementTransform.from_voxel_field(u_vox, affine))
    expected = fields.warp(image, u_vox)
    inside = np.all((fields.identity_grid(SHAPE) + u_vox >= 0), axis=0)
    inside &= np.all(
        fields.identity_grid(SHAPE) + u_vox <= np.array(SHAPE)[:, None, None, None] - 1, axis=0
    )
    np.testing.assert_allclose(np.asarray(ours.dataobj)[inside], expected[inside], atol=1e-3)


def test_chain_inverse_brings_points_back() -> None:
    affine = GRIDS["anisotropic, x flipped"]
    chain = TransformChain(
        [
            AffineTransform(small_affine()),
            DisplacementTransform.from_voxel_field(smooth_field(4), affine),
            AffineTransform(rotation(2, 5.0)),
        ]
    )
    points = interior_points(affine, margin=8)
    back = chain.inverse().apply(chain.apply(points))
    assert np.linalg.norm(back - points, axis=1).max() < 0.05
    assert len(chain.inverse()) == 3
    assert len(TransformChain([chain, chain])) == 6  # nested chains are flattened


def test_chain_to_displacement_matches_the_chain_on_the_grid() -> None:
    affine = GRIDS["oblique"]
    chain = TransformChain(
        [
            DisplacementTransform.from_voxel_field(smooth_field(5), affine),
            AffineTransform(small_affine()),
        ]
    )
    reference = nib.Nifti1Image(np.zeros(SHAPE, np.float32), affine)
    dense = chain.to_displacement(reference)
    points = interior_points(affine, margin=0, step=1)
    np.testing.assert_allclose(dense.apply(points), chain.apply(points), atol=1e-4)


# ------------------------------------------------------------------------------- ITK / ANTs files


def _ants_resample(
    tmp_path: Path,
    moving: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    transformlist: list[Path],
    interpolator: str = "linear",
) -> np.ndarray:
    nib.save(moving, tmp_path / "moving.nii.gz")
    nib.save(reference, tmp_path / "reference.nii.gz")
    out = ants.apply_transforms(
        fixed=ants.image_read(str(tmp_path / "reference.nii.gz")),
        moving=ants.image_read(str(tmp_path / "moving.nii.gz")),
        transformlist=[str(p) for p in transformlist],
        whichtoinvert=[False] * len(transformlist),
        interpolator=interpolator,
    )
    out.to_file(str(tmp_path / "ants.nii.gz"))
    return nib.load(tmp_path / "ants.nii.gz").get_fdata()


CHAINS = {
    # the usual registration output: a warp on the fixed grid, then an affine to moving
    "warp then affine": lambda a: [
        DisplacementTransform.from_voxel_field(smooth_field(6), a),
        AffineTransform(small_affine()),
    ],
    "two affines": lambda a: [AffineTransform(small_affine()), AffineTransform(rotation(2, -8.0))],
    # ITK takes a zero displacement off the field's grid, smoulder the edge value: fade the field
    "affine then faded warp": lambda a: [
        AffineTransform(small_affine()),
        DisplacementTransform.from_voxel_field(smooth_field(7, max_voxels=3.0, fade=True), a),
    ],
    "inverse of warp then affine": lambda a: [
        TransformChain(CHAINS["warp then affine"](a)).inverse()
    ],
}


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("grid", ["anisotropic, x flipped", "oblique"])
def test_resample_matches_ants_apply_transforms(tmp_path: Path, name: str, grid: str) -> None:
    ref_affine = GRIDS[grid]
    mov_affine = grid_affine((1.3, 1.5, 1.45), degrees=-5.0)
    moving = nib.Nifti1Image(blobs(SHAPE), mov_affine)
    reference = nib.Nifti1Image(np.zeros(SHAPE, np.float32), ref_affine)
    chain = TransformChain(CHAINS[name](ref_affine))
    ours = np.asarray(resample(moving, reference, chain).dataobj)
    theirs = _ants_resample(tmp_path, moving, reference, chain.save(tmp_path, "chain"))
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    assert np.abs(ours - theirs).mean() < 1e-3 * np.ptp(ours)
    # and the files read back as the same chain
    again = TransformChain.load(chain.save(tmp_path, "again"))
    points = interior_points(ref_affine)
    np.testing.assert_allclose(again.apply(points), chain.apply(points), atol=1e-3)


def test_load_affine_reads_txt_and_mat_alike(tmp_path: Path) -> None:
    matrix = np.array(
        [[1.1, 0.2, 0.0, 3.0], [0.0, 0.9, 0.1, -2.0], [0.05, 0.0, 1.2, 1.0], [0, 0, 0, 1]]
    )
    from_mat = load_affine(save_affine(matrix, tmp_path / "a.mat"))
    from_txt = load_affine(save_affine(matrix, tmp_path / "a.txt"))
    np.testing.assert_allclose(from_mat, matrix, atol=1e-12)
    np.testing.assert_allclose(from_txt, matrix, atol=1e-12)
    assert isinstance(load_transform(tmp_path / "a.mat"), AffineTransform)


ITK_TYPES = {
    "AffineTransform": [1.1, 0.2, 0.0, 0.0, 0.9, 0.1, 0.05, 0.0, 1.2, 3.0, -2.0, 1.0],
    "Euler3DTransform": [0.1, -0.2, 0.3, 1.0, 2.0, 3.0],
    "QuaternionRigidTransform": [0.1, 0.2, 0.3, 0.9, 1.0, 2.0, 3.0],
    "Similarity3DTransform": [0.1, 0.2, -0.3, 1.0, 2.0, 3.0, 1.1],
    "Rigid3DTransform": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, -4.0, 5.0, 6.0],
}


def _check_against_ants(path: Path, ants_transform: object) -> np.ndarray:
    """Return our RAS matrix of ``path`` after comparing it with ANTs on a few points."""
    matrix = load_affine(path)
    points_lps = np.random.default_rng(0).uniform(-90, 90, (6, 3))
    for p in points_lps:
        expected = np.array(ants_transform.apply_to_point(tuple(p)))  # LPS in, LPS out
        ours = (swap_ras_lps(matrix) @ np.r_[p, 1.0])[:3]
        np.testing.assert_allclose(ours, expected, atol=1e-3)
    return matrix


@pytest.mark.parametrize("kind", ITK_TYPES)
@pytest.mark.parametrize("suffix", [".txt", ".mat"])
def test_load_affine_matches_ants_for_itk_types(tmp_path: Path, kind: str, suffix: str) -> None:
    tx = ants.create_ants_transform(
        transform_type=kind, precision="double", dimension=3, center=(4.0, -5.0, 6.0)
    )
    tx.set_parameters(ITK_TYPES[kind])
    path = tmp_path / f"tx{suffix}"
    ants.write_transform(tx, str(path))
    _check_against_ants(path, tx)


def test_real_open_ms_transforms_match_ants(shared_data: Path) -> None:
    paths = sorted((shared_data / "open_ms" / "longitudinal" / "patient01").glob("*.txt"))
    if not paths:
        pytest.skip("no open_ms transforms")
    for path in paths:
        matrix = _check_against_ants(path, ants.read_transform(str(path)))
        assert np.linalg.det(matrix[:3, :3]) > 0


def test_displacement_field_files_round_trip_and_read_ants_fields(tmp_path: Path) -> None:
    affine = GRIDS["oblique"]
    field = DisplacementTransform.from_voxel_field(smooth_field(8), affine)
    disp, loaded_affine = load_displacement_field(field.save(tmp_path / "warp.nii.gz"))
    np.testing.assert_allclose(disp, field.disp_mm, atol=1e-6)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-5)
    # save_displacement_field (target positions) writes the same file content
    world = np.tensordot(affine[:3, :3], fields.identity_grid(SHAPE, np.float64), axes=1)
    world += affine[:3, 3, None, None, None]
    save_displacement_field(world + field.disp_mm, affine, tmp_path / "target.nii.gz")
    np.testing.assert_allclose(
        load_displacement_field(tmp_path / "target.nii.gz")[0], disp, atol=1e-4
    )
    # a field written by ANTs (an affine sampled on a grid) reads as that affine
    reference = nib.Nifti1Image(np.zeros(SHAPE, np.float32), affine)
    nib.save(reference, tmp_path / "reference.nii.gz")
    matrix = small_affine()
    save_affine(matrix, tmp_path / "affine.mat")
    written = ants.apply_transforms(
        fixed=ants.image_read(str(tmp_path / "reference.nii.gz")),
        moving=ants.image_read(str(tmp_path / "reference.nii.gz")),
        transformlist=[str(tmp_path / "affine.mat")],
        whichtoinvert=[False],
        compose=str(tmp_path / "ants_"),
    )
    assert nib.load(written).shape == (*SHAPE, 1, 3)
    from_ants = DisplacementTransform.load(written)
    points = interior_points(affine)
    np.testing.assert_allclose(
        from_ants.apply(points), AffineTransform(matrix).apply(points), atol=1e-3
    )


def test_save_displacement_refuses_a_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"expected a \(3, X, Y, Z\) displacement"):
        save_displacement(np.zeros((2, 4, 4, 4)), np.eye(4), tmp_path / "bad.nii.gz")


# ------------------------------------------------------------------------------- resampling


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, np.int16)
    grid = fields.identity_grid(SHAPE)
    for value, centre, radius in [(1, (10, 10, 10), 6), (2, (20, 18, 14), 5), (7, (12, 20, 18), 4)]:
        dist2 = ((grid - np.array(centre, np.float32)[:, None, None, None]) ** 2).sum(0)
        labels[dist2 <= radius**2] = value
    return labels


@pytest.mark.parametrize("interpolation", ["label", "nearest"])
def test_label_and_nearest_keep_values_and_dtype(interpolation: str) -> None:
    affine = GRIDS["anisotropic, x flipped"]
    labels = _labels()
    moving = nib.Nifti1Image(labels, affine)
    transform = TransformChain(
        [
            AffineTransform(small_affine()),
            DisplacementTransform.from_voxel_field(smooth_field(9), affine),
        ]
    )
    out = resample(moving, moving, transform, interpolation=interpolation)
    data = np.asarray(out.dataobj)
    assert data.dtype == np.int16
    assert set(np.unique(data)) == {0, 1, 2, 7}
    identity = resample(moving, moving, AffineTransform.identity(), interpolation=interpolation)
    np.testing.assert_array_equal(np.asarray(identity.dataobj), labels)


def test_label_resampling_agrees_with_per_label_indicators() -> None:
    affine = GRIDS["oblique"]
    labels = _labels()
    moving = nib.Nifti1Image(labels, affine)
    transform = AffineTransform(small_affine())
    ours = np.asarray(resample(moving, moving, transform, interpolation="label").dataobj)
    values = np.unique(labels)
    stack = [
        np.asarray(
            resample(
                nib.Nifti1Image((labels == v).astype(np.float32), affine), moving, transform
            ).dataobj
        )
        for v in values
    ]
    expected = values[np.argmax(np.stack(stack), axis=0)]
    assert (ours == expected).mean() > 0.999


@pytest.mark.parametrize("interpolation", ["linear", "bspline"])
def test_linear_and_bspline_are_close_on_a_smooth_image(interpolation: str) -> None:
    affine = GRIDS["iso 1 mm"]
    world = np.tensordot(affine[:3, :3], fields.identity_grid(SHAPE, np.float64), axes=1)
    world += affine[:3, 3, None, None, None]

    def smooth(points: np.ndarray) -> np.ndarray:
        return 100 + 40 * np.sin(points[0] / 7.0) * np.cos(points[1] / 9.0) + points[2]

    moving = nib.Nifti1Image(smooth(world).astype(np.float32), affine)
    transform = AffineTransform(small_affine())
    out = np.asarray(resample(moving, moving, transform, interpolation=interpolation).dataobj)
    mapped = transform.apply(world.reshape(3, -1).T).T.reshape(3, *SHAPE)
    inner = (slice(6, -6),) * 3
    error = np.abs(out - smooth(mapped))[inner]
    assert out.dtype == np.float32
    assert error.max() < (0.01 if interpolation == "bspline" else 1.0)


def test_resample_fills_outside_and_keeps_reference_grid() -> None:
    affine = GRIDS["iso 1 mm"]
    moving = nib.Nifti1Image(np.ones(SHAPE, np.float32), affine)
    reference = nib.Nifti1Image(np.zeros((20, 20, 20), np.uint8), grid_affine((2.0, 2.0, 2.0)))
    out = resample(moving, reference, AffineTransform.identity(), fill=-1.0)
    data = np.asarray(out.dataobj)
    assert out.shape == (20, 20, 20)
    np.testing.assert_allclose(out.affine, reference.affine)
    assert set(np.unique(data)) == {-1.0, 1.0}


def test_resample_array_is_resample_without_images() -> None:
    affine = GRIDS["oblique"]
    data = np.random.default_rng(3).random(SHAPE).astype(np.float32)
    reference_affine = grid_affine((1.5, 1.5, 1.5))
    reference = nib.Nifti1Image(np.zeros((12, 14, 10), np.uint8), reference_affine)
    transform = AffineTransform(small_affine())
    image = resample(nib.Nifti1Image(data, affine), reference, transform)
    array = resample_array(data, affine, (12, 14, 10), reference_affine, transform)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, np.asarray(image.dataobj))
    far = reference_affine.copy()
    far[:3, 3] += 1000.0
    with pytest.raises(RegistrationError, match="no overlap"):
        resample_array(data, affine, (12, 14, 10), far, transform)


# ------------------------------------------------------------------------------- Jacobians


@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (1.1, 0.9, 1.2), (0.8, 0.8, 0.8)])
def test_jacobian_of_a_scaling_is_its_determinant(scales: tuple[float, float, float]) -> None:
    reference = nib.Nifti1Image(np.zeros(SHAPE, np.float32), GRIDS["oblique"])
    transform = AffineTransform(small_affine() @ np.diag([*scales, 1.0]))
    det = np.asarray(jacobian_determinant_map(transform, reference).dataobj)
    np.testing.assert_allclose(det, np.prod(scales), rtol=1e-5)
    log_det = np.asarray(log_jacobian_map(transform, reference).dataobj)
    np.testing.assert_allclose(log_det, np.log(np.prod(scales)), atol=1e-5)
    # from an already computed determinant map: the same logarithm
    det_img = nib.Nifti1Image(det, reference.affine)
    again = np.asarray(log_jacobian_map(transform, reference, det=det_img).dataobj)
    np.testing.assert_array_equal(again, log_det)


def test_jacobian_of_a_field_matches_fields_jacobian() -> None:
    affine = GRIDS["anisotropic, x flipped"]
    u_vox = smooth_field(10)
    reference = nib.Nifti1Image(np.zeros(SHAPE, np.float32), affine)
    det = jacobian_determinant_map(DisplacementTransform.from_voxel_field(u_vox, affine), reference)
    np.testing.assert_allclose(
        np.asarray(det.dataobj), fields.jacobian_determinant(u_vox), atol=1e-4
    )


# ------------------------------------------------------------------------------- errors


def _image(shape: tuple[int, ...]) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4))


#: A translation of half a metre: nothing of an 8-voxel grid lands on itself.
FAR_AWAY = np.array([[1, 0, 0, 500.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])

ERRORS = {
    "4D moving": (
        lambda: resample(_image((8, 8, 8, 2)), _image((8, 8, 8)), AffineTransform.identity()),
        r"moving image: expected a 3D image, found 4D",
    ),
    "2D reference": (
        lambda: resample(_image((8, 8, 8)), _image((8, 8)), AffineTransform.identity()),
        r"reference image: expected a 3D image, found 2D",
    ),
    "no overlap": (
        lambda: resample(_image((8, 8, 8)), _image((8, 8, 8)), AffineTransform(FAR_AWAY)),
        r"found all 512 reference voxels outside it \(no overlap\)",
    ),
    "unknown interpolation": (
        lambda: resample(
            _image((8, 8, 8)), _image((8, 8, 8)), AffineTransform.identity(), interpolation="cubic"
        ),
        r"interpolation: expected 'linear', 'nearest', 'bspline' or 'label', found 'cubic'",
    ),
    "empty mask": (
        lambda: require_mask(np.zeros((8, 8, 8)), _image((8, 8, 8))),
        r"mask: expected at least one voxel > 0, found an empty mask",
    ),
    "mask of another shape": (
        lambda: require_mask(np.ones((8, 8, 7)), _image((8, 8, 8))),
        r"mask: expected the reference grid shape \(8, 8, 8\), found shape \(8, 8, 7\)",
    ),
    "field of wrong shape": (
        lambda: DisplacementTransform(np.zeros((2, 4, 4, 4)), np.eye(4)),
        r"displacement field: expected shape \(3, X, Y, Z\), found shape \(2, 4, 4, 4\)",
    ),
    "points of wrong shape": (
        lambda: AffineTransform.identity().apply(np.zeros((4, 2))),
        r"points: expected shape \(N, 3\), found shape \(4, 2\)",
    ),
    "singular affine": (
        lambda: AffineTransform(np.diag([1.0, 0.0, 1.0, 1.0])).inverse(),
        r"affine matrix: expected an invertible matrix, found determinant 0",
    ),
    "fill not fitting uint8": (
        lambda: resample(
            nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)),
            _image((8, 8, 8)),
            AffineTransform.identity(),
            interpolation="nearest",
            fill=-1,
        ),
        r"fill: expected a value representable as uint8, found -1",
    ),
}


@pytest.mark.parametrize("name", ERRORS)
def test_errors_say_what_was_expected_and_found(name: str) -> None:
    call, message = ERRORS[name]
    with pytest.raises(RegistrationError, match=message):
        call()


def test_load_affine_rejects_a_non_linear_transform(tmp_path: Path) -> None:
    path = tmp_path / "bspline.txt"
    path.write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: BSplineTransform_double_3_3\n"
        "Parameters: 0\nFixedParameters: 0\n"
    )
    with pytest.raises(InputError, match="expected a 3D linear transform"):
        load_affine(path)
