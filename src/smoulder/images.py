"""Image and file I/O that never leaves half-written outputs.

Every writer writes to a temporary name in the destination folder and renames it into place
(``os.replace`` is atomic on POSIX), so an interrupted run leaves either the complete file or
nothing under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    The temporary file keeps the final suffix (``.nii.gz`` …) so that writers choosing a format
    from the extension still work. On error the temporary file is removed.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "a.txt") as tmp:
        ...     _ = tmp.write_text("done")
        >>> (d / "a.txt").read_text()
        'done'
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    name = final.name
    if suffix is None:
        suffix = "".join(final.suffixes[-2:]) if name.endswith(".nii.gz") else final.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    *,
    dtype: type | np.dtype | None = None,
    header: nib.Nifti1Header | None = None,
    xyzt_units: tuple[str, str] = ("mm", "sec"),
) -> Path:
    """Return ``path`` after writing ``data`` there as NIfTI-1, atomically.

    Args:
        data: voxel array (3D or 4D).
        affine: 4×4 voxel-to-world (RAS mm) matrix; stored as both qform and sform.
        path: destination (``.nii`` or ``.nii.gz``).
        dtype: on-disk data type; defaults to ``data.dtype``.
        header: optional header to start from.
        xyzt_units: spatial and temporal units.
    """
    arr = np.asarray(data)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=float), header=header)
    img.set_data_dtype(arr.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(*xyzt_units)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def save_json(obj: Any, path: str | Path) -> Path:
    """Return ``path`` after writing ``obj`` there as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def save_text(text: str, path: str | Path) -> Path:
    """Return ``path`` after writing ``text`` there, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
