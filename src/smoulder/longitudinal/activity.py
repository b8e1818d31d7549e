"""Lesion activity over a subject's sessions: tracked lesions, their fates, slowly expanding
lesions, and the tables and maps that say so.

Everything is decided on the within-subject grid (:mod:`smoulder.longitudinal.space`), with
both sessions' images:

1. every session's lesion instances, lesion probability, FLAIR, T1w and white-matter
   probability are resampled onto the grid once (the FLAIRs and T1ws first blurred to the
   sessions' coarsest resolution, :func:`~smoulder.longitudinal.space.matched_resolution`, so a
   thick-slice follow-up does not "change" every edge); lesion volumes are measured on each
   session's own grid (partial volume where the lesion probability is given);
2. lesions get one ID for the subject (:func:`smoulder.longitudinal.tracking.track_lesions`);
3. per interval: the Jacobian ratio of the two sessions' maps gives the local expansion
   (%/yr); the differential-bias-corrected FLAIR difference gives the change z-map
   (:mod:`smoulder.longitudinal.change`); normal-appearing white matter gives the noise floor;
4. fates (``new``, ``enlarging``, ``stable``, ``shrinking``, ``resolved``, ``merged``,
   ``split``): a lesion without an earlier overlap is *new* only where its voxels brightened
   (mean z ≥ ``new_min_z``), else it was there before and missed (``stable``, said in
   ``fate_evidence``); a continuing lesion's volume change is measured twice, from the
   registration (its mean Jacobian expansion) and from the images (its partial volume in each
   session: the FLAIR between the local background and the lesion's level, around both
   masks); it is *enlarging* / *shrinking* when both lie beyond ±``change_pct_per_year``
   (Vanden Bulcke et al., medRxiv 2025: lesion volume slopes beyond ±9 %/yr), or enlarging when
   voxels that turned from normal-appearing to lesional add that share of its volume; its
   ``rate`` is the partial-volume one (the Jacobian's is smoothed by the registration's
   regularisation: on the phantom it recovered 0.3-1.0 of the true growth, the partial volume
   0.4-1.0, most lesions within 5 %);
5. SEL (:mod:`smoulder.longitudinal.sel`) from each lesion's first session to every later one,
   with the subject's noise floor beside each call, and the T1w intensity change of the lesion
   (progressive T1 hypointensity marks SEL tissue loss);
6. where the sessions have rim probabilities (the lesion tables of the rim step), each row
   carries its session's ``rim_probability`` and ``rim_call``, and every interval counts PRL,
   SEL and lesions that are both.

Without session dates, rates are per interval, not per year (``rate_unit`` says which).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from smoulder.grids import sample_world, voxel_volume_mm3
from smoulder.longitudinal import change as chg
from smoulder.longitudinal import sel as slx
from smoulder.longitudinal.space import SubjectSpace, matched_resolution
from smoulder.longitudinal.tracking import Tracks, track_lesions
from smoulder.registration.transforms import mapped_points_jacobian

#: Fates a lesion can have at a session (relative to the session before).
FATES = (
    "present",
    "new",
    "enlarging",
    "stable",
    "shrinking",
    "resolved",
    "merged",
    "split",
    "absent",
)

#: Columns of the longitudinal lesion table: description and units.
COLUMNS: dict[str, tuple[str, str | None]] = {
    "lesion_id": ("persistent lesion ID, one per lesion for the whole subject", None),
    "session": ("session label", None),
    "instances": (
        "the session's own lesion instance IDs (its desc-lesions dseg) forming the "
        "lesion, ';'-separated; empty when absent",
        None,
    ),
    "fate": (
        "at this session relative to the one before: "
        + " | ".join(FATES)
        + " ('present': first session)",
        None,
    ),
    "fate_evidence": ("why the fate was decided", None),
    "volume_ul": (
        "lesion volume on the session's own grid (partial volume when the lesion "
        "probability is known)",
        "uL",
    ),
    "expansion_pct": (
        "mean Jacobian volume change of the lesion over the interval ending "
        "here (registration, both images)",
        "%",
    ),
    "jacobian_rate": ("expansion_pct per year (per interval without dates)", "%/year"),
    "rate": (
        "the lesion's volume rate over the interval ending here: pv_rate, else jacobian_rate "
        "(per interval without dates: see rate_unit)",
        "%/year",
    ),
    "rate_unit": ("'%/year' or '%/interval' (a session date is missing)", None),
    "growth_ul": (
        "volume of voxels the lesion gained that brightened on FLAIR (change z >= threshold)",
        "uL",
    ),
    "pv_volume_ul": (
        "lesion volume from the FLAIR's partial volume around it (lesion fraction between the "
        "local background and the lesion's level), in this session",
        "uL",
    ),
    "pv_rate": (
        "change of pv_volume_ul over the interval ending here, per year (per interval without "
        "dates)",
        "%/year",
    ),
    "change_z": (
        "FLAIR change over the lesion in noise units: for a lesion without an earlier one, its "
        "brightening against a shell around it on its own grid (the evidence of newness); "
        "else the mean change z over it on the within-subject grid",
        None,
    ),
    "merged_from": ("IDs that merged into this lesion here, ';'-separated", None),
    "merged_into": ("the ID this lesion merged into here (0: none)", None),
    "split_from": ("the ID this lesion split off from here (0: none)", None),
    "sel_candidate_ul": (
        "volume of the Elliott SEL candidate since the lesion's first session",
        "uL",
    ),
    "sel_rate": (
        "mean expansion of the SEL candidate since the lesion's first session, per year",
        "%/year",
    ),
    "sel_lesion_rate": (
        "mean expansion of the whole lesion since its first session, per year",
        "%/year",
    ),
    "sel_concentricity": ("share of the lesion edge's direction sectors that expand", None),
    "sel_constancy": (
        "R^2 of a line through the origin fitted to the lesion's cumulative "
        "expansion over time (three or more sessions)",
        None,
    ),
    "sel_noise_floor": (
        "the subject's noise floor: 95th percentile of the mean expansion of "
        "lesion-sized spheres in normal-appearing WM, same span",
        "%/year",
    ),
    "sel_call": ("yes | no | n/a (not a pre-existing lesion, or no earlier session)", None),
    "t1_change_pct": (
        "change of the lesion's mean T1w intensity since its first session, in % "
        "of normal-appearing WM (negative: darker)",
        "%",
    ),
    "rim_probability": ("the session's rim probability of the lesion (rim step)", None),
    "rim_call": ("the session's rim call (yes | no | not assessed)", None),
}

#: Columns of the per-interval activity table.
INTERVAL_COLUMNS: dict[str, tuple[str, str | None]] = {
    "interval": ("earlier-later session labels", None),
    "from_session": ("earlier session", None),
    "to_session": ("later session", None),
    "years": ("time between the sessions (n/a: a date is missing)", "year"),
    "new_count": ("new lesions", None),
    "new_volume_ul": ("volume of the new lesions at the later session", "uL"),
    "enlarging_count": ("enlarging lesions", None),
    "enlarging_volume_ul": ("volume gained by the enlarging lesions", "uL"),
    "shrinking_count": ("shrinking lesions", None),
    "resolved_count": ("lesions gone", None),
    "sel_count": (
        "slowly expanding lesions (since their first session, up to the later session)",
        None,
    ),
    "sel_volume_ul": ("volume of their SEL candidates", "uL"),
    "prl_count": ("lesions with a rim call 'yes' at the later session", None),
    "prl_sel_count": ("lesions that are both PRL and SEL", None),
    "noise_floor": ("the interval's noise floor of the lesion-level expansion rate", "%/year"),
    "nawm_rate_sd": ("SD of the mean expansion of the NAWM spheres", "%/year"),
    "change_noise_sd": ("robust SD of the FLAIR change in NAWM (NAWM-median units)", None),
}


def column_dictionary(columns: Mapping[str, tuple[str, str | None]]) -> dict[str, Any]:
    """Return the BIDS column dictionary (``{column: {"Description", "Units"}}``) of a table.

    Examples:
        >>> column_dictionary({"volume_ul": ("lesion volume", "uL"), "fate": ("its fate", None)})
        {'volume_ul': {'Description': 'lesion volume', 'Units': 'uL'}, 'fate': {'Description': \
'its fate'}}
    """
    return {
        name: {"Description": text, **({"Units": units} if units else {})}
        for name, (text, units) in columns.items()
    }


@dataclass
class SessionImages:
    """One session's images, all on (or in the space of) that session's FLAIR grid.

    Attributes:
        label: the session label.
        flair: the session reference (conformed FLAIR).
        lesions: lesion instances (one index per lesion, 0 background).
        lesion_probability: lesion probability (partial-volume volumes), optional.
        t1: T1w (or UNIT1), optional: the lesions' T1 intensity change.
        wm: white-matter probability, optional (normal-appearing white matter).
        brain: brain mask, optional.
        rim_rows: the rows of the session's lesion table (``index``, ``rim_probability``,
            ``rim_call``), optional.
    """

    label: str
    flair: nib.Nifti1Image
    lesions: nib.Nifti1Image
    lesion_probability: nib.Nifti1Image | None = None
    t1: nib.Nifti1Image | None = None
    wm: nib.Nifti1Image | None = None
    brain: nib.Nifti1Image | None = None
    rim_rows: Sequence[Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class ActivitySettings:
    """Thresholds of the fates and SEL calls (module doc; ``configs/default.yaml`` cites them).

    Attributes:
        change_pct_per_year: enlarging / shrinking beyond this volume rate (Vanden Bulcke
            2025: ±9 %/yr); per interval when dates are missing.
        new_min_z: smallest mean FLAIR change z of a new lesion.
        growth_min_z: smallest change z of a voxel counted as brightened growth.
        min_new_voxels: smallest new lesion, in voxels of its own session (and smallest
            brightened growth, in grid voxels).
        sel: the SEL thresholds.
    """

    change_pct_per_year: float = 9.0
    new_min_z: float = 2.0
    growth_min_z: float = 2.0
    min_new_voxels: int = 3
    sel: slx.SELSettings = field(default_factory=slx.SELSettings)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ActivitySettings:
        """Return settings from a mapping of the configuration's ``longitudinal`` keys
        (``enabled`` is ignored; missing keys keep their defaults).

        Examples:
            >>> settings = ActivitySettings.from_mapping({"new_min_z": 3, "sel": {"min_voxels": 5}})
            >>> settings.new_min_z, settings.sel.min_voxels
            (3, 5)
        """
        own = {k: v for k, v in values.items() if k in cls.__dataclass_fields__ and k != "sel"}
        sel = {k: v for k, v in dict(values.get("sel") or {}).items()}
        return cls(**own, sel=slx.SELSettings(**sel))


@dataclass
class Activity:
    """What :func:`lesion_activity` found.

    Attributes:
        rows: one per (lesion, session), :data:`COLUMNS`.
        intervals: one per consecutive interval, :data:`INTERVAL_COLUMNS`.
        labels: ``{session: persistent-ID map on the grid}``.
        change: ``{interval: new and enlarging lesion voxels on the grid}``.
        expansion: ``{interval: local expansion on the grid (%/yr or %/interval)}``.
        sel: ``{session: SEL candidates of the lesions called SEL, since their first session}``.
        space: the within-subject space.
        messages: what the user should know (missing dates).
    """

    rows: list[dict[str, Any]]
    intervals: list[dict[str, Any]]
    labels: dict[str, np.ndarray]
    change: dict[str, np.ndarray]
    expansion: dict[str, np.ndarray]
    sel: dict[str, np.ndarray]
    space: SubjectSpace
    messages: list[str] = field(default_factory=list)


@dataclass
class _OnGrid:
    """One session's images on the within-subject grid."""

    label: str
    instances: np.ndarray
    flair: np.ndarray
    t1: np.ndarray | None
    wm: np.ndarray | None
    brain: np.ndarray | None
    det: np.ndarray
    volumes_ul: dict[int, float]
    rims: dict[int, tuple[str, str]]


def lesion_activity(
    space: SubjectSpace,
    sessions: Sequence[SessionImages],
    years: Sequence[float | None],
    settings: ActivitySettings | None = None,
) -> Activity:
    """Return the tracked lesions, fates, SEL calls and per-interval counts of a subject.

    Args:
        space: the within-subject space of the sessions (same order).
        sessions: the sessions in time order.
        years: each session's time since the first (years); ``None`` anywhere: rates per
            interval.
        settings: thresholds (default :class:`ActivitySettings`).
    """
    settings = settings or ActivitySettings()
    if len(sessions) != len(space.to_session) or len(years) != len(sessions):
        raise ValueError(
            f"lesion activity: expected one transform and one time per session, found "
            f"{len(sessions)} sessions, {len(space.to_session)} transforms, {len(years)} times"
        )
    dated = all(y is not None for y in years)
    messages = [] if dated else ["a session date is missing: rates are per interval, not per year"]
    times = [float(y) if y is not None else float(k) for k, y in enumerate(years)]
    sessions = [_in_memory(s) for s in sessions]
    transforms = list(space.to_session.values())
    first = sessions[0]
    box = analysis_box(
        space, transforms[0], first.brain if first.brain is not None else first.flair
    )
    # the images compared voxel by voxel first get one resolution (thick-slice follow-ups)
    flairs = matched_resolution({str(k): s.flair for k, s in enumerate(sessions)})
    t1s = matched_resolution({str(k): s.t1 for k, s in enumerate(sessions) if s.t1 is not None})
    sessions = [
        replace(s, flair=flairs[str(k)], t1=t1s.get(str(k))) for k, s in enumerate(sessions)
    ]
    linears = list(space.linear[label] for label in space.to_session)
    grid = [
        _on_grid(space, t, m, s, box) for t, m, s in zip(transforms, linears, sessions, strict=True)
    ]
    tracks = track_lesions([g.instances for g in grid])
    voxel_mm = float(np.cbrt(voxel_volume_mm3(space.grid.affine)))
    voxel_ul = voxel_volume_mm3(space.grid.affine)
    nawm = _nawm(grid)
    scales = [float(np.median(g.flair[nawm & (g.flair > 0)])) for g in grid]
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for lid in tracks.ids:
        for k, g in enumerate(grid):
            rows[lid, k] = _base_row(tracks, lid, k, g)
    intervals, change, expansion, sel_maps = [], {}, {}, {}
    for k in range(1, len(grid)):
        a, b = grid[k - 1], grid[k]
        span = (times[k] - times[k - 1]) if dated else None
        rate = slx.expansion_rate(b.det / np.maximum(a.det, 1e-6), span)
        cm = chg.change_map(a.flair, b.flair, nawm, voxel_mm, brain=_brain(a, b))
        floor, floor_sd = slx.noise_floor(
            rate, nawm, _median_radius_mm(a), voxel_mm, quantile=settings.sel.noise_quantile
        )
        name = f"{a.label}-{b.label}"
        changed = np.zeros(rate.shape, bool)
        dets = (a.det, b.det)
        linear = linears
        newness = functools.partial(
            chg.newness_z,
            sessions[k].lesions,
            later=sessions[k].flair,
            earlier=sessions[k - 1].flair,
            later_to_earlier=linear[k - 1] @ np.linalg.inv(linear[k]),
            scales=(scales[k - 1], scales[k]),
            noise_sd=cm.noise_sd,
        )
        smallest_ul = settings.min_new_voxels * voxel_volume_mm3(sessions[k].lesions.affine)
        for lid in tracks.ids:
            _interval_fate(
                rows[lid, k], tracks, lid, k, rate, span, cm, dets, settings, voxel_ul, changed,
                newness, smallest_ul,
            )  # fmt: skip
        change[name], expansion[name] = changed, rate
        intervals.append({
            "interval": name, "from_session": a.label, "to_session": b.label,
            "years": round(span, 4) if span is not None else "n/a",
            "noise_floor": _r(floor), "nawm_rate_sd": _r(floor_sd),
            "change_noise_sd": _r(cm.noise_sd),
        })  # fmt: skip
    for k in range(1, len(grid)):
        sel_maps[grid[k].label] = _sel_since_first(
            rows, tracks, grid, k, times, dated, nawm, voxel_mm, settings
        )
    for k, summary in enumerate(intervals, start=1):
        summary.update(_interval_counts([rows[lid, k] for lid in tracks.ids], voxel_ul))
    return Activity(
        rows=[rows[lid, k] for lid in tracks.ids for k in range(len(grid))],
        intervals=intervals,
        labels={g.label: _unbox(tracks.labels[k], box, space) for k, g in enumerate(grid)},
        change={k: _unbox(v, box, space) for k, v in change.items()},
        expansion={k: _unbox(v, box, space) for k, v in expansion.items()},
        sel={k: _unbox(v, box, space) for k, v in sel_maps.items()},
        space=space,
        messages=messages,
    )


# ------------------------------------------------------------------------------ the grid


def analysis_box(
    space: SubjectSpace, transform: Any, image: nib.Nifti1Image, *, margin: int = 6
) -> tuple[slice, slice, slice]:
    """Return the box of the grid where ``image`` (a session's FLAIR or brain mask, in the
    space ``transform`` maps the grid to) has signal, plus ``margin`` voxels: the head, not
    the empty field of view around it, is what the activity is computed on."""
    shape = space.grid.shape[:3]
    stride = 4
    ijk = np.indices(tuple(int(np.ceil(n / stride)) for n in shape)).reshape(3, -1).T * stride
    values = sample_world(image, transform.apply(nib.affines.apply_affine(space.grid.affine, ijk)))
    positive = values[values > 0]
    if positive.size == 0:
        return (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    inside = ijk[values > 0.1 * float(np.percentile(positive, 99))]
    lo = np.maximum(inside.min(axis=0) - stride - margin, 0)
    hi = np.minimum(inside.max(axis=0) + stride + margin + 1, shape)
    return (
        slice(int(lo[0]), int(hi[0])),
        slice(int(lo[1]), int(hi[1])),
        slice(int(lo[2]), int(hi[2])),
    )


def _on_grid(
    space: SubjectSpace,
    transform: Any,
    linear: np.ndarray,
    s: SessionImages,
    box: tuple[slice, ...],
) -> _OnGrid:
    """Return a session's images on the grid's ``box``, its Jacobian and its native lesion
    volumes. The grid → session map is evaluated once per voxel and serves every image."""
    shape = tuple(b.stop - b.start for b in box)
    ijk = np.indices(shape).reshape(3, -1).T + np.array([b.start for b in box])
    points = transform.apply(nib.affines.apply_affine(space.grid.affine, ijk)).astype(np.float32)
    del ijk

    def moved(img: nib.Nifti1Image | None, order: int = 1) -> np.ndarray | None:
        if img is None:
            return None
        values = sample_world(img, points) if order else _nearest(img, points)
        return values.reshape(shape)

    instances = moved(s.lesions, 0)
    brain = moved(s.brain, 0)
    assert instances is not None
    _place_missed(instances, s.lesions, space.grid.affine, linear, box)
    det = mapped_points_jacobian(points.reshape(*shape, 3), space.grid.affine)
    return _OnGrid(
        label=s.label,
        instances=instances.astype(np.int32),
        flair=moved(s.flair).astype(np.float32),  # type: ignore[union-attr]
        t1=moved(s.t1),
        wm=moved(s.wm),
        brain=None if brain is None else brain > 0,
        det=det,
        volumes_ul=native_volumes_ul(s.lesions, s.lesion_probability),
        rims=_rims(s.rim_rows),
    )


def _place_missed(
    instances: np.ndarray,
    lesions: nib.Nifti1Image,
    grid_affine: np.ndarray,
    linear: np.ndarray,
    box: tuple[slice, ...],
) -> None:
    """Give every lesion of the session at least one grid voxel: a lesion smaller than a grid
    voxel can fall between the grid's samples, and would then have no row. Its centre goes
    through the inverse of the session's linear map (the deformable part is small) to the
    nearest grid voxel of the ``box``, unless another lesion holds it."""
    data = np.asarray(lesions.dataobj).astype(np.int64)
    missed = sorted(set(np.unique(data[data > 0]).tolist()) - set(np.unique(instances).tolist()))
    if not missed:
        return
    to_grid = np.linalg.inv(grid_affine) @ np.linalg.inv(linear)
    slices = ndimage.find_objects(data)
    offset = np.array([b.start for b in box])
    for lesion in missed:
        where = slices[lesion - 1]
        local = np.argwhere(data[where] == lesion).mean(axis=0) + [w.start for w in where]
        world = nib.affines.apply_affine(lesions.affine, local)
        voxel = np.rint(nib.affines.apply_affine(to_grid, world)).astype(int) - offset
        if np.all(voxel >= 0) and np.all(voxel < instances.shape) and not instances[tuple(voxel)]:
            instances[tuple(voxel)] = lesion


def _in_memory(s: SessionImages) -> SessionImages:
    """Return the session with every image read into memory once: a compressed file's proxy
    is decompressed again on every access, and the steps below read each image several times."""

    def read(img: nib.Nifti1Image | None) -> nib.Nifti1Image | None:
        if img is None or isinstance(img.dataobj, np.ndarray):
            return img
        return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)

    images = ("flair", "lesions", "lesion_probability", "t1", "wm", "brain")
    return replace(s, **{name: read(getattr(s, name)) for name in images})


def _nearest(img: nib.Nifti1Image, points: np.ndarray) -> np.ndarray:
    """Return ``img`` at world ``points`` ``(N, 3)``, nearest voxel (labels keep their values
    and dtype), 0 outside the image."""
    data = np.asarray(img.dataobj)
    idx = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), points).T).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.array(data.shape[:3])[:, None]), axis=0)
    out = np.zeros(points.shape[0], data.dtype)
    out[ok] = data[tuple(idx[:, ok])]
    return out


def native_volumes_ul(
    lesions: nib.Nifti1Image, probability: nib.Nifti1Image | None = None
) -> dict[int, float]:
    """Return ``{instance: volume (µl)}`` on the session's own grid: the sum of the lesion
    probability inside the instance (partial volume), or its voxel count without one.

    Examples:
        >>> inst = nib.Nifti1Image(np.array([[[1, 1, 2]]], np.int16), np.diag([2, 1, 1, 1]))
        >>> native_volumes_ul(inst)
        {1: 4.0, 2: 2.0}
    """
    labels = np.asarray(lesions.dataobj).astype(np.int64)
    voxel_ul = voxel_volume_mm3(lesions.affine)
    n = int(labels.max()) if labels.size else 0
    if probability is not None and probability.shape[:3] == labels.shape[:3]:
        weights = np.clip(np.asarray(probability.dataobj, np.float32), 0, 1).ravel()
    else:
        weights = None
    sums = np.bincount(labels.ravel().clip(0), weights=weights, minlength=n + 1)
    present = np.bincount(labels.ravel().clip(0), minlength=n + 1)
    return {i: round(float(sums[i]) * voxel_ul, 3) for i in range(1, n + 1) if present[i]}


def _rims(rows: Sequence[Mapping[str, Any]] | None) -> dict[int, tuple[str, str]]:
    """Return ``{instance: (rim_probability, rim_call)}`` from a lesion table's rows."""
    out = {}
    for row in rows or []:
        try:
            out[int(row["index"])] = (
                str(row.get("rim_probability", "n/a")),
                str(row.get("rim_call", "n/a")),
            )
        except (KeyError, ValueError):
            continue
    return out


def _nawm(grid: Sequence[_OnGrid]) -> np.ndarray:
    """Return normal-appearing white matter on the grid: WM in every session (probability
    ≥ 0.9 where given), 2 voxels away from any session's lesion."""
    lesions = np.zeros(grid[0].instances.shape, bool)
    for g in grid:
        lesions |= g.instances > 0
    near = ndimage.binary_dilation(lesions, iterations=2)
    wm = np.ones(lesions.shape, bool)
    have = False
    for g in grid:
        if g.wm is not None:
            wm &= g.wm >= 0.9
            have = True
        elif g.brain is not None:
            wm &= g.brain
    if not have:  # no tissue map: the brain's voxels near the FLAIR's median intensity
        ref = grid[0].flair
        inside = ref > np.percentile(ref[ref > 0], 50) if (ref > 0).any() else ref > 0
        med = float(np.median(ref[inside])) if inside.any() else 1.0
        wm &= np.abs(ref / max(med, 1e-6) - 1) < 0.15
    return wm & ~near


def _brain(a: _OnGrid, b: _OnGrid) -> np.ndarray | None:
    """Return the union of two sessions' brain masks (None when neither has one)."""
    masks = [m for m in (a.brain, b.brain) if m is not None]
    return None if not masks else np.logical_or.reduce(masks)


def _median_radius_mm(g: _OnGrid) -> float:
    """Return the equivalent-sphere radius (mm) of the session's median lesion (3 mm: none)."""
    if not g.volumes_ul:
        return 3.0
    return float(np.cbrt(3 * float(np.median(list(g.volumes_ul.values()))) / (4 * np.pi)))


# ------------------------------------------------------------------------------ the rows


def _base_row(tracks: Tracks, lid: int, k: int, g: _OnGrid) -> dict[str, Any]:
    """Return the row of lesion ``lid`` at session ``k`` with what tracking alone says."""
    entry = tracks.lineage[lid][k]
    rim = [g.rims[i] for i in entry.instances if i in g.rims]
    probs = [float(p) for p, _ in rim if _is_number(p)]
    calls = [c for _, c in rim]
    fate = "absent"
    if entry.instances:
        fate = "present" if k == 0 or entry.event == "first" else "stable"
    elif entry.event in ("merged", "resolved"):
        fate = entry.event
    return {
        "lesion_id": lid,
        "session": g.label,
        "instances": ";".join(str(i) for i in entry.instances),
        "fate": fate,
        "fate_evidence": "first session" if k == 0 and entry.instances else "n/a",
        "volume_ul": round(sum(g.volumes_ul.get(i, 0.0) for i in entry.instances), 3),
        "expansion_pct": "n/a", "rate": "n/a", "rate_unit": "n/a", "growth_ul": "n/a",
        "pv_volume_ul": "n/a", "pv_rate": "n/a", "jacobian_rate": "n/a",
        "change_z": "n/a",
        "merged_from": ";".join(str(i) for i in entry.merged_from),
        "merged_into": entry.merged_into, "split_from": entry.split_from,
        "sel_candidate_ul": "n/a", "sel_rate": "n/a", "sel_lesion_rate": "n/a",
        "sel_concentricity": "n/a", "sel_constancy": "n/a", "sel_noise_floor": "n/a",
        "sel_call": "n/a", "t1_change_pct": "n/a",
        "rim_probability": round(max(probs), 4) if probs else "n/a",
        "rim_call": "yes" if "yes" in calls else (calls[0] if calls else "n/a"),
    }  # fmt: skip


def _interval_fate(
    row: dict[str, Any],
    tracks: Tracks,
    lid: int,
    k: int,
    rate: np.ndarray,
    span: float | None,
    cm: chg.ChangeMap,
    dets: tuple[np.ndarray, np.ndarray],
    settings: ActivitySettings,
    voxel_ul: float,
    changed: np.ndarray,
    newness: Callable[[list[int]], float],
    smallest_ul: float,
) -> None:
    """Fill ``row`` (lesion ``lid`` at session ``k``) with its fate over the interval ending
    there, and mark its new or grown voxels in ``changed``.

    ``rate`` is the expansion map of the interval (%/yr, or % per interval when ``span`` is
    None); the thresholds compare rates in the same unit."""
    before, now = tracks.lineage[lid][k - 1], tracks.lineage[lid][k]
    if not now.instances:
        return
    region_b = tracks.labels[k] == lid
    box = _box(region_b | (tracks.labels[k - 1] == lid), pad=3)
    z = cm.z[box]
    if not before.instances:  # appeared (or split off)
        row["change_z"] = _r(newness(now.instances))
        if now.event == "split":
            row["fate"], row["fate_evidence"] = "split", f"split off lesion {now.split_from}"
            return
        size_ok = float(row["volume_ul"]) >= smallest_ul
        z_ok = _is_number(row["change_z"]) and float(row["change_z"]) >= settings.new_min_z
        if size_ok and z_ok:
            row["fate"] = "new"
            row["fate_evidence"] = f"no earlier lesion; FLAIR brightened (mean z {row['change_z']})"
            changed[region_b] = True
        else:
            row["fate"] = "stable"
            row["fate_evidence"] = (
                "no earlier lesion, but no FLAIR change (mean z "
                f"{row['change_z']}): there before and not segmented"
                if size_ok
                else f"no earlier lesion; {row['volume_ul']} uL, below "
                f"{settings.min_new_voxels} voxels ({smallest_ul:.1f} uL)"
            )
        return
    region_a = (tracks.labels[k - 1] == lid)[box]
    per_year = float(rate[box][region_a].mean())
    years = 1.0 if span is None else span
    growth = chg.growth_voxels(cm, region_a, region_b[box], min_z=settings.growth_min_z, where=box)
    if int(growth.sum()) < settings.min_new_voxels:  # a few voxels: partial volume, not growth
        growth[:] = False
    growth_ul = float(growth.sum()) * voxel_ul
    earlier_ul = max(float(region_a.sum()) * voxel_ul, 1e-6)
    others = ((tracks.labels[k - 1] > 0) | (tracks.labels[k] > 0))[box] & ~region_a & ~region_b[box]
    pv_a, pv_b = chg.partial_volumes_ul(
        cm, region_a, region_b[box], others, dets, voxel_ul, where=box
    )
    pv_rate = 100.0 * (pv_b / pv_a - 1.0) / max(years, 1e-6) if pv_a > 0 else float("nan")
    row.update(
        expansion_pct=_r(per_year * years),
        jacobian_rate=_r(per_year),
        rate=_r(pv_rate if np.isfinite(pv_rate) else per_year),
        growth_ul=_r(growth_ul),
        change_z=_r(chg.new_lesion_evidence(z, region_b[box])),
        pv_volume_ul=_r(pv_b),
        pv_rate=_r(pv_rate),
    )
    threshold = settings.change_pct_per_year
    grown = 100.0 * growth_ul / earlier_ul / max(years, 1e-6)  # same unit as the rate
    if now.merged_from:
        row["fate"] = "merged"
        row["fate_evidence"] = "lesions " + ";".join(map(str, now.merged_from)) + " merged into it"
    elif now.event == "split":
        row["fate"], row["fate_evidence"] = "split", "a piece split off"
    elif min(per_year, _or(pv_rate, per_year)) >= threshold or grown >= threshold:
        row["fate"] = "enlarging"
        row["fate_evidence"] = (
            f"Jacobian {per_year:.1f}, partial volume {pv_rate:.1f}, brightened growth "
            f"{grown:.1f} (% of its volume {'a year' if span is not None else 'in the interval'})"
        )
        sub = changed[box]
        sub |= growth if growth.any() else (region_b[box] & ~region_a)
    elif max(per_year, _or(pv_rate, per_year)) <= -threshold:
        row["fate"] = "shrinking"
        row["fate_evidence"] = f"Jacobian {per_year:.1f}, partial volume {pv_rate:.1f}"
    else:
        row["fate"] = "stable"
        row["fate_evidence"] = (
            f"Jacobian {per_year:.1f}, partial volume {pv_rate:.1f}: not both beyond ±{threshold:g}"
        )


def _sel_since_first(
    rows: dict[tuple[int, int], dict[str, Any]],
    tracks: Tracks,
    grid: Sequence[_OnGrid],
    k: int,
    times: Sequence[float],
    dated: bool,
    nawm: np.ndarray,
    voxel_mm: float,
    settings: ActivitySettings,
) -> np.ndarray:
    """Fill the SEL columns of every lesion present at session ``k`` and at an earlier one
    (expansion since its first session) and return the map of the called SEL candidates."""
    out = np.zeros(grid[k].instances.shape, bool)
    unit = "%/year" if dated else "%/interval"
    floors: dict[int, tuple[float, np.ndarray]] = {}
    for lid in tracks.ids:
        row = rows[lid, k]
        row["rate_unit"] = unit if row["rate"] != "n/a" else "n/a"
        first = next((j for j in range(k) if tracks.present(lid, j)), None)
        if first is None or not tracks.present(lid, k):
            continue
        if first not in floors:
            span = times[k] - times[first]
            ratio = grid[k].det / np.maximum(grid[first].det, 1e-6)
            rate = slx.expansion_rate(ratio, span if dated else None)
            floor, _ = slx.noise_floor(
                rate, nawm, _median_radius_mm(grid[first]), voxel_mm,
                quantile=settings.sel.noise_quantile,
            )  # fmt: skip
            floors[first] = (floor, rate)
        floor, rate = floors[first]
        lesion = tracks.labels[first] == lid
        box = _box(lesion, pad=int(np.ceil(settings.sel.edge_mm / voxel_mm)) + 2)
        m = slx.measure(rate[box], lesion[box], voxel_mm, settings.sel)
        constancy = _constancy(tracks, grid, lid, first, k, times, lesion)
        call = slx.sel_call(m, floor, settings.sel, constancy)
        row.update(
            sel_candidate_ul=_r(m.candidate_voxels * voxel_mm**3),
            sel_rate=_r(m.candidate_rate), sel_lesion_rate=_r(m.lesion_rate),
            sel_concentricity=_r(m.concentricity), sel_constancy=_r(constancy),
            sel_noise_floor=_r(floor), sel_call="yes" if call else "no",
            t1_change_pct=_r(_t1_change(grid[first], grid[k], lesion, nawm)),
        )  # fmt: skip
        if call:
            sub = out[box]
            sub |= slx.candidate(rate[box], lesion[box], settings.sel, voxel_mm)
    return out


def _constancy(
    tracks: Tracks,
    grid: Sequence[_OnGrid],
    lid: int,
    first: int,
    k: int,
    times: Sequence[float],
    lesion: np.ndarray,
) -> float:
    """Return the constancy R² of the lesion's cumulative expansion from ``first`` to ``k``
    (NaN with fewer than three sessions in that span)."""
    if k - first < 2:
        return float("nan")
    base = grid[first].det[lesion].sum()
    cumulative = [
        100.0 * (grid[j].det[lesion].sum() / max(base, 1e-6) - 1) for j in range(first + 1, k + 1)
    ]
    return slx.constancy([times[j] - times[first] for j in range(first + 1, k + 1)], cumulative)


def _t1_change(a: _OnGrid, b: _OnGrid, lesion: np.ndarray, nawm: np.ndarray) -> float:
    """Return the lesion's mean T1w change from ``a`` to ``b`` in % of NAWM (NaN: no T1w)."""
    if a.t1 is None or b.t1 is None:
        return float("nan")
    ref = nawm & (a.t1 > 0) & (b.t1 > 0)
    if ref.sum() < 100:
        return float("nan")
    ta = a.t1 / float(np.median(a.t1[ref]))
    tb = b.t1 / float(np.median(b.t1[ref]))
    return float(100.0 * (tb[lesion].mean() - ta[lesion].mean()))


def _interval_counts(rows: Sequence[Mapping[str, Any]], voxel_ul: float) -> dict[str, Any]:
    """Return the counts and volumes of an interval from its later session's rows."""

    def num(v: Any) -> float:
        return float(v) if _is_number(v) else 0.0

    new = [r for r in rows if r["fate"] == "new"]
    enl = [r for r in rows if r["fate"] == "enlarging"]
    sel = [r for r in rows if r["sel_call"] == "yes"]
    prl = [r for r in rows if r["rim_call"] == "yes"]
    return {
        "new_count": len(new),
        "new_volume_ul": round(sum(num(r["volume_ul"]) for r in new), 3),
        "enlarging_count": len(enl),
        "enlarging_volume_ul": round(sum(num(r["growth_ul"]) for r in enl), 3),
        "shrinking_count": sum(r["fate"] == "shrinking" for r in rows),
        "resolved_count": sum(r["fate"] == "resolved" for r in rows),
        "sel_count": len(sel),
        "sel_volume_ul": round(sum(num(r["sel_candidate_ul"]) for r in sel), 3),
        "prl_count": len(prl),
        "prl_sel_count": sum(r["rim_call"] == "yes" and r["sel_call"] == "yes" for r in rows),
    }


# ------------------------------------------------------------------------------ helpers


def _unbox(data: np.ndarray, box: tuple[slice, ...], space: SubjectSpace) -> np.ndarray:
    """Return ``data`` (on the grid's ``box``) on the whole grid, zero outside the box."""
    out = np.zeros(space.grid.shape[:3], data.dtype)
    out[box] = data
    return out


def _box(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Return the bounding box of ``mask`` padded by ``pad`` voxels (clipped to the array)."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _r(value: float, digits: int = 4) -> float | str:
    """Return ``value`` rounded, or ``n/a`` for NaN."""
    return round(float(value), digits) if np.isfinite(value) else "n/a"


def _or(value: float, fallback: float) -> float:
    """Return ``value``, or ``fallback`` when it is NaN."""
    return value if np.isfinite(value) else fallback


def _is_number(value: Any) -> bool:
    """Return whether ``value`` reads as a finite number."""
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False
