"""TEMPORARY stand-in for ``smoulder.longitudinal.space`` / ``.activity`` while they are written.

For developing benchmarks/longitudinal.py only (SMOULDER_LONGITUDINAL_STANDIN=1); to be
deleted before the benchmark is committed. Rigid registration to the first session, overlap
tracking of the given masks, fates and SEL from mask volumes: no Jacobian, no change map logic
beyond the masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np


@dataclass
class SessionImages:
    label: str
    flair: nib.Nifti1Image
    lesions: nib.Nifti1Image
    lesion_probability: nib.Nifti1Image | None = None
    t1: nib.Nifti1Image | None = None
    wm: nib.Nifti1Image | None = None
    brain: nib.Nifti1Image | None = None
    rim_rows: list | None = None


@dataclass
class ActivitySettings:
    enlarging_pct_per_year: float = 9.0
    sel_pct_per_year: float = 12.5


@dataclass
class Space:
    grid: nib.Nifti1Image
    to_session: dict = field(default_factory=dict)


@dataclass
class Activity:
    rows: list
    intervals: list
    change: dict


def subject_space(flairs, engine="greedy", device="cpu", seed=0, threads=2):  # noqa: ANN001, ANN201
    from smoulder.registration.engines import register
    from smoulder.registration.transforms import AffineTransform, TransformChain

    grid = nib.Nifti1Image(np.zeros(flairs[0].shape[:3], np.uint8), flairs[0].affine)
    space = Space(grid, {"01": TransformChain([AffineTransform.identity()])})
    for k, img in enumerate(flairs[1:], start=2):
        reg = register(flairs[0], img, transform="rigid", engine="greedy", threads=threads)
        space.to_session[f"{k:02d}"] = reg.forward
    return space


def lesion_activity(space, sessions, years, settings):  # noqa: ANN001, ANN201, C901
    from smoulder.registration.transforms import resample

    maps = [
        np.asarray(
            resample(
                s.lesions, space.grid, space.to_session[s.label], interpolation="nearest"
            ).dataobj
        ).astype(np.int32)
        for s in sessions
    ]
    voxel = float(abs(np.linalg.det(space.grid.affine[:3, :3])))
    pid_of: list[dict[int, int]] = []
    next_id = 1
    for k, m in enumerate(maps):
        ids = {}
        for i in np.unique(m[m > 0]):
            prev = None
            if k > 0:
                under = maps[k - 1][(m == i) & (maps[k - 1] > 0)]
                if under.size:
                    prev = pid_of[k - 1][int(np.bincount(under).argmax())]
            if prev is None:
                prev, next_id = next_id, next_id + 1
            ids[int(i)] = prev
        pid_of.append(ids)
    rows, change, intervals = [], {}, []
    vols = [{} for _ in maps]
    inst = [{} for _ in maps]
    for k, ids in enumerate(pid_of):
        for i, p in ids.items():
            vols[k][p] = vols[k].get(p, 0.0) + float((maps[k] == i).sum()) * voxel
            inst[k].setdefault(p, []).append(i)
    allp = sorted({p for ids in pid_of for p in ids.values()})
    dt_all = (years[-1] - years[0]) if years[0] is not None else 1.0
    for p in allp:
        rate = float("nan")
        if p in vols[0] and p in vols[-1]:
            rate = (vols[-1][p] / vols[0][p] - 1) * 100 / dt_all
        sel = (
            "yes"
            if p in vols[0] and rate >= settings.sel_pct_per_year
            else ("no" if p in vols[0] else "n/a")
        )
        for k, s in enumerate(sessions):
            fate = "absent"
            if p in vols[k]:
                if k == 0:
                    fate = "present"
                elif p not in vols[k - 1]:
                    fate = "new"
                else:
                    dt = (years[k] - years[k - 1]) if years[0] is not None else 1.0
                    r = (vols[k][p] / vols[k - 1][p] - 1) * 100 / dt
                    fate = (
                        "enlarging"
                        if r >= settings.enlarging_pct_per_year
                        else "shrinking"
                        if r <= -settings.enlarging_pct_per_year
                        else "stable"
                    )
            rows.append(
                {
                    "lesion_id": p,
                    "session": s.label,
                    "instances": ";".join(map(str, inst[k].get(p, []))),
                    "fate": fate,
                    "volume_ul": vols[k].get(p, 0.0),
                    "sel_call": sel,
                    "sel_rate_pct_per_year": rate,
                }
            )
    for k in range(1, len(sessions)):
        key = f"{sessions[k - 1].label}-{sessions[k].label}"
        chosen = [
            i
            for i, p in pid_of[k].items()
            if any(
                r["lesion_id"] == p
                and r["session"] == sessions[k].label
                and r["fate"] in ("new", "enlarging")
                for r in rows
            )
        ]
        change[key] = np.isin(maps[k], chosen) & (maps[k - 1] == 0)
        intervals.append(
            {
                "interval": key,
                "years": None,
                "new_count": 0,
                "enlarging_count": 0,
                "sel_count": 0,
                "noise_floor_pct_per_year": float("nan"),
            }
        )
    return Activity(rows, intervals, change)
