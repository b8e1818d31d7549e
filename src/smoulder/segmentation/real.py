"""Real images with expert lesion masks as fine-tuning data (leave-one-out).

A *real case* is a folder with one FLAIR (``FLAIR*``/``*_FLAIR.nii*``), optionally one
T1-weighted image (``T1_*``/``*T1w*``, aligned to the FLAIR in world space) and one expert
lesion mask (``GOLD_STANDARD*``, ``*lesion*`` or ``gt.nii*``): the layout of the open_ms
cross-sectional cases. Experts label lesions only, so the tissue classes of the target come
from the starting model's own refined segmentation
(:func:`smoulder.segmentation.inference.segment`): lesion voxels are the expert's, and the
model's lesion voxels the expert did not mark become white
matter. Channels and target live on the network's 1 mm RAS grid, as at inference.

A run records the folders it fine-tuned on in its bundle (``training.settings.real_cases``),
so an evaluation can refuse a model that saw the case it is scored on
(:func:`cases_seen_by`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from smoulder.errors import InputError
from smoulder.grids import covering_grid, resample_to_grid
from smoulder.segmentation.classes import CLASSES, LESION

WM = CLASSES.index("WM")
_PATTERNS = {
    "FLAIR": ("FLAIR*.nii*", "*_FLAIR.nii*"),
    "T1": ("T1_*.nii*", "*T1w*.nii*", "*T1W*.nii*"),
    "lesions": ("GOLD_STANDARD*.nii*", "*lesion*.nii*", "gt.nii*"),
}


@dataclass
class RealCase:
    """One real case on the network grid: ``channels`` (3, X, Y, Z) and ``labels`` (X, Y, Z)."""

    name: str
    channels: np.ndarray
    labels: np.ndarray

    def save(self, path: Path) -> None:
        """Write the case as ``.npz`` (through a temporary name)."""
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(tmp, channels=self.channels, labels=self.labels, name=self.name)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> RealCase:
        """Read a case written by :meth:`save`."""
        with np.load(path) as z:
            return cls(str(z["name"]), z["channels"], z["labels"].astype(np.int64))


def case_images(folder: Path) -> dict[str, Path | None]:
    """Return the FLAIR, T1 (or ``None``) and lesion-mask files of a real-case folder.

    Raises:
        InputError: no FLAIR or no lesion mask, or more than one candidate for either.
    """
    found: dict[str, Path | None] = {}
    for role, patterns in _PATTERNS.items():
        hits = sorted({p for pat in patterns for p in folder.glob(pat)})
        if role == "T1":
            hits = [p for p in hits if "POST" not in p.name.upper()]  # not post-contrast
        if len(hits) > 1 or (not hits and role != "T1"):
            raise InputError(
                str(folder),
                expected=f"one {role} image ({' or '.join(patterns)})",
                found=", ".join(p.name for p in hits) or "none",
            )
        found[role] = hits[0] if hits else None
    return found


def prepare_case(folder: Path, model: str | Path | None, cache: Path) -> Path:
    """Build (once) the fine-tuning arrays of ``folder``; return the cached ``.npz``.

    Args:
        folder: the real case (see the module docstring).
        model: the bundle whose segmentation gives the tissue classes (default: shipped).
        cache: folder of the prepared cases; an existing file is reused.
    """
    from smoulder.segmentation.inference import network_channels, segment

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{folder.name}.npz"
    if path.is_file():
        return path
    files = case_images(folder)
    flair = nib.load(files["FLAIR"])
    t1 = nib.load(files["T1"]) if files["T1"] else None
    expert = nib.load(files["lesions"])
    if expert.shape[:3] != flair.shape[:3] or not np.allclose(
        expert.affine, flair.affine, atol=1e-3
    ):
        raise InputError(
            str(files["lesions"]),
            expected=f"the FLAIR's grid {flair.shape[:3]}",
            found=f"{expert.shape[:3]} with another affine",
        )
    seg = segment(flair, t1, model=model)
    labels = np.asarray(seg.dseg.dataobj).astype(np.int64)
    lesion = np.asarray(expert.dataobj) > 0.5
    labels[(labels == LESION) & ~lesion] = WM
    labels[lesion] = LESION
    shape, grid = covering_grid(flair, 1.0)
    images = [(np.asarray(img.dataobj), img.affine) for img in (flair, t1) if img is not None]
    channels = network_channels(images, shape, grid)
    target = resample_to_grid(labels, flair.affine, shape, grid, order=0).round().astype(np.int64)
    RealCase(folder.name, channels, target).save(path)
    return path


def real_patch(
    rng: np.random.Generator, case: RealCase, patch: int, p_t1: float = 0.5, p_lesion: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """Return one augmented training pair ``(3, P, P, P)``, ``(P, P, P)`` cut from ``case``.

    The centre is a lesion voxel with probability ``p_lesion``, otherwise any brain voxel.
    Augmentation: left-right flip, per-channel gamma and gain, Gaussian noise; the T1 channel
    (when the case has one) is dropped with probability ``1 - p_t1``.

    Examples:
        >>> labels = np.zeros((20, 20, 20), np.int64); labels[5:15, 5:15, 5:15] = 4
        >>> labels[9:11, 9:11, 9:11] = 5
        >>> case = RealCase("x", np.ones((3, 20, 20, 20), np.float32), labels)
        >>> x, y = real_patch(np.random.default_rng(0), case, 8)
        >>> x.shape, y.shape
        ((3, 8, 8, 8), (8, 8, 8))
    """
    labels = case.labels
    pool = labels == LESION if rng.random() < p_lesion else labels > 0
    if not pool.any():
        pool = labels > 0
    idx = np.flatnonzero(pool)
    centre = np.array(np.unravel_index(idx[rng.integers(idx.size)], labels.shape))
    centre += rng.integers(-patch // 4, patch // 4 + 1, size=3)
    lo = centre - patch // 2
    pad = [(max(0, -lo[a]), max(0, lo[a] + patch - labels.shape[a])) for a in range(3)]
    box = tuple(slice(max(0, lo[a]), min(labels.shape[a], lo[a] + patch)) for a in range(3))
    y = np.pad(labels[box], pad)
    x = np.stack([np.pad(c[box], pad) for c in case.channels])
    if rng.random() < 0.5:  # left-right (the grid is RAS)
        x, y = x[:, ::-1], y[::-1]
    has_t1 = bool(case.channels[2].max() > 0) and rng.random() < p_t1
    for c in range(2 if has_t1 else 1):
        gain = np.exp(rng.normal(0.0, 0.1))
        x[c] = gain * np.clip(x[c], 0.0, None) ** np.exp(rng.normal(0.0, 0.2))
        x[c] += rng.normal(0.0, rng.uniform(0.0, 0.03), size=x[c].shape).astype(np.float32)
        x[c] = np.clip(x[c], 0.0, None)
    if not has_t1:
        x[1:] = 0.0
    return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)


def cases_seen_by(bundle: str | Path) -> list[str]:
    """Return the names of the real cases a bundle was fine-tuned on (empty for synthetic only)."""
    meta = json.loads((Path(bundle) / "configs" / "metadata.json").read_text())
    settings = meta.get("training", {}).get("settings", {})
    return [Path(p).name for p in settings.get("real_cases", [])]
