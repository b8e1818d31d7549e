"""Pictures for the report, from arrays: windowed slices, contours, edges, crops and plots.

Every picture is a PNG embedded as a ``data:`` URI (the report works offline, from a file
share or inside a container). Volumes are first brought to RAS+ (:func:`canonical`); slices
are shown in neurological convention (subject's left on the left), anterior or superior up.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

#: Overlay colours (RGB).
RED, YELLOW, CYAN, GREEN, MAGENTA = (
    (255, 40, 40),
    (255, 220, 0),
    (0, 220, 255),
    (60, 220, 60),
    (255, 0, 255),
)


@dataclass(frozen=True)
class Window:
    """Display window: values at ``low`` are black, at ``high`` white; ``label`` says how."""

    low: float
    high: float
    label: str


def canonical(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(data, affine)`` of ``img`` reoriented to the closest RAS+ axes (3D, float32)."""
    ras = nib.as_closest_canonical(img)
    data = np.asarray(ras.dataobj, np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    return data, ras.affine


def percentile_window(data: np.ndarray, mask: np.ndarray | None = None, lo=1.0, hi=99.5) -> Window:
    """Return the window from the ``lo``–``hi`` percentiles of ``data`` (inside ``mask``).

    Examples:
        >>> w = percentile_window(np.arange(1001, dtype=float))
        >>> round(w.low), round(w.high), w.label
        (11, 995, 'percentiles 1-99.5')
    """
    values = data[mask] if mask is not None and mask.any() else data[data != 0]
    if values.size == 0:
        values = data.ravel()
    low, high = (float(v) for v in np.percentile(values, [lo, hi]))
    return Window(low, high if high > low else low + 1.0, f"percentiles {lo:g}-{hi:g}")


def to_gray(plane: np.ndarray, window: Window) -> np.ndarray:
    """Return ``plane`` windowed to uint8.

    Examples:
        >>> to_gray(np.array([[0.0, 5.0, 10.0]]), Window(0, 10, "")).tolist()
        [[0, 127, 255]]
    """
    scaled = (plane - window.low) / (window.high - window.low)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
    """Return the inner boundary pixels of a 2D mask.

    Examples:
        >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
        >>> int(contour(m).sum())
        8
    """
    return mask & ~ndi.binary_erosion(mask)


def edges(plane: np.ndarray, top_share: float = 0.1) -> np.ndarray:
    """Return the strongest ``top_share`` of the gradient magnitude of ``plane`` (non-zero part)."""
    grad = np.hypot(ndi.sobel(plane, 0), ndi.sobel(plane, 1))
    inside = plane != 0
    if not inside.any() or not grad[inside].any():
        return np.zeros(plane.shape, bool)
    return inside & (grad >= np.quantile(grad[inside], 1 - top_share))


def compose(
    gray: np.ndarray, overlays: Sequence[tuple[np.ndarray, tuple[int, int, int]]]
) -> np.ndarray:
    """Return an RGB picture: ``gray`` with each (mask, colour) painted on top, in order."""
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for mask, colour in overlays:
        rgb[mask] = colour
    return rgb


def display(plane: np.ndarray) -> np.ndarray:
    """Return a RAS slice (first axis left→right, second posterior→anterior or inferior→superior)
    as picture rows and columns: subject's left on the left, anterior/superior up."""
    return np.rot90(plane)


def png_uri(rgb: np.ndarray, scale: int = 1) -> str:
    """Return ``rgb`` (H×W×3 or H×W uint8) as a PNG ``data:`` URI, enlarged ``scale`` times."""
    from PIL import Image

    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def planes(volume: np.ndarray, centre: Sequence[int], half: Sequence[int]) -> list[np.ndarray]:
    """Return the axial, coronal and sagittal crops of ``volume`` around voxel ``centre``.

    Each crop spans ``centre ± half`` voxels along its two axes (zero-padded beyond the volume),
    already in display orientation (:func:`display`).

    Examples:
        >>> v = np.arange(5 * 6 * 7, dtype=float).reshape(5, 6, 7)
        >>> [p.shape for p in planes(v, (2, 3, 3), (1, 2, 2))]
        [(5, 3), (5, 3), (5, 5)]
    """
    pad = max(half)
    padded = np.pad(volume, pad)
    c = [int(round(v)) + pad for v in centre]
    hx, hy, hz = (int(h) for h in half)
    axial = padded[c[0] - hx : c[0] + hx + 1, c[1] - hy : c[1] + hy + 1, c[2]]
    coronal = padded[c[0] - hx : c[0] + hx + 1, c[1], c[2] - hz : c[2] + hz + 1]
    sagittal = padded[c[0], c[1] - hy : c[1] + hy + 1, c[2] - hz : c[2] + hz + 1]
    return [display(p) for p in (axial, coronal, sagittal)]


def mosaic_slices(mask: np.ndarray, n: int) -> list[int]:
    """Return ``n`` axial slice indices spread over the extent of ``mask`` (or the volume).

    Examples:
        >>> m = np.zeros((4, 4, 20), bool); m[..., 5:15] = True
        >>> mosaic_slices(m, 3)
        [7, 10, 12]
    """
    zs = np.flatnonzero(mask.any((0, 1))) if mask.any() else np.arange(mask.shape[2])
    lo, hi = int(zs.min()), int(zs.max())
    return [int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]]


def tile(pictures: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Return RGB ``pictures`` (same size) tiled in rows of ``columns``."""
    h, w = pictures[0].shape[:2]
    rows = -(-len(pictures) // columns)
    out = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, pic in enumerate(pictures):
        r, c = divmod(i, columns)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = pic
    return out


def trajectory_svg(
    times: Sequence[float], values: Sequence[float | None], *, unit: str, width=180, height=70
) -> str:
    """Return a small inline SVG line plot of ``values`` over ``times`` (None: not measured).

    Examples:
        >>> '<svg' in trajectory_svg([0, 1], [10.0, 12.0], unit="µl")
        True
    """
    pts = [(t, v) for t, v in zip(times, values, strict=True) if v is not None]
    label = html.escape(unit)
    if not pts:
        return (
            f'<svg class="traj" width="{width}" height="{height}">'
            '<text x="4" y="20">no data</text></svg>'
        )
    t0, t1 = min(p[0] for p in pts), max(p[0] for p in pts)
    v0, v1 = min(p[1] for p in pts), max(p[1] for p in pts)
    span_t, span_v = (t1 - t0) or 1.0, (v1 - v0) or max(abs(v1), 1.0)
    m = 14

    def xy(t: float, v: float) -> tuple[float, float]:
        x = m + (t - t0) / span_t * (width - 2 * m)
        y = height - m - (v - v0) / span_v * (height - 2 * m) if v1 > v0 else height / 2
        return round(x, 1), round(y, 1)

    coords = [xy(t, v) for t, v in pts]
    line = " ".join(f"{x},{y}" for x, y in coords)
    dots = "".join(f'<circle cx="{x}" cy="{y}" r="2.5"/>' for x, y in coords)
    return (
        f'<svg class="traj" width="{width}" height="{height}" role="img" '
        f'aria-label="trajectory ({label})"><polyline points="{line}" fill="none" '
        f'stroke="currentColor"/>{dots}<text x="2" y="10" font-size="9">{v1:.4g} {label}</text>'
        f'<text x="2" y="{height - 2}" font-size="9">{v0:.4g}</text></svg>'
    )
