"""World-space transforms, resampling with a single interpolation, and Jacobian maps.

Every transform here maps *fixed* (reference) RAS points in millimetres to *moving* RAS points
(a pull-back, as ITK/ANTs transforms do). Three kinds exist:

* :class:`AffineTransform` — a 4×4 RAS matrix;
* :class:`DisplacementTransform` — ``x ↦ x + u(x)`` with ``u`` a dense RAS millimetre field on
  a voxel grid, trilinearly interpolated and continued by its edge values outside the grid;
* :class:`TransformChain` — steps applied to points in list order.

:func:`resample` maps every reference voxel through the whole chain and interpolates the
moving data once, so chaining never blurs an image twice. Large grids are processed in slabs
along the first axis, which keeps memory to a few volumes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage
from scipy import ndimage

from smoulder.errors import RegistrationError
from smoulder.registration import itk
from smoulder.registration.fields import sample_field

Interpolation = Literal["linear", "nearest", "bspline", "label"]
Sampler = Callable[[np.ndarray], np.ndarray]

#: Reference voxels processed at once (a slab of whole planes holds at least one plane).
SLAB_VOXELS = 1 << 20
#: Padding of the moving image before cubic B-spline prefiltering (as scipy does internally).
_SPLINE_PAD = 12


# ------------------------------------------------------------------------------- transforms


class AffineTransform:
    """A linear transform of world points, ``p ↦ M p`` with ``M`` a 4×4 RAS matrix.

    Examples:
        >>> m = np.eye(4); m[0, 3] = 2.0
        >>> AffineTransform(m).apply(np.zeros((1, 3))).tolist()
        [[2.0, 0.0, 0.0]]
    """

    def __init__(self, matrix: np.ndarray) -> None:
        """Store a copy of ``matrix`` (4×4, RAS mm, fixed → moving points)."""
        self.matrix = _checked_matrix(matrix, "affine matrix")

    @classmethod
    def identity(cls) -> AffineTransform:
        """Return the identity transform."""
        return cls(np.eye(4))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Return the ``(N, 3)`` images of the ``(N, 3)`` RAS points ``points``."""
        pts = _checked_points(points)
        return (self.matrix[:3, :3] @ pts.T).T + self.matrix[:3, 3]

    def inverse(self) -> AffineTransform:
        """Return the inverse transform (moving → fixed points).

        Raises:
            RegistrationError: the matrix is singular.
        """
        det = float(np.linalg.det(self.matrix[:3, :3]))
        if abs(det) < 1e-12:
            raise RegistrationError(
                "affine matrix", expected="an invertible matrix", found=f"determinant {det:g}"
            )
        return AffineTransform(np.linalg.inv(self.matrix))

    def save(self, path: str | Path) -> Path:
        """Return ``path`` after writing the transform as ITK ``.mat`` or ``.txt``."""
        return itk.save_affine(self.matrix, path)

    @classmethod
    def load(cls, path: str | Path) -> AffineTransform:
        """Return the transform of an ITK linear transform file (``.mat``/``.txt``)."""
        return cls(itk.load_affine(path))

    def __repr__(self) -> str:
        return f"AffineTransform({np.array2string(self.matrix, precision=4)})"


class DisplacementTransform:
    """A dense transform of world points, ``p ↦ p + u(p)``, ``u`` in RAS millimetres.

    ``u`` is given on a voxel grid (``disp_mm[:, i, j, k]`` at world point ``affine @ (i, j,
    k)``) and interpolated trilinearly; outside the grid it takes the nearest edge value.
    (ITK's ``DisplacementFieldTransform`` uses zero displacement beyond half a voxel outside
    its grid instead, so the two agree only where the field fades to zero at its border or
    points stay on the grid.)
    """

    def __init__(self, disp_mm: np.ndarray, affine: np.ndarray) -> None:
        """Store ``disp_mm`` (``(3, X, Y, Z)`` RAS mm) and the grid's voxel-to-world ``affine``."""
        disp = np.asarray(disp_mm)
        if disp.ndim != 4 or disp.shape[0] != 3:
            raise RegistrationError(
                "displacement field", expected="shape (3, X, Y, Z)", found=f"shape {disp.shape}"
            )
        if not np.all(np.isfinite(disp)):
            raise RegistrationError(
                "displacement field", expected="finite values", found="NaN or Inf"
            )
        self.disp_mm = np.ascontiguousarray(disp, dtype=np.float32)
        self.affine = _checked_matrix(affine, "displacement grid affine")
        self._world_to_voxel = _inverse_grid_affine(self.affine, "displacement grid affine")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Return the grid shape ``(X, Y, Z)``."""
        return tuple(int(n) for n in self.disp_mm.shape[1:])  # type: ignore[return-value]

    @classmethod
    def from_voxel_field(cls, u_vox: np.ndarray, affine: np.ndarray) -> DisplacementTransform:
        """Return the transform of a pull-back field in voxel units of its grid (``fields``).

        A voxel ``x`` mapping to voxel ``x + u`` maps world ``A x`` to ``A x + A[:3, :3] u``.
        """
        u = np.asarray(u_vox)
        if u.ndim != 4 or u.shape[0] != 3:
            raise RegistrationError(
                "voxel displacement field", expected="shape (3, X, Y, Z)", found=f"shape {u.shape}"
            )
        linear = _checked_matrix(affine, "displacement grid affine")[:3, :3].astype(np.float32)
        return cls(np.tensordot(linear, u.astype(np.float32), axes=1), affine)

    def displacement_at(self, points: np.ndarray) -> np.ndarray:
        """Return ``u`` (``(N, 3)`` mm) interpolated at the ``(N, 3)`` RAS points ``points``."""
        pts = _checked_points(points)
        coords = self._world_to_voxel[:3, :3] @ pts.T + self._world_to_voxel[:3, 3, None]
        return sample_field(self.disp_mm, coords).T

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Return the ``(N, 3)`` images ``p + u(p)`` of the ``(N, 3)`` RAS points ``points``."""
        pts = _checked_points(points)
        return pts + self.displacement_at(pts)

    def inverse(self, *, iterations: int = 20, tolerance_mm: float = 1e-4) -> DisplacementTransform:
        """Return the inverse as a displacement on the same grid.

        Solves ``v(x) = −u(x + v(x))`` at every grid point by fixed-point iteration, which
        converges where the transform is a diffeomorphism with ``|∇u|`` well below one.

        Args:
            iterations: maximum number of fixed-point iterations.
            tolerance_mm: stop once no voxel's ``v`` changes by more than this.
        """
        if iterations < 1:
            raise RegistrationError("iterations", expected="at least 1", found=str(iterations))
        to_vox = self._world_to_voxel[:3, :3].astype(np.float32)
        inverse = np.empty_like(self.disp_mm)
        for rows in _slabs(self.shape):
            idx = _voxel_grid(self.shape, rows)
            v = -self.disp_mm[:, rows]
            for _ in range(iterations):
                coords = idx + np.tensordot(to_vox, v, axes=1)
                new = -sample_field(self.disp_mm, coords)
                change = float(np.abs(new - v).max()) if new.size else 0.0
                v = new
                if change < tolerance_mm:
                    break
            inverse[:, rows] = v
        return DisplacementTransform(inverse, self.affine)

    def save(self, path: str | Path) -> Path:
        """Return ``path`` after writing the field as an ITK/ANTs displacement NIfTI."""
        return itk.save_displacement(self.disp_mm, self.affine, path)

    @classmethod
    def load(cls, path: str | Path) -> DisplacementTransform:
        """Return the transform of an ITK/ANTs displacement-field NIfTI."""
        disp, affine = itk.load_displacement_field(path)
        return cls(disp, affine)

    def __repr__(self) -> str:
        peak = float(np.abs(self.disp_mm).max()) if self.disp_mm.size else 0.0
        return f"DisplacementTransform(shape={self.shape}, max |u| = {peak:.3g} mm)"


class TransformChain:
    """Transforms applied to points in list order: ``chain(p) = steps[-1](…steps[0](p))``.

    Nested chains are flattened; an empty chain is the identity.
    """

    def __init__(self, steps: Sequence[Transform]) -> None:
        """Store the steps (``AffineTransform``, ``DisplacementTransform`` or chains)."""
        flat: list[AffineTransform | DisplacementTransform] = []
        for i, step in enumerate(steps):
            if isinstance(step, TransformChain):
                flat.extend(step.steps)
            elif isinstance(step, AffineTransform | DisplacementTransform):
                flat.append(step)
            else:
                raise RegistrationError(
                    f"transform chain step {i}",
                    expected="an AffineTransform, DisplacementTransform or TransformChain",
                    found=type(step).__name__,
                )
        self.steps: tuple[AffineTransform | DisplacementTransform, ...] = tuple(flat)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Return the ``(N, 3)`` images of ``(N, 3)`` RAS points through every step in turn."""
        pts = _checked_points(points)
        for step in self.steps:
            pts = step.apply(pts)
        return pts

    def inverse(self) -> TransformChain:
        """Return the inverse chain: steps inverted, in reverse order."""
        return TransformChain([step.inverse() for step in reversed(self.steps)])

    def save(self, folder: str | Path, stem: str) -> list[Path]:
        """Return the written step files in the order of ANTs' ``transformlist``.

        Step ``k`` is written as ``<stem>_<k>_affine.mat`` or ``<stem>_<k>_warp.nii.gz``.
        ``antsApplyTransforms`` (and ``ants.apply_transforms``) send the fixed points through
        the list from its *first* element to its last — "the last transform is applied first"
        in ANTs' documentation speaks of the image, not of points — so the list is in step
        order, like ``fwdtransforms = [warp, affine]`` of ``ants.registration``.

        Beware: ``ants.apply_transforms`` inverts the matrix of a two-element list
        ``[*.mat, not-.mat]`` unless ``whichtoinvert`` is given; pass
        ``whichtoinvert=[False] * len(files)``.
        """
        folder = Path(folder)
        written = []
        for k, step in enumerate(self.steps):
            if isinstance(step, AffineTransform):
                written.append(step.save(folder / f"{stem}_{k}_affine.mat"))
            else:
                written.append(step.save(folder / f"{stem}_{k}_warp.nii.gz"))
        return written

    @classmethod
    def load(cls, transformlist: Sequence[str | Path]) -> TransformChain:
        """Return the chain of ANTs transform files given in ``transformlist`` order.

        ``.nii``/``.nii.gz`` files are displacement fields, anything else a linear transform;
        the first file is applied to points first (see :meth:`save`).
        """
        return cls([load_transform(p) for p in transformlist])

    def to_displacement(self, reference: nib.Nifti1Image) -> DisplacementTransform:
        """Return the whole chain sampled as a displacement on the grid of ``reference``."""
        shape, affine = _grid(reference, "reference image")
        disp = np.empty((3, *shape), np.float32)
        for rows in _slabs(shape):
            world = _grid_world_points(affine, shape, rows)
            moved = self.apply(world)
            disp[:, rows] = (moved - world).T.reshape(3, -1, *shape[1:])
        return DisplacementTransform(disp, affine)

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"TransformChain({list(self.steps)!r})"


Transform = AffineTransform | DisplacementTransform | TransformChain


def load_transform(path: str | Path) -> AffineTransform | DisplacementTransform:
    """Return the transform in an ITK/ANTs file: a displacement NIfTI or a linear transform."""
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return DisplacementTransform.load(path)
    return AffineTransform.load(path)


# ------------------------------------------------------------------------------- resampling


def resample(
    moving: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    transform: Transform,
    *,
    interpolation: Interpolation = "linear",
    fill: float = 0.0,
) -> nib.Nifti1Image:
    """Return ``moving`` resampled on the grid of ``reference`` through ``transform``.

    Each reference voxel goes voxel → world → ``transform`` (fixed → moving points) → moving
    voxel, and the moving data are interpolated once there. Points beyond half a voxel outside
    the moving grid get ``fill``; within, the edge values are continued (as ITK does).

    Args:
        moving: 3D image to resample.
        reference: 3D image whose grid (shape, affine) the result takes.
        transform: fixed → moving transform (affine, displacement or chain).
        interpolation: ``"linear"``; ``"nearest"`` (keeps values and dtype); ``"bspline"``
            (cubic B-spline with prefilter); ``"label"`` (label-aware: every label's indicator
            is interpolated linearly and the largest wins, ties to the smaller label; keeps the
            dtype and the label set).
        fill: value outside the moving image.

    Returns:
        The resampled image: float32 (float64 for float64 input) for ``linear``/``bspline``,
        the input dtype for ``nearest``/``label``.

    Raises:
        RegistrationError: an image is not 3D, ``interpolation`` is unknown, ``fill`` does not
            fit the output dtype, or no reference voxel lands inside the moving image.
    """
    data = _volume(moving, "moving image")
    shape, ref_affine = _grid(reference, "reference image")
    mov_affine = _checked_matrix(moving.affine, "moving image affine")
    out = resample_array(
        data, mov_affine, shape, ref_affine, transform, interpolation=interpolation, fill=fill
    )
    return _image_like(out, ref_affine)


def resample_array(
    data: np.ndarray,
    moving_affine: np.ndarray,
    shape: tuple[int, int, int],
    reference_affine: np.ndarray,
    transform: Transform,
    *,
    interpolation: Interpolation = "linear",
    fill: float = 0.0,
) -> np.ndarray:
    """Return the voxels of :func:`resample` from arrays and matrices, without NIfTI images
    (what a caller resampling many small patches wants: an image costs ~1 ms to build).

    Args:
        data: the moving 3D array.
        moving_affine: its voxel-to-world matrix.
        shape: the reference grid's shape.
        reference_affine: the reference grid's voxel-to-world matrix.
        transform, interpolation, fill: as :func:`resample`.

    Raises:
        RegistrationError: as :func:`resample`.
    """
    to_moving_voxel = _inverse_grid_affine(moving_affine, "moving image affine")
    sampler, dtype = _sampler(data, interpolation)
    fill_value = _checked_fill(fill, dtype)
    out = np.empty(shape, dtype)
    inside_total = 0
    for rows in _slabs(shape):
        world = transform.apply(_grid_world_points(reference_affine, shape, rows))
        coords = to_moving_voxel[:3, :3] @ world.T + to_moving_voxel[:3, 3, None]
        del world
        inside = _inside(coords, data.shape)
        inside_total += int(inside.sum())
        values = np.full(inside.shape, fill_value, dtype)
        values[inside] = sampler(coords[:, inside])
        out[rows] = values.reshape(-1, *shape[1:])
    if inside_total == 0:
        raise RegistrationError(
            "resampling",
            expected=f"reference voxels that land inside the moving image {data.shape}",
            found=f"all {int(np.prod(shape))} reference voxels outside it (no overlap)",
            hint="check the transform direction (fixed → moving points) and the affines",
        )
    return out


def _sampler(data: np.ndarray, interpolation: str) -> tuple[Sampler, np.dtype]:
    """Return ``(sampler, dtype)``: ``sampler(coords (3, N)) -> (N,)`` values of ``data``."""
    float_dtype = np.dtype(np.float64 if data.dtype == np.float64 else np.float32)
    if interpolation == "linear":
        volume = data.astype(float_dtype, copy=False)
        return (
            lambda c: ndimage.map_coordinates(volume, c, order=1, mode="nearest", prefilter=False),
            float_dtype,
        )
    if interpolation == "nearest":
        source = data.view(np.uint8) if data.dtype == np.bool_ else data  # scipy has no bool
        return (
            lambda c: ndimage.map_coordinates(
                source, c, order=0, mode="nearest", prefilter=False
            ).astype(data.dtype, copy=False),
            data.dtype,
        )
    if interpolation == "bspline":
        padded = np.pad(data.astype(np.float64), _SPLINE_PAD, mode="edge")
        coefficients = ndimage.spline_filter(padded, order=3, mode="mirror")
        del padded
        return (
            lambda c: ndimage.map_coordinates(
                coefficients, c + _SPLINE_PAD, order=3, mode="nearest", prefilter=False
            ).astype(float_dtype),
            float_dtype,
        )
    if interpolation == "label":
        labels, ranks = np.unique(data, return_inverse=True)
        ranks = ranks.reshape(data.shape).astype(np.int32)
        return (lambda c: labels[_label_ranks_at(ranks, c)], data.dtype)
    raise RegistrationError(
        "interpolation",
        expected="'linear', 'nearest', 'bspline' or 'label'",
        found=repr(interpolation),
    )


def _label_ranks_at(ranks: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Return the label rank with the largest linearly interpolated indicator at ``coords``.

    Only the eight corner voxels of a point carry weight, so the indicator of every label is
    the sum of the trilinear weights of the corners holding it; this equals interpolating
    each label's indicator volume, at the cost of eight lookups whatever the number of labels.
    """
    base = np.floor(coords).astype(np.intp)
    frac = (coords - base).astype(np.float32)
    upper = np.array(ranks.shape)[:, None] - 1
    corner_ranks = np.empty((8, coords.shape[1]), np.int32)
    weights = np.empty((8, coords.shape[1]), np.float32)
    for k, offset in enumerate(itertools.product((0, 1), repeat=3)):
        idx = np.clip(base + np.array(offset)[:, None], 0, upper)
        corner_ranks[k] = ranks[idx[0], idx[1], idx[2]]
        w = np.ones(coords.shape[1], np.float32)
        for axis, o in enumerate(offset):
            w *= frac[axis] if o else 1.0 - frac[axis]
        weights[k] = w
    scores = np.zeros_like(weights)
    for k in range(8):
        for j in range(8):
            scores[k] += np.where(corner_ranks[j] == corner_ranks[k], weights[j], 0.0)
    best = scores.max(axis=0)
    candidates = np.where(scores >= best - 1e-6, corner_ranks, np.iinfo(np.int32).max)
    return candidates.min(axis=0)


def _inside(coords: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Return which voxel coordinates lie within half a voxel of the grid (ITK's buffer)."""
    upper = np.array(shape, np.float64)[:, None] - 0.5
    return np.all((coords >= -0.5) & (coords <= upper), axis=0)


def _checked_fill(fill: float, dtype: np.dtype) -> np.generic:
    """Return ``fill`` cast to ``dtype``, refusing values the dtype cannot hold."""
    value = np.asarray(fill).astype(dtype)[()]
    if not np.isclose(float(value), float(fill), rtol=1e-6, atol=0.0):
        raise RegistrationError(
            "fill", expected=f"a value representable as {dtype}", found=repr(fill)
        )
    return value


# ------------------------------------------------------------------------------- Jacobians


def jacobian_determinant_map(transform: Transform, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return the Jacobian determinant of the point map on the grid of ``reference``.

    Derivatives of the mapped world coordinates are taken by finite differences between
    neighbouring reference voxels (central inside, one-sided at the border), so an affine
    gives exactly its determinant and the identity gives 1. Values below 1 mean the fixed
    neighbourhood maps to a smaller moving one (the moving tissue is smaller: local volume
    loss from fixed to moving).

    Raises:
        RegistrationError: ``reference`` is not 3D or has an axis shorter than 2 voxels.
    """
    shape, affine = _grid(reference, "reference image")
    if min(shape) < 2:
        raise RegistrationError(
            "reference image", expected="at least 2 voxels along every axis", found=str(shape)
        )
    det = np.empty(shape, np.float32)
    for rows in _slabs(shape):
        lo, hi = max(rows.start - 1, 0), min(rows.stop + 1, shape[0])
        moved = transform.apply(_grid_world_points(affine, shape, slice(lo, hi)))
        keep = slice(rows.start - lo, rows.stop - lo)
        det[rows] = mapped_points_jacobian(moved.reshape(hi - lo, *shape[1:], 3), affine)[keep]
    return _image_like(det, affine)


def mapped_points_jacobian(moved: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Return the Jacobian determinant of a point map from the world images ``moved``
    ``(X, Y, Z, 3)`` of the voxels of a grid with voxel-to-world ``affine``: finite
    differences between neighbouring voxels (central inside, one-sided at the border), per
    voxel volume (1: volume kept).

    Examples:
        >>> grid = np.diag([2.0, 2.0, 2.0, 1.0])
        >>> ijk = np.indices((3, 3, 3)).transpose(1, 2, 3, 0).astype(float)
        >>> moved = 1.1 * nib.affines.apply_affine(grid, ijk)  # 10 % larger along each axis
        >>> round(float(mapped_points_jacobian(moved, grid)[1, 1, 1]), 3)
        1.331
    """
    jac = np.stack([np.gradient(moved, axis=j) for j in range(3)], axis=-1)
    return (np.linalg.det(jac) / float(np.linalg.det(affine[:3, :3]))).astype(np.float32)


def log_jacobian_map(
    transform: Transform,
    reference: nib.Nifti1Image,
    *,
    floor: float = 1e-6,
    det: nib.Nifti1Image | None = None,
) -> nib.Nifti1Image:
    """Return ``log`` of :func:`jacobian_determinant_map`, determinants clipped at ``floor``.

    Folded voxels (determinant ≤ 0) therefore read ``log(floor)`` rather than NaN. ``det``: the
    determinant map of the same transform on ``reference``'s grid when already computed (it
    is then not computed again).
    """
    if floor <= 0:
        raise RegistrationError("floor", expected="a positive number", found=repr(floor))
    if det is None:
        det = jacobian_determinant_map(transform, reference)
    det = np.asarray(det.dataobj)
    return _image_like(np.log(np.maximum(det, floor)).astype(np.float32), reference.affine)


# ------------------------------------------------------------------------------- masks


def require_mask(
    mask: nib.Nifti1Image | np.ndarray, reference: nib.Nifti1Image, *, what: str = "mask"
) -> np.ndarray:
    """Return ``mask`` as a boolean array on the grid of ``reference``, checked.

    Raises:
        RegistrationError: the mask is not 3D, not of the reference shape, or empty.
    """
    shape, _ = _grid(reference, "reference image")
    data = _volume(mask, what) if isinstance(mask, SpatialImage) else mask
    data = np.asarray(data)
    if data.shape != shape:
        raise RegistrationError(
            what, expected=f"the reference grid shape {shape}", found=f"shape {data.shape}"
        )
    binary = data > 0
    if not binary.any():
        raise RegistrationError(what, expected="at least one voxel > 0", found="an empty mask")
    return binary


# ------------------------------------------------------------------------------- helpers


def _checked_matrix(matrix: np.ndarray, what: str) -> np.ndarray:
    m = np.array(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise RegistrationError(what, expected="a 4×4 matrix", found=f"shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise RegistrationError(what, expected="finite entries", found="NaN or Inf")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise RegistrationError(what, expected="a last row 0 0 0 1", found=str(m[3].tolist()))
    return m


def _inverse_grid_affine(affine: np.ndarray, what: str) -> np.ndarray:
    det = float(np.linalg.det(affine[:3, :3]))
    if abs(det) < 1e-12:
        raise RegistrationError(
            what, expected="an invertible voxel-to-world matrix", found=f"determinant {det:g}"
        )
    return np.linalg.inv(affine)


def _checked_points(points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise RegistrationError("points", expected="shape (N, 3)", found=f"shape {pts.shape}")
    return pts


def _volume(img: SpatialImage, what: str) -> np.ndarray:
    """Return the 3D voxel array of ``img`` (trailing singleton axes dropped)."""
    return np.asanyarray(img.dataobj).reshape(_shape3(img.shape, what))


def _grid(img: SpatialImage, what: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """Return ``(shape, affine)`` of the 3D grid of ``img``."""
    return _shape3(img.shape, what), _checked_matrix(img.affine, f"{what} affine")


def _shape3(shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    if len(shape) < 3 or any(n != 1 for n in shape[3:]) or min(shape[:3]) < 1:
        found = f"{len(shape)}D {tuple(shape)}"
        raise RegistrationError(what, expected="a 3D image", found=found)
    return tuple(int(n) for n in shape[:3])  # type: ignore[return-value]


def _slabs(shape: tuple[int, ...], max_voxels: int = SLAB_VOXELS) -> Iterator[slice]:
    """Yield slices of whole planes along the first axis, about ``max_voxels`` each."""
    plane = max(int(np.prod(shape[1:])), 1)
    step = max(1, max_voxels // plane)
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


def _voxel_grid(shape: tuple[int, int, int], rows: slice) -> np.ndarray:
    """Return float32 voxel coordinates ``(3, n, Y, Z)`` of the planes ``rows`` of a grid."""
    axes = [np.arange(rows.start, rows.stop, dtype=np.float32)]
    axes += [np.arange(n, dtype=np.float32) for n in shape[1:]]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _grid_world_points(affine: np.ndarray, shape: tuple[int, int, int], rows: slice) -> np.ndarray:
    """Return the ``(N, 3)`` RAS points of the planes ``rows`` of a grid, C order."""
    idx = _voxel_grid(shape, rows).reshape(3, -1).astype(np.float64)
    return (affine[:3, :3] @ idx + affine[:3, 3, None]).T


def _image_like(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Return a NIfTI-1 image of ``data`` on ``affine`` (qform and sform set, mm units)."""
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img
