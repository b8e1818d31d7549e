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

from smoulder.rims.rules import sector_index

#: Point coordinates or per-axis sizes: a sequence or an array of floats.
Floats = Sequence[float] | np.ndarray

#: Overlay colours (RGB).
RED, YELLOW, CYAN, GREEN, MAGENTA, BLACK = (
    (255, 40, 40),
    (255, 220, 0),
    (0, 220, 255),
    (60, 220, 60),
    (255, 0, 255),
    (0, 0, 0),
)
#: Half-size of the lesion-centred crops, mm.
CROP_HALF_MM = 16.0
#: Pixels a crop is drawn at (about), per side.
CROP_PX = 132
#: Colour of values a map does not give (NaN) in :func:`diverging` pictures.
NO_VALUE = (128, 128, 128)


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


def diverging(plane: np.ndarray, window: Window) -> np.ndarray:
    """Return ``plane`` as RGB on a blue–white–red scale: ``window.low`` blue, the window's
    middle white, ``window.high`` red (clipped beyond; NaN grey).

    Examples:
        >>> diverging(np.array([[-10.0, 0.0, 10.0, np.nan]]), Window(-10, 10, "")).tolist()
        [[[0, 0, 255], [255, 255, 255], [255, 0, 0], [128, 128, 128]]]
    """
    middle, half = (window.low + window.high) / 2, (window.high - window.low) / 2
    t = np.clip((np.nan_to_num(plane, nan=middle) - middle) / half, -1.0, 1.0)
    fade = np.rint(255 * (1 - np.abs(t))).astype(np.uint8)
    rgb = np.stack([fade, fade, fade], axis=-1)
    rgb[t > 0, 0] = 255
    rgb[t < 0, 2] = 255
    rgb[np.isnan(plane)] = NO_VALUE
    return rgb


def colour_bar(window: Window, width: int = 160, height: int = 10) -> np.ndarray:
    """Return the RGB bar of :func:`diverging`: ``window.low`` on the left, ``high`` right.

    Examples:
        >>> bar = colour_bar(Window(-1, 1, ""), width=3, height=1)
        >>> bar[0].tolist()
        [[0, 0, 255], [255, 255, 255], [255, 0, 0]]
    """
    ramp = np.linspace(window.low, window.high, width)[None, :].repeat(height, axis=0)
    return diverging(ramp, window)


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
    """Return an RGB picture: ``gray`` (or an RGB picture) with each (mask, colour) painted on
    top, in order."""
    rgb = np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray.copy()
    for mask, colour in overlays:
        rgb[mask] = colour
    return rgb


def display(plane: np.ndarray) -> np.ndarray:
    """Return a RAS slice (first axis left→right, second posterior→anterior or inferior→superior)
    as picture rows and columns: subject's left on the left, anterior/superior up."""
    return np.rot90(plane)


def display_native(plane: np.ndarray, affine: np.ndarray, axis: int = 2) -> np.ndarray:
    """Return a slice of a volume in its own voxel axes as :func:`display` shows RAS slices.

    ``plane`` is the slice across voxel axis ``axis`` of a grid with voxel-to-world ``affine``.
    Its two axes are flipped and swapped to the closest RAS axes (as :func:`canonical` would
    reorient the volume, without resampling), so a native crop sits beside the RAS crops.

    Examples:
        >>> p = np.arange(6).reshape(2, 3)  # first voxel axis towards the left (L), second A
        >>> lps = np.diag([-1.0, 1.0, 1.0, 1.0])
        >>> display_native(p, lps).tolist() == display(p[::-1]).tolist()
        True
    """
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, float))
    in_plane = [a for a in range(3) if a != axis]
    out = np.asarray(plane)
    for i, a in enumerate(in_plane):
        if ornt[a, 1] < 0:
            out = np.flip(out, i)
    if ornt[in_plane[0], 0] > ornt[in_plane[1], 0]:
        out = out.T
    return display(out)


def crop(plane: np.ndarray, centre: Floats, half: Floats) -> np.ndarray:
    """Return ``plane[centre ± half]`` along both axes, zero beyond the plane (integer pixels).

    Examples:
        >>> crop(np.ones((3, 3)), (0, 0), (1, 1)).tolist()
        [[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    """
    (ci, cj), (hi, hj) = (int(c) for c in centre), (int(h) for h in half)
    out = np.zeros((2 * hi + 1, 2 * hj + 1), plane.dtype)
    i0, j0 = max(ci - hi, 0), max(cj - hj, 0)
    i1, j1 = min(ci + hi + 1, plane.shape[0]), min(cj + hj + 1, plane.shape[1])
    if i1 > i0 and j1 > j0:
        out[i0 - (ci - hi) : i1 - (ci - hi), j0 - (cj - hj) : j1 - (cj - hj)] = plane[i0:i1, j0:j1]
    return out


def enlarge(plane: np.ndarray, factor: int) -> np.ndarray:
    """Return a 2D ``plane`` with each pixel repeated ``factor`` × ``factor`` times."""
    return np.repeat(np.repeat(plane, factor, axis=0), factor, axis=1)


def symmetric_window(values: np.ndarray, *, spreads: float = 3.0, unit: str = "") -> Window:
    """Return the window ``±spreads`` robust SDs (1.4826 × MAD) of the non-zero ``values``.

    Centred on 0 (not on the median), so that paramagnetic (bright) and diamagnetic (dark)
    read the same on every picture.

    Examples:
        >>> w = symmetric_window(np.array([0.0, -1.0, 1.0, -1.0, 1.0]), unit="rad")
        >>> round(w.low, 3), round(w.high, 3), w.label
        (-4.448, 4.448, '±3 robust SD (rad)')
    """
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v != 0)]
    sd = 1.4826 * float(np.median(np.abs(v - np.median(v)))) if v.size else 0.0
    if not sd > 0:
        sd = float(np.abs(v).max()) / spreads if v.size and np.abs(v).max() > 0 else 1.0
    label = f"±{spreads:g} robust SD" + (f" ({unit})" if unit else "")
    return Window(-spreads * sd, spreads * sd, label)


def png_uri(rgb: np.ndarray, scale: int = 1) -> str:
    """Return ``rgb`` (H×W×3 or H×W uint8) as a PNG ``data:`` URI, enlarged ``scale`` times."""
    from PIL import Image

    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def block(volume: np.ndarray, centre: Sequence[int], half: Sequence[int]) -> np.ndarray:
    """Return ``volume[centre ± half]`` along its three axes, zero beyond the volume: a small
    copy to crop many planes from (:func:`planes` with ``centre = half``).

    Examples:
        >>> v = np.ones((4, 4, 4))
        >>> b = block(v, (0, 3, 1), (1, 1, 1))
        >>> b.shape, float(b.sum()), float(b[0].sum()), float(b[:, 2].sum())
        ((3, 3, 3), 12.0, 0.0, 0.0)
    """
    c, h = [int(round(v)) for v in centre], [int(v) for v in half]
    lo = [max(ci - hi, 0) for ci, hi in zip(c, h, strict=True)]
    hi = [min(ci + hi + 1, n) for ci, hi, n in zip(c, h, volume.shape, strict=True)]
    inside = volume[tuple(slice(a, max(a, b)) for a, b in zip(lo, hi, strict=True))]
    before = [a - (ci - hi) for a, ci, hi in zip(lo, c, h, strict=True)]
    after = [2 * hi + 1 - b - n for hi, b, n in zip(h, before, inside.shape, strict=True)]
    return np.pad(inside, list(zip(before, after, strict=True)))


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


def strip(pictures: Sequence[np.ndarray]) -> np.ndarray:
    """Return RGB pictures side by side (padded to the tallest), 2 px apart.

    Examples:
        >>> strip([np.zeros((2, 3, 3), np.uint8), np.zeros((4, 1, 3), np.uint8)]).shape
        (4, 8, 3)
    """
    h = max(p.shape[0] for p in pictures)
    padded = [np.pad(p, ((0, h - p.shape[0]), (0, 2), (0, 0))) for p in pictures]
    return np.concatenate(padded, axis=1)


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


def _offsets_mm(
    shape: tuple[int, int], centre: Floats, spacing_mm: Floats
) -> tuple[np.ndarray, np.ndarray]:
    """Return the offsets (mm) of every pixel of a ``shape`` plane from ``centre`` (pixels)."""
    ii, jj = np.indices(shape, dtype=float)
    return (ii - centre[0]) * spacing_mm[0], (jj - centre[1]) * spacing_mm[1]


def sector_radii_mm(
    mask: np.ndarray, centre: Floats, n: int, spacing_mm: Floats = (1.0, 1.0)
) -> np.ndarray:
    """Return, per angular sector (:func:`sector_index`), the farthest pixel of ``mask`` (mm).

    Sectors the mask does not reach take its farthest pixel overall (0 for an empty mask), so
    that marks placed beyond these radii stay outside the whole lesion.

    Examples:
        >>> m = np.zeros((9, 9), bool); m[4, 4:7] = True  # from the centre towards +y
        >>> sector_radii_mm(m, (4, 4), 4).tolist()  # sector 2 holds only the centre pixel
        [2.0, 2.0, 0.0, 2.0]
    """
    x, y = _offsets_mm(mask.shape, centre, spacing_mm)
    m = np.asarray(mask, bool)
    radius, sector = np.hypot(x[m], y[m]), sector_index(x[m], y[m], n)
    out = np.full(n, -np.inf)
    np.maximum.at(out, sector, radius)
    return np.where(np.isfinite(out), out, radius.max() if radius.size else 0.0)


def sector_marks(
    shape: tuple[int, int],
    centre: Floats,
    flags: str,
    radius_mm: float | Floats,
    *,
    spacing_mm: Floats = (1.0, 1.0),
    width_mm: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rim, no_rim)`` masks of a ``shape`` plane: arcs marking each angular sector.

    Sector ``s`` (:func:`sector_index`, angles of the offsets in mm along the plane's first and
    second axes from ``centre``) is flagged by ``flags[s]``: ``1`` a rim (its arc goes into
    ``rim``), ``0`` no rim (a dotted arc in ``no_rim``), ``-`` not measured (nothing). Each arc
    spans its sector's angles between ``radius_mm`` (one for all or one per sector) and
    ``radius_mm + width_mm``.

    Args:
        shape: the plane's shape (pixels).
        centre: the lesion's centre, pixel coordinates (fractional allowed).
        flags: one character per sector, ``1``, ``0`` or ``-`` (e.g. the 12 of ``rim_sectors``).
        radius_mm: inner radius of the arcs, mm.
        spacing_mm: pixel size along the plane's two axes, mm.
        width_mm: radial thickness of the arcs, mm.

    Returns:
        Two boolean masks of ``shape``.

    Raises:
        ValueError: ``flags`` holds a character other than ``1``, ``0`` or ``-``.

    Examples:
        >>> rim, _ = sector_marks((21, 21), (10, 10), "1" + "-" * 11, 5.0)
        >>> ii, jj = np.nonzero(rim)
        >>> bool((ii < 10).all() and (jj <= 10).all())  # sector 0: just above −π, negative x
        True
    """
    if not flags or set(flags) - set("10-"):
        raise ValueError(f"sector flags: expected characters '1', '0' or '-', found {flags!r}")
    n = len(flags)
    x, y = _offsets_mm(shape, centre, spacing_mm)
    radius, sector = np.hypot(x, y), sector_index(x, y, n)
    inner = np.broadcast_to(np.asarray(radius_mm, float), (n,))[sector]
    ring = (radius >= inner) & (radius < inner + width_mm)
    code = np.array([{"1": 1, "0": 0, "-": -1}[f] for f in flags])[sector]
    ii, jj = np.indices(shape)
    dotted = (ii + jj) % 2 == 0
    return ring & (code == 1), ring & (code == 0) & dotted
