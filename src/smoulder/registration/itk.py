"""Transforms in the file formats of ITK/ANTs (LPS world coordinates).

Everything smoulder keeps in memory is RAS; the flip to ITK's LPS happens here and only here.
For a 4×4 matrix the flip is ``M_lps = F @ M_ras @ F`` with ``F = diag(-1, -1, 1, 1)`` (its own
inverse), and a displacement vector flips its first two components.

Formats:

* linear transforms: ITK text (``#Insight Transform File V1.0``) or MATLAB v4 ``.mat`` holding
  a parameter column named after the transform type (``AffineTransform_double_3_3``) followed
  by ``fixed`` (the centre of rotation), as ``antsRegistration`` writes them;
* displacement fields: 5D NIfTI ``(X, Y, Z, 1, 3)`` with vector intent and LPS displacements
  in millimetres, the layout ``antsApplyTransforms`` reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.io

from smoulder.errors import InputError
from smoulder.images import atomic_path

#: RAS ↔ LPS: ITK's physical space flips the first two world axes.
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0], np.float32)

_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
_TEXT_MAGIC = "#Insight Transform File V1.0"
_TYPE_NAME = re.compile(r"^(?P<kind>[A-Za-z0-9]+?)_(?:double|float)_3_3$")
_AFFINE_VARIABLE = "AffineTransform_double_3_3"


def swap_ras_lps(matrix: np.ndarray) -> np.ndarray:
    """Return a 4×4 world-to-world matrix re-expressed with the other of RAS/LPS (self-inverse).

    Examples:
        >>> m = np.eye(4); m[:3, 3] = [1.0, 2.0, 3.0]
        >>> swap_ras_lps(m)[:3, 3].tolist()
        [-1.0, -2.0, 3.0]
    """
    return _FLIP @ np.asarray(matrix, dtype=np.float64) @ _FLIP


# --------------------------------------------------------------------------- linear transforms


def save_affine(matrix_ras: np.ndarray, path: str | Path) -> Path:
    """Return ``path`` after writing a 4×4 RAS affine as an ITK ``AffineTransform``, atomically.

    Args:
        matrix_ras: maps fixed (reference) RAS points to moving RAS points, in millimetres.
        path: ``.mat`` (MATLAB v4, what ``antsRegistration`` writes) or ``.txt`` (ITK text).

    Raises:
        InputError: the suffix is neither ``.mat`` nor ``.txt``, or the matrix is not a finite
            4×4 affine.
    """
    path = Path(path)
    lps = swap_ras_lps(_checked_affine_matrix(matrix_ras, path))
    params = np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]]).astype(np.float64)
    centre = np.zeros(3, np.float64)
    suffix = path.suffix.lower()
    if suffix == ".mat":
        variables = {_AFFINE_VARIABLE: params[:, None], "fixed": centre[:, None]}
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            scipy.io.savemat(handle, variables, format="4")
    elif suffix == ".txt":
        text = "\n".join(
            [
                _TEXT_MAGIC,
                "#Transform 0",
                f"Transform: {_AFFINE_VARIABLE}",
                "Parameters: " + " ".join(format(v, ".17g") for v in params),
                "FixedParameters: " + " ".join(format(v, ".17g") for v in centre),
                "",
            ]
        )
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    else:
        raise InputError(path, expected="a .mat or .txt transform path", found=repr(path.suffix))
    return path


def load_affine(path: str | Path) -> np.ndarray:
    """Return the 4×4 RAS matrix (fixed → moving points) of an ITK linear transform file.

    Reads ITK text and MATLAB ``.mat`` files holding ``AffineTransform``,
    ``MatrixOffsetTransformBase``, ``Rigid3DTransform``, ``Euler3DTransform``,
    ``VersorRigid3DTransform``, ``QuaternionRigidTransform``, ``Similarity3DTransform`` or
    ``TranslationTransform`` (double or float), and text ``CompositeTransform`` files made only
    of those. The centre of rotation (``FixedParameters``) is honoured:
    ``y = M (x − c) + t + c``.

    Raises:
        InputError: the file is missing, unreadable, or holds another kind of transform.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, expected="an ITK transform file", found="no such file")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        blocks = [_read_mat_block(path)]
    elif suffix == ".txt" or suffix == ".tfm":
        blocks = _read_text_blocks(path)
    else:
        raise InputError(path, expected="a .mat, .txt or .tfm transform", found=repr(path.suffix))
    lps = np.eye(4)
    for kind, params, fixed in blocks:
        # a composite applies its last transform first: T = T_1 ∘ T_2 ∘ … ∘ T_n
        lps = lps @ _lps_matrix(kind, params, fixed, path)
    return swap_ras_lps(lps)


def _checked_affine_matrix(matrix: np.ndarray, path: Path) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InputError(path, expected="a finite 4×4 affine matrix", found=f"shape {m.shape}")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise InputError(path, expected="a last row of 0 0 0 1", found=str(m[3].tolist()))
    return m


def _read_mat_block(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    try:
        variables = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several types for a damaged file
        raise InputError(path, expected="a MATLAB transform file", found=str(exc)) from exc
    names = [k for k in variables if not k.startswith("__") and k != "fixed"]
    if len(names) != 1:
        raise InputError(path, expected="one transform variable besides 'fixed'", found=str(names))
    params = np.asarray(variables[names[0]], dtype=np.float64).ravel()
    fixed = np.asarray(variables.get("fixed", np.zeros(3)), dtype=np.float64).ravel()
    return names[0], params, fixed


def _read_text_blocks(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, expected="an ITK text transform", found=str(exc)) from exc
    if not lines or not lines[0].startswith("#Insight Transform File"):
        found = repr(lines[0][:40]) if lines else "an empty file"
        raise InputError(path, expected=f"first line {_TEXT_MAGIC!r}", found=found)
    blocks: list[dict[str, object]] = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "Transform":
            blocks.append({"kind": value.strip()})
        elif key in ("Parameters", "FixedParameters") and blocks:
            try:
                blocks[-1][key] = np.array([float(v) for v in value.split()], np.float64)
            except ValueError as exc:
                raise InputError(path, expected=f"numbers after {key}:", found=value) from exc
    blocks = [b for b in blocks if not str(b["kind"]).startswith("CompositeTransform")]
    if not blocks:
        raise InputError(path, expected="at least one transform", found="none")
    return [
        (
            str(b["kind"]),
            np.asarray(b.get("Parameters", np.zeros(0))),
            np.asarray(b.get("FixedParameters", np.zeros(3))),
        )
        for b in blocks
    ]


def _lps_matrix(kind: str, params: np.ndarray, fixed: np.ndarray, path: Path) -> np.ndarray:
    match = _TYPE_NAME.match(kind)
    name = match.group("kind") if match else kind
    expected_counts = {
        "AffineTransform": 12,
        "MatrixOffsetTransformBase": 12,
        "Rigid3DTransform": 12,
        "Euler3DTransform": 6,
        "VersorRigid3DTransform": 6,
        "QuaternionRigidTransform": 7,
        "Similarity3DTransform": 7,
        "TranslationTransform": 3,
    }
    if match is None or name not in expected_counts:
        supported = ", ".join(f"{k}_double_3_3" for k in expected_counts)
        raise InputError(path, expected=f"a 3D linear transform ({supported})", found=kind)
    if params.size != expected_counts[name]:
        raise InputError(
            path,
            expected=f"{expected_counts[name]} parameters for {kind}",
            found=str(params.size),
        )
    centre = fixed[:3] if name != "TranslationTransform" and fixed.size >= 3 else np.zeros(3)
    if name in ("AffineTransform", "MatrixOffsetTransformBase", "Rigid3DTransform"):
        matrix, translation = params[:9].reshape(3, 3), params[9:12]
    elif name == "Euler3DTransform":
        zyx = fixed.size >= 4 and fixed[3] != 0
        matrix, translation = _euler_matrix(params[:3], zyx=zyx), params[3:6]
    elif name == "VersorRigid3DTransform":
        matrix, translation = _versor_matrix(params[:3]), params[3:6]
    elif name == "Similarity3DTransform":
        matrix, translation = params[6] * _versor_matrix(params[:3]), params[3:6]
    elif name == "QuaternionRigidTransform":
        matrix, translation = _quaternion_matrix(params[:4]), params[4:7]
    else:  # TranslationTransform
        matrix, translation = np.eye(3), params[:3]
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = translation + centre - matrix @ centre
    return out


def _euler_matrix(angles: np.ndarray, *, zyx: bool) -> np.ndarray:
    """Return ITK's Euler3D rotation: ``Rz Rx Ry`` (default) or ``Rz Ry Rx`` (ComputeZYX)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx if zyx else rz @ rx @ ry


def _versor_matrix(versor: np.ndarray) -> np.ndarray:
    """Return the rotation of a versor given by its vector part (``w = √(1 − |v|²)``)."""
    w = np.sqrt(max(0.0, 1.0 - float(versor @ versor)))
    return _quaternion_matrix(np.array([*versor, w]))


def _quaternion_matrix(xyzw: np.ndarray) -> np.ndarray:
    """Return ITK's matrix of the quaternion ``(x, y, z, w)``: ``|q|²`` times its rotation."""
    x, y, z, w = xyzw
    return np.array(
        [
            [w * w + x * x - y * y - z * z, 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), w * w - x * x + y * y - z * z, 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), w * w - x * x - y * y + z * z],
        ]
    )


# --------------------------------------------------------------------------- displacement fields


def save_displacement(disp_mm_ras: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Return ``path`` after writing an ITK/ANTs displacement field, atomically.

    Args:
        disp_mm_ras: ``(3, X, Y, Z)`` RAS displacement in millimetres of every voxel of the grid
            (the point ``x`` maps to ``x + u(x)``).
        affine: voxel-to-world (RAS) matrix of the grid the field is defined on.
        path: destination (``.nii.gz``); the NIfTI is 5D ``(X, Y, Z, 1, 3)`` with vector intent
            and LPS displacements in millimetres.

    Raises:
        InputError: the field is not ``(3, X, Y, Z)``.
    """
    disp = np.asarray(disp_mm_ras)
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise InputError(path, expected="a (3, X, Y, Z) displacement", found=f"shape {disp.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    lps = disp.astype(np.float32) * RAS_TO_LPS[:, None, None, None]
    data = np.moveaxis(lps, 0, -1)[:, :, :, None, :]
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_data_dtype(np.float32)
    img.header.set_intent("vector")
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def save_displacement_field(target_mm: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Return ``path`` after writing an ITK/ANTs displacement field, atomically.

    Args:
        target_mm: ``(3, X, Y, Z)`` RAS world position that each voxel of the grid maps to.
        affine: voxel-to-world (RAS) matrix of the grid the field is defined on.
        path: destination (``.nii.gz``); see :func:`save_displacement` for the layout.
    """
    shape = target_mm.shape[1:]
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    world = np.tensordot(affine[:3, :3].astype(np.float32), idx, axes=1)
    world += affine[:3, 3, None, None, None].astype(np.float32)
    return save_displacement(target_mm - world, affine, path)


def load_displacement_field(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(displacement, affine)`` of an ITK/ANTs displacement-field NIfTI.

    ``displacement`` is ``(3, X, Y, Z)`` float32 RAS millimetres; ``affine`` is the grid's
    voxel-to-world RAS matrix. Accepts 5D ``(X, Y, Z, 1, 3)`` (ITK/ANTs) and 4D
    ``(X, Y, Z, 3)`` layouts.

    Raises:
        InputError: the file is missing, unreadable or not a 3-component vector image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, expected="a displacement-field NIfTI", found="no such file")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for a damaged file
        raise InputError(path, expected="a readable NIfTI", found=str(exc)) from exc
    if data.ndim == 5 and data.shape[3] == 1 and data.shape[4] == 3:
        data = data[:, :, :, 0, :]
    elif not (data.ndim == 4 and data.shape[3] == 3):
        raise InputError(
            path, expected="a (X, Y, Z, 1, 3) displacement field", found=f"shape {data.shape}"
        )
    disp = np.moveaxis(data, -1, 0) * RAS_TO_LPS[:, None, None, None]
    return np.ascontiguousarray(disp, dtype=np.float32), np.asarray(img.affine, np.float64)
