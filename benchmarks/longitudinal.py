"""Benchmark: lesion activity over time — new, enlarging and slowly expanding lesions.

    python benchmarks/longitudinal.py --out DIR [--quick] [--methods m1,m2] [--cases c1,c2]
                                      [--subjects N] [--cache DIR] [--device cpu|cuda]
                                      [--threads 2] [--seed S] [--append]

Writes ``DIR/longitudinal.json`` (a list of records) and ``DIR/longitudinal.md`` (the tables,
with the targets of issue 23).

Sets (cases)
------------
``phantom-2ses``, ``phantom-3ses`` — smoulder's phantom (``generate_dataset``), 2 and 3
    sessions a year apart: 12 baseline lesions, 30 % slowly expanding (radial rate 0.3–0.8
    mm/year, the phantom's range), 10 % shrinking, the rest stable, 2 new lesions per
    follow-up; head repositioning and a bias field (intensity drift) per session.
``phantom-thick-flair`` — subject 01 of ``phantom-2ses`` with its follow-up FLAIR from the
    same dataset made with thick 2D slices (``flair_slice_mm``): 3D baseline, 2D follow-up.
    The phantom's lesions are fed to smoulder and lesiontrack as the truth instance maps
    (``space-T1w_desc-lesions_dseg``; on a thick-slice grid each voxel takes the lesion that
    covers at least half of its slab).
``anatomy-patient07``, ``anatomy-patient19`` — real baselines (open MS data, Lesjak et al.,
    Neuroinformatics 2017: FLAIR, T1, consensus mask) and synthetic follow-ups one year later
    (``longitudinal_cases.anatomy_subject``): lesions expanded by known volume factors
    (1.1–1.6) with a smooth radial deformation, new lesions of real shape at real places
    (lesions of other patients of the study), a rigid move, an intensity rescale and noise.
    The truth is exact by construction; masks fed: the truth instance maps.
``change-patient01``, ``change-patient03`` — real patients with two sessions (Lesjak et al.,
    Neuroinformatics 2016) and the expert mask of new and enlarging lesion change in the
    data set's common space (mapped with the provided ITK affines). Masks fed: smoulder's own
    segmentation of each session (``smoulder.segmentation.inference.segment``).

Methods
-------
``smoulder-longitudinal`` — ``smoulder.longitudinal.space.subject_space`` (greedy, CPU; its
    grid restricted to the first session's brain mask and a margin, as in the pipeline) and
    ``smoulder.longitudinal.activity.lesion_activity`` with default ``ActivitySettings``, in a
    child process per subject. New and enlarging lesions: the rows' fates; SEL: ``sel_call``;
    rate: the rows' volume ``rate`` (partial volume, per interval) compounded from the first
    session to the last, per year; change: ``activity.change``.
``lesiontrack`` — PyPI ``lesiontrack`` 0.2.0 in its own environment
    (``benchmarks/peers/lesiontrack_env.sh``): ``lesiontrack run MANIFEST --out DIR`` with the
    same masks, T1w, FLAIR and brain mask; every follow-up against the baseline in its
    halfway space. New/enlarging: ``lesion_tracking.tsv`` classes; SEL: a candidate of
    ``sel_candidates.nii.gz`` inside the lesion (Elliott's rule, its default); rate: the mean
    of ``expansion_<last>_pct_per_year`` over the lesion; change: ``new_or_enlarging_<tp>``.
``subtraction-smoulder`` — two independent cross-sectional segmentations (smoulder's own),
    the earlier session's moved onto the later one's grid by a rigid registration (greedy):
    a later component that overlaps nothing is new, one whose volume grew by at least
    smoulder's ``ActivitySettings.change_pct_per_year`` (9 %/year) is enlarging. No SEL.
``subtraction-samseg`` — the same with SAMSEG's lesion masks (``benchmarks/peers/samseg_env.sh``).

Measured
--------
Per lesion, pooled over a set's subjects: ``sel_sensitivity`` (expanding lesions present at the
first session called SEL), ``sel_fpr`` (pre-existing lesions that do not expand called SEL),
``rate_error_pct`` (median of |measured − true| / true of the expansion rate, %/year, over
expanding lesions of true rate ≥ 5 %/year that have a measured rate; ``n_rates`` of them),
``new_f1`` and ``enlarging_f1`` (lesion-wise, per interval: a true lesion is found when a
lesion called so overlaps it; a call is right when it overlaps a true one). True rate: the
volume change from first to last session relative to the first, per year (phantom: the
partial-volume truth volumes; real anatomy: the factor). True enlarging: an expanding lesion
whose true volume grew by ≥ ``ActivitySettings.change_pct_per_year`` (9 %/year) over the
interval. Real change, per subject then averaged: ``change_dice`` (voxels) and ``change_f1``
(lesion-wise, 26-connected components, ``smoulder.segmentation.metrics.lesion_detection``) on
the common grid.
``wall_s`` — the longitudinal steps per subject (mean; smoulder: ``subject_space`` and
``lesion_activity``; lesiontrack: its whole process; subtraction: the registration and the
comparison, the segmentations excluded); ``peak_rss_mb`` — the process's peak (max).

``--quick`` (< 10 min on 2 cores, cold cache): phantom at 3 mm (one subject per set; thick
slices 6 mm), ``anatomy-patient07`` at 2 mm, ``change-patient01``; the subtraction peers on the
change set only (a segmentation takes ~1.5 min per session on 2 cores), lesiontrack not on it
(~3 min per subject at the data's own voxel). Full: phantom at 1 mm (3 subjects with 2
sessions, 2 with 3, 2 thick-FLAIR pairs with 3-mm slices), real anatomy at 1 mm, both real
sets' patients, every method. Phantoms, synthetic follow-ups and segmentations are cached under
``--cache``, named by the source of the code that made them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchenv
import longitudinal_cases as cases
import nibabel as nib
import numpy as np
from benchenv import Skipped, fmt, peak_rss_mb

SMOULDER, LESIONTRACK, SUB_SMOULDER, SUB_SAMSEG = METHODS = (
    "smoulder-longitudinal",
    "lesiontrack",
    "subtraction-smoulder",
    "subtraction-samseg",
)
PEERS_DIR = Path(os.environ.get("SMOULDER_PEERS", Path.home() / ".cache" / "smoulder-peers"))
LESIONTRACK_BIN = PEERS_DIR / "lesiontrack-venv" / "bin" / "lesiontrack"
SETS = (
    "phantom-2ses",
    "phantom-3ses",
    "phantom-thick-flair",
    "anatomy-patient07",
    "anatomy-patient19",
    "change-patient01",
    "change-patient03",
)
#: ``--quick``'s sets; the real-change set is left out (a segmentation of each session, ~1.5
#: min, then registrations at the data's own voxel): ``--quick --cases change-patient01``.
QUICK_SETS = ("phantom-2ses", "phantom-3ses", "phantom-thick-flair", "anatomy-patient07")
#: What ``--quick`` leaves out: method -> (set-name prefixes, why).
QUICK_LEFT_OUT = {
    SUB_SMOULDER: (("phantom-", "anatomy-"), "a segmentation per session, ~1.5 min each"),
    SUB_SAMSEG: (("phantom-", "anatomy-"), "a segmentation per session"),
    LESIONTRACK: (("change-",), "~3 min per subject at the data's native 0.72 x 0.72 x 3 mm"),
}
#: Voxel of the phantom and of the real-anatomy baselines (mm), full and quick.
PHANTOM_RES_MM, QUICK_PHANTOM_RES_MM = 1.0, 3.0
ANATOMY_RES_MM, QUICK_ANATOMY_RES_MM = 1.0, 2.0
#: Subjects per phantom set (full, quick).
PHANTOM_SUBJECTS = {"phantom-2ses": (3, 1), "phantom-3ses": (2, 1), "phantom-thick-flair": (2, 1)}


#: Thick FLAIR slices (mm): 3 mm for a 1-mm phantom, twice the voxel of a coarser one.
def thick_slice_mm(res_mm: float) -> float:
    """Return the slice thickness of the thick-FLAIR follow-up for a phantom of ``res_mm``.

    Examples:
        >>> thick_slice_mm(1.0), thick_slice_mm(3.0)
        (3.0, 6.0)
    """
    return max(3.0, 2.0 * res_mm)


#: Expansions slower than this are not scored for the rate error (%/year, issue 23).
MIN_RATE_PCT_PER_YEAR = 5.0
#: What made cached segmentations.
SEGMENTATION_MODULES = ("smoulder.segmentation",)

#: Targets (issue 23).
TARGETS = {
    "sel_sensitivity": 0.9,
    "sel_fpr": 0.05,
    "rate_error_pct": 25.0,
    "new_f1": 0.9,
    "change_f1": 0.6,
    "wall_s": 60.0,
}

HELP = {
    "quick": "3-mm phantoms, 2-mm real anatomy, one patient per real set (< 10 min)",
    "methods": f"comma-separated, of {', '.join(METHODS)}",
    "cases": f"comma-separated sets or globs, of {', '.join(SETS)}",
    "device": "smoulder's device (registration stays on the CPU with greedy)",
    "seed": "phantom and synthetic follow-up seed",
    "keep": "keep the children's work folders",
}
RECORD_KEYS = (
    "method",
    "case",
    "device",
    "res_mm",
    "n_subjects",
    "n_expanding",
    "sel_sensitivity",
    "sel_fpr",
    "rate_error_pct",
    "n_rates",
    "new_f1",
    "enlarging_f1",
    "n_new",
    "n_enlarging",
    "change_dice",
    "change_f1",
    "wall_s",
    "peak_rss_mb",
    "status",
    "note",
)
SHOWN = (
    "sel_sensitivity",
    "sel_fpr",
    "rate_error_pct",
    "new_f1",
    "enlarging_f1",
    "change_dice",
    "change_f1",
    "wall_s",
    "peak_rss_mb",
)


# ============================================================================ scoring


def object_counts(pred: np.ndarray, truth: np.ndarray, truth_ids: set[int]) -> dict[str, int]:
    """Return the lesion-wise counts of the called lesions ``pred`` (labels, 0: none) against
    the true lesions ``truth_ids`` of the instance map ``truth`` (same grid).

    A true lesion is found when a call overlaps it; a call is right when it overlaps a true
    lesion of ``truth_ids`` (a call on another lesion, or on none, is wrong).

    Examples:
        >>> truth = np.array([0, 1, 1, 2, 2, 3, 0, 0])
        >>> pred = np.array([0, 0, 7, 0, 8, 8, 9, 0])  # 7 on lesion 1, 8 on 2 and 3, 9 on none
        >>> object_counts(pred, truth, {1, 3})
        {'pred_hit': 2, 'pred_total': 3, 'truth_hit': 2, 'truth_total': 2}
        >>> object_counts(np.zeros(8, int), truth, set())
        {'pred_hit': 0, 'pred_total': 0, 'truth_hit': 0, 'truth_total': 0}
    """
    wanted = np.isin(truth, sorted(truth_ids)) if truth_ids else np.zeros(truth.shape, bool)
    calls = np.unique(pred[pred > 0])
    hit_calls = np.unique(pred[(pred > 0) & wanted])
    found = np.unique(truth[(pred > 0) & wanted])
    return {
        "pred_hit": int(hit_calls.size),
        "pred_total": int(calls.size),
        "truth_hit": int(found.size),
        "truth_total": len(truth_ids),
    }


def pooled_f1(counts: list[dict[str, int]]) -> float:
    """Return the F1 of the summed counts of :func:`object_counts` (NaN: nothing to find and
    nothing called; no calls, or no true lesions: the other score is 0, so F1 is 0).

    Examples:
        >>> pooled_f1([{"pred_hit": 2, "pred_total": 3, "truth_hit": 2, "truth_total": 2}])
        0.8
        >>> pooled_f1([{"pred_hit": 0, "pred_total": 0, "truth_hit": 0, "truth_total": 0}])
        nan
        >>> pooled_f1([{"pred_hit": 0, "pred_total": 2, "truth_hit": 0, "truth_total": 0}])
        0.0
    """
    total = {
        k: sum(c[k] for c in counts) for k in ("pred_hit", "pred_total", "truth_hit", "truth_total")
    }
    if total["pred_total"] == 0 and total["truth_total"] == 0:
        return float("nan")
    precision = total["pred_hit"] / total["pred_total"] if total["pred_total"] else 0.0
    recall = total["truth_hit"] / total["truth_total"] if total["truth_total"] else 0.0
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def enlarging_pct_per_year() -> float:
    """Return the volume rate beyond which a lesion is enlarging (%/year): smoulder's own
    threshold (``ActivitySettings.change_pct_per_year``; Vanden Bulcke et al. 2025), used
    for the truth and the subtraction peers alike.

    Examples:
        >>> enlarging_pct_per_year()
        9.0
    """
    from smoulder.longitudinal.activity import ActivitySettings

    return float(ActivitySettings().change_pct_per_year)


def present(truth: dict, lesion: int, session: str) -> bool:
    """Return whether the truth has lesion ``lesion`` (with a volume) at ``session``."""
    return truth["volumes_ul"].get(str(lesion), {}).get(session, 0.0) > 0


def interval_truth(
    truth: dict, a: str, b: str, years: dict[str, float | None]
) -> dict[str, set[int]]:
    """Return the true ``new`` and ``enlarging`` lesion ids from session ``a`` to ``b``.

    New: absent at ``a``, present at ``b``. Enlarging: expanding, present at both, its volume
    grown by at least :func:`enlarging_pct_per_year` per year (per interval without dates).

    Examples:
        >>> t = {"lesions": [{"id": 1, "expanding": True}, {"id": 2, "expanding": True},
        ...                  {"id": 3, "expanding": False}],
        ...      "volumes_ul": {"1": {"a": 100.0, "b": 130.0}, "2": {"a": 100.0, "b": 105.0},
        ...                     "3": {"b": 40.0}}}
        >>> interval_truth(t, "a", "b", {"a": 0.0, "b": 1.0})
        {'new': {3}, 'enlarging': {1}}
    """
    dt = 1.0
    if years.get(a) is not None and years.get(b) is not None:
        dt = float(years[b]) - float(years[a])  # type: ignore[arg-type]
    new, enlarging = set(), set()
    for lesion in truth["lesions"]:
        i = lesion["id"]
        if present(truth, i, b) and not present(truth, i, a):
            new.add(i)
        elif lesion["expanding"] and present(truth, i, a) and present(truth, i, b):
            vols = truth["volumes_ul"][str(i)]
            if (vols[b] / vols[a] - 1.0) * 100.0 / dt >= enlarging_pct_per_year():
                enlarging.add(i)
    return {"new": new, "enlarging": enlarging}


def sel_counts(
    truth: dict, first: str, visible: set[int], called: set[int] | None
) -> dict[str, int]:
    """Return the SEL counts over the lesions present at ``first`` (and ``visible``, i.e. on
    the first session's instance map): expanding called / all expanding, non-expanding called /
    all non-expanding.

    Examples:
        >>> t = {"lesions": [{"id": 1, "expanding": True}, {"id": 2, "expanding": False},
        ...                  {"id": 3, "expanding": False}],
        ...      "volumes_ul": {"1": {"01": 9.0}, "2": {"01": 9.0}, "3": {"02": 9.0}}}
        >>> sel_counts(t, "01", {1, 2, 3}, {1, 2, 3})
        {'tp': 1, 'expanding': 1, 'fp': 1, 'non_expanding': 1}
    """
    out = {"tp": 0, "expanding": 0, "fp": 0, "non_expanding": 0}
    for lesion in truth["lesions"]:
        i = lesion["id"]
        if lesion["expanding"] is None or not present(truth, i, first) or i not in visible:
            continue  # absent, invisible, or not scored (``touched``)
        yes = called is not None and i in called
        if lesion["expanding"]:
            out["expanding"] += 1
            out["tp"] += int(yes)
        else:
            out["non_expanding"] += 1
            out["fp"] += int(yes)
    return out


def rate_errors(truth: dict, rates: dict[int, float]) -> list[float]:
    """Return |measured − true| / true (%) for the expanding lesions of true rate ≥
    :data:`MIN_RATE_PCT_PER_YEAR` with a finite measured rate.

    Examples:
        >>> t = {"lesions": [{"id": 1, "expanding": True, "true_rate_pct_per_year": 20.0},
        ...                  {"id": 2, "expanding": True, "true_rate_pct_per_year": 2.0}]}
        >>> rate_errors(t, {1: 25.0, 2: 4.0})
        [25.0]
    """
    out = []
    for lesion in truth["lesions"]:
        true = lesion.get("true_rate_pct_per_year")
        measured = rates.get(lesion["id"])
        if not lesion["expanding"] or true is None or true < MIN_RATE_PCT_PER_YEAR:
            continue
        if measured is not None and math.isfinite(measured):
            out.append(abs(measured - true) / true * 100.0)
    return out


def change_scores(pred: np.ndarray, truth: np.ndarray, voxel_ul: float) -> dict[str, float]:
    """Return the voxel Dice and lesion-wise F1 of a change mask against the expert one."""
    from smoulder.segmentation.metrics import dice, lesion_detection

    return {"dice": dice(pred, truth), "f1": lesion_detection(pred, truth, voxel_ul).f1}


def score_subject(subject: dict, calls: dict) -> dict:
    """Return one subject's counts: SEL, rates, new and enlarging per interval, change."""
    years = {s["label"]: s["years"] for s in subject["sessions"]}
    out: dict = {"new": [], "enlarging": [], "sel": None, "rates": None, "change": []}
    if subject["truth"]:
        truth = json.loads(Path(subject["truth"]).read_text())
        first = subject["sessions"][0]
        visible = set(np.unique(np.asarray(nib.load(first["truth_lesions"]).dataobj)).tolist())
        if calls["sel"] is not None:
            out["sel"] = sel_counts(truth, first["label"], visible, set(calls["sel"]))
        out["rates"] = rate_errors(truth, {int(k): v for k, v in calls["rates"].items()})
        for item in calls["intervals"]:
            want = interval_truth(truth, item["a"], item["b"], years)
            shown = set(np.unique(item["truth"]).tolist())
            for kind in ("new", "enlarging"):
                out[kind].append(object_counts(item[kind], item["truth"], want[kind] & shown))
    if subject["common"]:
        gt_img = nib.load(subject["common"])
        gt = np.asarray(gt_img.dataobj) > 0
        voxel_ul = float(abs(np.linalg.det(gt_img.affine[:3, :3])))
        for item in calls["intervals"]:
            out["change"].append(change_scores(item["change"], gt, voxel_ul))
    return out


def set_metrics(scored: list[dict]) -> dict:
    """Return a set's metrics from its subjects' :func:`score_subject` counts."""
    out: dict = {}
    sels = [s["sel"] for s in scored if s["sel"] is not None]
    if sels:
        tot = {k: sum(s[k] for s in sels) for k in sels[0]}
        out["n_expanding"] = tot["expanding"]
        out["sel_sensitivity"] = tot["tp"] / tot["expanding"] if tot["expanding"] else None
        out["sel_fpr"] = tot["fp"] / tot["non_expanding"] if tot["non_expanding"] else None
    if any(s["rates"] is not None for s in scored):
        errors = [e for s in scored for e in s["rates"] or []]
        out["n_rates"] = len(errors)
        out["rate_error_pct"] = float(np.median(errors)) if errors else None
    for kind in ("new", "enlarging"):
        counts = [c for s in scored for c in s[kind]]
        if counts:
            out[f"{kind}_f1"] = pooled_f1(counts)
            out[f"n_{kind}"] = sum(c["truth_total"] for c in counts)
    changes = [c for s in scored for c in s["change"]]
    if changes:
        out["change_dice"] = float(np.mean([c["dice"] for c in changes]))
        out["change_f1"] = float(np.nanmean([c["f1"] for c in changes]))
    return out


# ============================================================================ shared steps


def loaded(path: str | None) -> nib.Nifti1Image | None:
    """Return the image at ``path`` read into memory (None for None)."""
    if path is None:
        return None
    img = nib.load(path)
    return nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)


def intervals_of(labels: list[str]) -> list[tuple[str, str]]:
    """Return the consecutive session pairs.

    Examples:
        >>> intervals_of(["01", "02", "03"])
        [('01', '02'), ('02', '03')]
    """
    return list(zip(labels[:-1], labels[1:], strict=True))


def to_common(mask: np.ndarray, affine: np.ndarray, common: str, steps: list) -> np.ndarray:
    """Return a mask on a method's grid moved onto the common grid through ``steps`` (common
    points → the grid's points), nearest neighbour."""
    from smoulder.registration.transforms import TransformChain, resample

    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    moved = resample(img, nib.load(common), TransformChain(steps), interpolation="nearest")
    return np.asarray(moved.dataobj) > 0


def save_calls(work: Path, calls: dict) -> dict:
    """Write a method's calls (arrays to ``interval-K.npz``) in ``work``; return the JSON part."""
    meta = {k: v for k, v in calls.items() if k != "intervals"}
    meta["intervals"] = []
    for k, item in enumerate(calls["intervals"]):
        arrays = {key: item[key] for key in ("new", "enlarging", "truth", "change") if key in item}
        np.savez_compressed(work / f"interval-{k}.npz", **arrays)
        meta["intervals"].append({"a": item["a"], "b": item["b"], "file": f"interval-{k}.npz"})
    return meta


def load_calls(work: Path, meta: dict) -> dict:
    """Return the calls :func:`save_calls` wrote (arrays read into memory)."""
    calls = dict(meta)
    calls["intervals"] = []
    for item in meta["intervals"]:
        with np.load(work / item["file"]) as data:
            arrays = {key: data[key] for key in data.files}
        calls["intervals"].append({"a": item["a"], "b": item["b"], **arrays})
    return calls


def empty_like_truth(path: str | None, shape: tuple[int, ...]) -> np.ndarray:
    """Return the truth instance map at ``path``, or zeros of ``shape`` without one."""
    if path is None:
        return np.zeros(shape, np.int32)
    return np.asarray(nib.load(path).dataobj).astype(np.int32)


# ============================================================================ smoulder


def smoulder_calls(subject: dict, device: str, threads: int) -> dict:
    """Child process: run smoulder's longitudinal steps on one subject; return its calls.

    Every image is read before the clock starts; the clock covers ``subject_space`` (greedy
    halfway or template, deformable) and ``lesion_activity`` with default settings.
    """
    from benchenv import cuda_or_skip

    from smoulder.devices import torch_threads
    from smoulder.longitudinal.activity import ActivitySettings, SessionImages, lesion_activity
    from smoulder.longitudinal.space import subject_space

    dev = cuda_or_skip(device)
    sessions = [
        SessionImages(
            label=s["label"],
            flair=loaded(s["flair"]),
            lesions=loaded(s["lesions"]),
            lesion_probability=None,
            t1=loaded(s["t1"]),
            wm=loaded(s.get("wm")),
            brain=loaded(s["brain"]),
            rim_rows=None,
        )
        for s in subject["sessions"]
    ]
    years = [s["years"] for s in subject["sessions"]]
    with torch_threads(threads):
        start = time.perf_counter()
        space = subject_space(
            {s.label: s.flair for s in sessions},
            engine="greedy",
            device=dev,
            seed=0,
            threads=threads,
            region=sessions[0].brain,
        )
        activity = lesion_activity(space, sessions, years=years, settings=ActivitySettings())
        wall = time.perf_counter() - start
    calls = activity_calls(subject, space, activity)
    note = "; ".join(activity.messages)
    calls.update(wall_s=wall, peak_rss_mb=peak_rss_mb(), device=f"cpu ({threads} threads)")
    return {**calls, "note": note}


def instance_ids(text: str) -> list[int]:
    """Return the instance ids of a row's ``instances`` (``"3;5"``).

    Examples:
        >>> instance_ids("3;5"), instance_ids("")
        ([3, 5], [])
    """
    return [int(t) for t in text.split(";") if t.strip()]


def compound_rate(rows: list[dict], years: dict[str, float | None]) -> float | None:
    """Return a lesion's volume rate from its first session to its last (%/year): its
    per-interval volume rates (the rows' ``rate``) compounded, then annualised; None when it
    was not followed over every interval or a date is missing.

    Examples:
        >>> rows = [{"session": "1", "rate": "n/a"}, {"session": "2", "rate": 10.0},
        ...         {"session": "3", "rate": 10.0}]
        >>> round(compound_rate(rows, {"1": 0.0, "2": 1.0, "3": 2.0}), 2)
        10.5
    """
    ordered = sorted(rows, key=lambda r: years.get(r["session"]) or 0.0)
    factor, span = 1.0, 0.0
    for before, after in zip(ordered, ordered[1:], strict=False):
        t0, t1 = years.get(before["session"]), years.get(after["session"])
        rate = after.get("rate")
        if t0 is None or t1 is None or not isinstance(rate, int | float) or not math.isfinite(rate):
            return None
        factor *= 1.0 + float(rate) * (t1 - t0) / 100.0
        span += t1 - t0
    return (factor - 1.0) * 100.0 / span if span > 0 else None


def activity_calls(subject: dict, space, activity) -> dict:  # noqa: ANN001 - API objects
    """Return the calls of ``lesion_activity``'s rows, intervals and change maps.

    SEL: a persistent lesion with ``sel_call == "yes"`` in any row, named by its instances at
    the first session; rate: its volume rate from the first session to the last
    (:func:`compound_rate` of the rows' ``rate``), where it is one first-session instance.
    New/enlarging at an interval: the later session's instances of rows with that fate, on
    that session's grid.
    """
    from smoulder.registration.transforms import AffineTransform

    labels = [s["label"] for s in subject["sessions"]]
    years = {s["label"]: s["years"] for s in subject["sessions"]}
    first = labels[0]
    by_lesion: dict[int, list[dict]] = {}
    for row in activity.rows:
        by_lesion.setdefault(int(row["lesion_id"]), []).append(row)
    sel, rates = set(), {}
    for rows in by_lesion.values():
        base = [i for r in rows if r["session"] == first for i in instance_ids(r["instances"])]
        if any(r["sel_call"] == "yes" for r in rows):
            sel.update(base)
        overall = compound_rate(rows, years)
        if overall is not None and len(base) == 1:
            rates[base[0]] = overall
    intervals = []
    for a, b in intervals_of(labels):
        session = subject["sessions"][labels.index(b)]
        lesions = np.asarray(nib.load(session["lesions"]).dataobj).astype(np.int32)
        item: dict = {
            "a": a,
            "b": b,
            "truth": empty_like_truth(session["truth_lesions"], lesions.shape),
        }
        for fate in ("new", "enlarging"):
            ids = [
                i
                for r in activity.rows
                if r["session"] == b and r["fate"] == fate
                for i in instance_ids(r["instances"])
            ]
            item[fate] = np.where(np.isin(lesions, ids), lesions, 0)
        if subject["common"]:
            steps = [
                AffineTransform.load(subject["sessions"][0]["to_common"]),
                space.to_session[first].inverse(),
            ]
            change = np.asarray(activity.change[f"{a}-{b}"], bool)
            item["change"] = to_common(change, space.grid.affine, subject["common"], steps)
        intervals.append(item)
    return {"sel": sorted(sel), "rates": rates, "intervals": intervals, "note": ""}


# ============================================================================ subtraction


def subtract(before: np.ndarray, after: np.ndarray, years: float) -> dict[str, np.ndarray]:
    """Return new and enlarging lesions (labels) and the change voxels of two masks on one grid.

    The components (26-connected) of ``after``: one that overlaps no lesion of ``before`` is
    new; one whose volume exceeds that of the ``before`` lesions it overlaps by at least
    :func:`enlarging_pct_per_year` per year is enlarging. Change: the new lesions and the grown
    part (outside ``before``) of the enlarging ones.

    Examples:
        >>> before = np.zeros((1, 1, 12), bool); before[..., 0:4] = True
        >>> after = np.zeros_like(before); after[..., 0:5] = True; after[..., 8:10] = True
        >>> out = subtract(before, after, 1.0)
        >>> out["new"].ravel().tolist()
        [0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0]
        >>> out["enlarging"].ravel().tolist()[:6], out["change"].ravel().astype(int).tolist()[:6]
        ([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 0])
    """
    from smoulder.segmentation.metrics import lesion_components

    before_labels, _ = lesion_components(before)
    after_labels, n = lesion_components(after)
    before_sizes = np.bincount(before_labels.ravel())
    new = np.zeros(after_labels.shape, np.int32)
    enlarging = np.zeros_like(new)
    for k in range(1, n + 1):
        region = after_labels == k
        under = np.unique(before_labels[region & (before_labels > 0)])
        if under.size == 0:
            new[region] = k
            continue
        grown = (region.sum() / before_sizes[under].sum() - 1.0) * 100.0 / years
        if grown >= enlarging_pct_per_year():
            enlarging[region] = k
    change = (new > 0) | ((enlarging > 0) & ~before)
    return {"new": new, "enlarging": enlarging, "change": change}


def subtraction_calls(subject: dict, masks: list[str], threads: int) -> dict:
    """Child process: the subtraction of per-session masks (``masks``, on each FLAIR grid)
    after a rigid registration of each earlier FLAIR to the later one; return the calls."""
    from smoulder.registration.engines import register
    from smoulder.registration.transforms import AffineTransform, resample

    sessions = subject["sessions"]
    labels = [s["label"] for s in sessions]
    flairs = [loaded(s["flair"]) for s in sessions]
    seg = [loaded(m) for m in masks]
    start = time.perf_counter()
    intervals = []
    for a, b in intervals_of(labels):
        ia, ib = labels.index(a), labels.index(b)
        reg = register(flairs[ib], flairs[ia], transform="rigid", engine="greedy", threads=threads)
        before = resample(seg[ia], flairs[ib], reg.forward, interpolation="nearest")
        ya, yb = sessions[ia]["years"], sessions[ib]["years"]
        years = 1.0 if ya is None or yb is None else yb - ya
        out = subtract(np.asarray(before.dataobj) > 0, np.asarray(seg[ib].dataobj) > 0, years)
        item = {"a": a, "b": b, "new": out["new"], "enlarging": out["enlarging"]}
        item["truth"] = empty_like_truth(sessions[ib]["truth_lesions"], out["new"].shape)
        if subject["common"]:
            steps = [AffineTransform.load(sessions[ib]["to_common"])]
            item["change"] = to_common(out["change"], flairs[ib].affine, subject["common"], steps)
        intervals.append(item)
    wall = time.perf_counter() - start
    return {
        "sel": None,
        "rates": {},
        "intervals": intervals,
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "device": f"cpu ({threads} threads)",
        "note": "",
    }


# ============================================================================ segmentation


def segmentation_folder(cache: Path, session: dict) -> Path:
    """Return the cache folder of smoulder's segmentation of a session (named by the
    segmentation's source and the session's images)."""
    import hashlib

    key = hashlib.sha256(f"{session['flair']}|{session['t1']}".encode()).hexdigest()[:12]
    version = benchenv.source_fingerprint(*SEGMENTATION_MODULES)
    return cache / f"segmentation-{version}" / key


def segment_sessions(items: list[dict], device: str, threads: int) -> dict:
    """Child process: segment each ``{"flair", "t1", "out"}`` with smoulder, writing its lesion
    instances, brain mask and seconds to ``out``."""
    from benchenv import cuda_or_skip

    from smoulder.devices import torch_threads
    from smoulder.images import atomic_path
    from smoulder.segmentation.inference import segment

    dev = cuda_or_skip(device)
    seconds = []
    with torch_threads(threads):
        for item in items:
            out = Path(item["out"])
            out.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            result = segment(loaded(item["flair"]), loaded(item["t1"]), device=dev)
            seconds.append(time.perf_counter() - start)
            nib.save(result.instances, out / "instances.nii.gz")
            nib.save(result.brain_mask, out / "brain.nii.gz")
            with atomic_path(out / "done.json") as tmp:
                tmp.write_text(json.dumps({"wall_s": seconds[-1]}))
    return {"seconds": seconds}


def segmentations(subject: dict, args: argparse.Namespace) -> tuple[list[dict], str]:
    """Return per session its cached smoulder segmentation (``instances``, ``brain`` paths),
    segmenting the missing ones in a child process, and a note of what it took."""
    folders = [segmentation_folder(args.cache, s) for s in subject["sessions"]]
    todo = [
        {"flair": s["flair"], "t1": s["t1"], "out": str(f)}
        for s, f in zip(subject["sessions"], folders, strict=True)
        if not (f / "done.json").is_file()
    ]
    if todo:
        print(f"  segmenting {len(todo)} session(s) of {subject['name']} ...", flush=True)
        result = run_child("segment", {"items": todo}, args, lambda r: r)
        if result["status"] != "ok":
            raise RuntimeError(f"segmentation failed: {result['note']}")
    took = [json.loads((f / "done.json").read_text())["wall_s"] for f in folders]
    out = [
        {"instances": str(f / "instances.nii.gz"), "brain": str(f / "brain.nii.gz")}
        for f in folders
    ]
    return out, f"segmentation {', '.join(f'{t:.0f}' for t in took)} s per session (cached)"


def samseg_masks(subject: dict, args: argparse.Namespace) -> list[str]:
    """Return per session SAMSEG's lesion mask (label 99) on the FLAIR grid, run through
    ``benchmarks/segmentation.py``'s cached runner.

    Raises:
        Skipped: SAMSEG's environment is absent.
    """
    import segmentation as seg_bench

    if not seg_bench.RUN_SAMSEG.is_file():
        raise Skipped(f"{seg_bench.RUN_SAMSEG} is absent: run benchmarks/peers/samseg_env.sh")
    out = []
    for s in subject["sessions"]:
        if s["t1"] is None:
            raise Skipped(f"{subject['name']} session {s['label']} has no T1 for SAMSEG")
        folder = segmentation_folder(args.cache, s)
        key = f"longitudinal-{folder.name}"
        case = seg_bench.Case(key, Path(s["flair"]), Path(s["t1"]), Path(s["flair"]), 0.0)
        result = seg_bench.run_samseg(case, args)
        mask = folder.parent.parent / "samseg" / f"{key}.nii.gz"
        if not mask.is_file():
            mask.parent.mkdir(parents=True, exist_ok=True)
            labels = seg_bench.on_grid(nib.load(result["seg"]), nib.load(s["flair"]))
            nib.save(
                nib.Nifti1Image((labels == 99).astype(np.uint8), nib.load(s["flair"]).affine), mask
            )
        out.append(str(mask))
    return out


# ============================================================================ lesiontrack


def lesiontrack_manifest(
    subject: dict, masks: list[str], brains: list[str | None], work: Path
) -> tuple[Path, str]:
    """Write lesiontrack's manifest for one subject; return it and a note.

    Masks with more than :data:`~longitudinal_cases.MAX_LESION_ID` instances (lesiontrack
    reslices them as bytes) are given as binary masks; a session without a T1 gets its
    FLAIR in the T1 column; sessions without dates are a year apart.
    """
    notes = []
    rows = ["subject\tsession\ttime_years\tt1\tflair\tmask\tbrainmask"]
    for k, (s, mask, brain) in enumerate(zip(subject["sessions"], masks, brains, strict=True)):
        img = nib.load(mask)
        data = np.asarray(img.dataobj)
        if data.max() > cases.MAX_LESION_ID or data.dtype.kind == "f":
            mask = str(work / f"mask-{s['label']}.nii.gz")
            nib.save(nib.Nifti1Image((data > 0).astype(np.uint8), img.affine), mask)
        t1 = s["t1"]
        if t1 is None:
            t1 = s["flair"]
            notes.append(f"session {s['label']}: no T1, its FLAIR given as T1")
        years = s["years"] if s["years"] is not None else float(k)
        rows.append(f"s\tses-{s['label']}\t{years}\t{t1}\t{s['flair']}\t{mask}\t{brain or ''}")
    manifest = work / "manifest.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest, "; ".join(notes)


def lesiontrack_calls(subject: dict, out: Path) -> dict:
    """Return lesiontrack's calls from its outputs in ``out`` (on its baseline grid in its
    halfway space; the truth ids come along in its resliced masks)."""
    from smoulder.registration.transforms import AffineTransform

    labels = [s["label"] for s in subject["sessions"]]
    first, last = labels[0], labels[-1]
    reg = out / "reg"
    base = np.asarray(nib.load(reg / f"ses-{last}_baseline_mask_halfway.nii.gz").dataobj).astype(
        np.int32
    )
    cand_img = nib.load(out / "sel_candidates.nii.gz")
    cand = np.asarray(cand_img.dataobj).astype(np.int32)
    sel = set()
    for k in np.unique(cand[cand > 0]):
        under = base[(cand == k) & (base > 0)]
        if under.size:
            sel.add(int(np.bincount(under).argmax()))
    expansion = np.asarray(nib.load(out / f"expansion_ses-{last}_pct_per_year.nii.gz").dataobj)
    rates = {int(i): float(expansion[base == i].mean()) for i in np.unique(base[base > 0])}
    groups = cases.read_tsv_rows(out / "lesion_tracking.tsv")
    halfway = np.loadtxt(reg / f"ses-{last}_halfway.mat").reshape(4, 4)
    intervals = []
    for b in labels[1:]:
        comps = np.asarray(nib.load(out / f"lesion_labels_ses-{b}.nii.gz").dataobj).astype(np.int32)
        item: dict = {"a": first, "b": b}
        item["truth"] = np.asarray(
            nib.load(reg / f"ses-{b}_followup_mask_halfway.nii.gz").dataobj
        ).astype(np.int32)
        for fate in ("new", "enlarging"):
            ids = [
                int(j)
                for g in groups
                if g["follow_up"] == f"ses-{b}" and g["class"] == fate
                for j in g["followup_ids"].split(",")
                if j.strip()
            ]
            item[fate] = np.where(np.isin(comps, ids), comps, 0)
        if subject["common"]:
            # halfway point x is baseline point H⁻¹x (RAS), so baseline p is halfway H·p
            steps = [
                AffineTransform.load(subject["sessions"][0]["to_common"]),
                AffineTransform(halfway),
            ]
            change = np.asarray(nib.load(out / f"new_or_enlarging_ses-{b}.nii.gz").dataobj) > 0
            item["change"] = to_common(change, cand_img.affine, subject["common"], steps)
        intervals.append(item)
    return {"sel": sorted(sel), "rates": rates, "intervals": intervals}


def run_lesiontrack(
    subject: dict, masks: list[str], brains: list[str | None], args: argparse.Namespace
) -> dict:
    """Run lesiontrack on one subject in its own process (pinned, measured); return its calls.

    Raises:
        Skipped: its environment is absent.
    """
    import segmentation as seg_bench

    if not LESIONTRACK_BIN.is_file():
        raise Skipped(f"{LESIONTRACK_BIN} is absent: run benchmarks/peers/lesiontrack_env.sh")
    work = Path(tempfile.mkdtemp(prefix="lesiontrack-", dir=args.cache / "work"))
    try:
        manifest, note = lesiontrack_manifest(subject, masks, brains, work)
        cmd = [str(LESIONTRACK_BIN), "run", str(manifest), "--out", str(work / "out")]
        cmd += ["--threads", str(args.threads)]
        measured = seg_bench.measured_run(cmd, work, args, "lesiontrack")
        calls = lesiontrack_calls(subject, work / "out" / "s")
        calls.update(
            wall_s=measured["wall_s"],
            peak_rss_mb=round(measured["maxrss_kb"] / 1024, 1),
            device=f"cpu ({args.threads} threads)",
            note=note,
        )
        return calls
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


# ============================================================================ children


def worker(method: str, given_json: Path, work: Path, device: str, threads: int) -> int:
    """Child process entry: run ``method`` on what ``given_json`` holds, results in ``work``."""
    given = json.loads(given_json.read_text())

    def run() -> dict:
        if method == "segment":
            return segment_sessions(given["items"], device, threads)
        if method == SMOULDER:
            calls = smoulder_calls(given["subject"], device, threads)
        elif method in (SUB_SMOULDER, SUB_SAMSEG):
            calls = subtraction_calls(given["subject"], given["masks"], threads)
        else:
            raise ValueError(f"no worker for method {method!r}")
        return save_calls(work, calls)

    return benchenv.worker_main(work, run)


def run_child(method: str, given: dict, args: argparse.Namespace, read: benchenv.Reader) -> dict:
    """Run a worker in a fresh child pinned to ``--threads`` CPUs; return ``read`` of its
    result, or its failure."""
    work = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=args.cache / "work"))
    (work / "given.json").write_text(json.dumps(given))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    cmd += ["--given", str(work / "given.json"), "--work", str(work)]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, benchenv.cpus(args.threads))), *cmd]
    return benchenv.child_result(
        cmd,
        work,
        benchenv.thread_env(args.threads),
        args,
        lambda result: read({**result, "work": work}),
    )


def method_calls(method: str, subject: dict, args: argparse.Namespace) -> dict:
    """Return ``method``'s calls on one subject (``status`` ok), or why it has none."""
    try:
        needs_seg = method == SUB_SMOULDER or subject["sessions"][0]["lesions"] is None
        seg, seg_note = segmentations(subject, args) if needs_seg else ([], "")
        if subject["sessions"][0]["lesions"] is None:  # real change: the masks are smoulder's
            subject = json.loads(json.dumps(subject))
            for s, found in zip(subject["sessions"], seg, strict=True):
                s["lesions"], s["brain"] = found["instances"], found["brain"]
        if method == LESIONTRACK:
            calls = run_lesiontrack(
                subject,
                [s["lesions"] for s in subject["sessions"]],
                [s["brain"] for s in subject["sessions"]],
                args,
            )
            return {
                "status": "ok",
                **calls,
                "note": "; ".join(n for n in (calls["note"], seg_note) if n),
            }
        given: dict = {"subject": subject}
        if method == SUB_SMOULDER:
            given["masks"] = [found["instances"] for found in seg]
        elif method == SUB_SAMSEG:
            given["masks"] = samseg_masks(subject, args)
        elif method != SMOULDER:
            raise ValueError(f"unknown method {method!r}: use one of {METHODS}")

        def read(result: dict) -> dict:
            calls = load_calls(result.pop("work"), result)  # read now: the work folder goes
            calls["note"] = "; ".join(n for n in (calls.get("note", ""), seg_note) if n)
            return calls

        return run_child(method, given, args, read)
    except Skipped as exc:
        return {"status": "skipped", "note": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        import traceback

        traceback.print_exc()
        return {"status": "failed", "note": f"{type(exc).__name__}: {exc}"[:400]}


# ============================================================================ driver


def set_subjects(name: str, args: argparse.Namespace) -> tuple[list[dict], float | None]:
    """Return the subjects of set ``name`` (made and cached as needed) and its voxel (mm)."""
    data = args.cache / "data"
    data.mkdir(parents=True, exist_ok=True)
    if name.startswith("phantom-"):
        res = QUICK_PHANTOM_RES_MM if args.quick else PHANTOM_RES_MM
        count = args.subjects or PHANTOM_SUBJECTS[name][int(args.quick)]
        sessions = 3 if name == "phantom-3ses" else 2
        kw = {"sessions": sessions, "res_mm": res, "seed": args.seed}
        thick = None
        if name == "phantom-thick-flair":
            # the thick dataset's subjects are those of phantom-2ses (same seed; a subject
            # does not depend on how many there are), so its baselines are reused
            thick = cases.phantom_root(
                data, subjects=count, flair_slice_mm=thick_slice_mm(res), **kw
            )
            count_2ses = args.subjects or PHANTOM_SUBJECTS["phantom-2ses"][int(args.quick)]
            root = cases.phantom_root(data, subjects=max(count, count_2ses), **kw)
        else:
            root = cases.phantom_root(data, subjects=count, **kw)
        version = benchenv.source_fingerprint("longitudinal_cases")
        folder = data / f"{root.name}-{name}-{version}"
        subjects = [
            cases.phantom_subject(root, f"{k:02d}", name, folder / f"sub-{k:02d}", thick)
            for k in range(1, count + 1)
        ]
        return subjects, res
    if name.startswith("anatomy-"):
        res = QUICK_ANATOMY_RES_MM if args.quick else ANATOMY_RES_MM
        patient = name.removeprefix("anatomy-")
        if not (cases.CROSS_SECTIONAL / patient).is_dir():
            raise Skipped(f"{cases.CROSS_SECTIONAL / patient} is absent")
        return [cases.anatomy_subject(data, patient, name, res, args.seed, args.quick)], res
    if name.startswith("change-"):
        patient = name.removeprefix("change-")
        if not (cases.LONGITUDINAL / patient).is_dir():
            raise Skipped(f"{cases.LONGITUDINAL / patient} is absent")
        return [cases.change_subject(data, patient, name)], None
    raise ValueError(f"unknown set {name!r}: use one of {SETS}")


def measure(method: str, name: str, subjects: list[dict], args: argparse.Namespace) -> dict:
    """Return the record fields of ``method`` on a set's subjects (metrics and costs)."""
    prefixes, why = QUICK_LEFT_OUT.get(method, ((), ""))
    if args.quick and name.startswith(prefixes):
        return {"status": "skipped", "note": f"not in --quick ({why})"}
    scored, walls, rss, notes, device = [], [], [], [], None
    for subject in subjects:
        calls = method_calls(method, subject, args)
        if calls["status"] != "ok":
            return {"status": calls["status"], "note": f"{subject['name']}: {calls['note']}"}
        scored.append(score_subject(subject, calls))
        walls.append(calls["wall_s"])
        rss.append(calls["peak_rss_mb"])
        device = calls["device"]
        if calls.get("note"):
            notes.append(f"{subject['name']}: {calls['note']}")
    result = set_metrics(scored)
    result.update(
        status="ok",
        n_subjects=len(subjects),
        wall_s=float(np.mean(walls)),
        peak_rss_mb=float(max(rss)),
        device=device,
        note="; ".join(notes),
    )
    return result


def make_record(method: str, name: str, res_mm: float | None, result: dict) -> dict:
    """Return the record of one method on one set (floats to 4 digits, NaN as null)."""
    rec: dict = {key: None for key in RECORD_KEYS}
    rec.update(method=method, case=name, res_mm=res_mm, status="ok", note="")
    for key, value in result.items():
        if key in rec:
            if isinstance(value, float):
                value = None if math.isnan(value) else round(value, 4)
            rec[key] = value
    return rec


def selected_methods(args: argparse.Namespace) -> list[str]:
    if args.methods:
        return [m.strip() for m in args.methods.split(",") if m.strip()]
    return list(METHODS)


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    records = benchenv.previous_records(args.out / "longitudinal.json", args.append)
    notes: list[str] = []
    (args.cache / "work").mkdir(parents=True, exist_ok=True)
    default = list(QUICK_SETS if args.quick else SETS)
    for name in benchenv.selected_cases(args.cases, default, list(SETS)):
        if name not in SETS:
            notes.append(f"{name}: unknown set (use {', '.join(SETS)})")
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            subjects, res_mm = set_subjects(name, args)
        except Skipped as exc:
            notes.append(f"{name}: {exc}")
            continue
        print(f"  {len(subjects)} subject(s) ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for method in selected_methods(args):
            t1 = time.perf_counter()
            rec = make_record(method, name, res_mm, measure(method, name, subjects, args))
            records = [r for r in records if (r["method"], r["case"]) != (method, name)]
            records.append(rec)
            figures = " ".join(f"{key} {rec[key]}" for key in SHOWN if rec[key] is not None)
            print(
                f"  {method} {rec['status']} {figures} ({time.perf_counter() - t1:.0f} s) "
                f"{rec['note'][:200]}",
                flush=True,
            )
            write_outputs(args, records, notes)
    write_outputs(args, records, notes)
    return records


# ============================================================================ tables


def target_lines(records: list[dict]) -> list[str]:
    """Return the targets table: per group of sets and figure, each method's value (mean over
    the group's sets) and whether smoulder meets the target and beats both peers."""
    ok = [r for r in records if r["status"] == "ok"]

    def value(method: str, prefix: str, key: str) -> float | None:
        vals = [
            r[key]
            for r in ok
            if r["method"] == method and r["case"].startswith(prefix) and r[key] is not None
        ]
        return float(np.mean(vals)) if vals else None

    # the same five figures on the phantom and the real-anatomy sets, then the real change
    per_set = [
        ("sel_sensitivity", f"SEL sensitivity ≥ {TARGETS['sel_sensitivity']}",
         TARGETS["sel_sensitivity"], True),
        ("sel_fpr", f"SEL false-positive rate ≤ {TARGETS['sel_fpr']}", TARGETS["sel_fpr"], False),
        ("rate_error_pct", f"rate error ≤ {TARGETS['rate_error_pct']:g} % (≥ 5 %/yr)",
         TARGETS["rate_error_pct"], False),
        ("new_f1", f"new-lesion F1 ≥ {TARGETS['new_f1']}", TARGETS["new_f1"], True),
        ("enlarging_f1", "enlarging-lesion F1 above the peers'", None, True),
    ]  # fmt: skip
    figures = [(prefix, *figure) for prefix in ("phantom-", "anatomy-") for figure in per_set]
    figures += [
        ("change-", "change_f1", f"lesion-wise change F1 ≥ {TARGETS['change_f1']}",
         TARGETS["change_f1"], True),
        ("change-", "change_dice", "change Dice above the peers'", None, True),
    ]  # fmt: skip
    rows = []
    for prefix, key, what, goal, above in figures:
        vals = {m: value(m, prefix, key) for m in METHODS}
        if all(v is None for v in vals.values()):
            continue
        ours, met = vals[SMOULDER], ""
        if ours is not None:
            good = goal is None or (ours >= goal if above else ours <= goal)
            peers = [v for m, v in vals.items() if m != SMOULDER and v is not None]
            beats = all(ours > p if above else ours < p for p in peers)
            met = "yes" if good and beats else "no"
        cells = " | ".join(fmt(vals[m]) for m in METHODS)
        rows.append(f"| {prefix.rstrip('-')} | {what} | {cells} | {met} |")
    walls = [
        r["wall_s"]
        for r in ok
        if r["method"] == SMOULDER
        and r["res_mm"] == 1.0
        and r["case"] != "phantom-3ses"
        and r["wall_s"] is not None
    ]
    if walls:
        goal = TARGETS["wall_s"]
        rows.append(
            f"| 1 mm, 2 sessions (worst) | ≤ {goal:g} s per subject on 2 CPU cores "
            f"| {fmt(max(walls))} | | | | {'yes' if max(walls) <= goal else 'no'} |"
        )
    head = [
        "| sets | target | "
        + " | ".join(METHODS)
        + " | smoulder meets it (and beats both peers) |",
        "|---|---|" + "---|" * len(METHODS) + "---|",
    ]
    return head + rows


DESCRIPTION = (
    "Sets: `phantom-2ses`/`-3ses` — smoulder's phantom, sessions a year apart (SEL radial rates "
    "0.3–0.8 mm/yr, the phantom's range; stable, shrinking and new lesions; head repositioning "
    "and bias-field drift); `phantom-thick-flair` — a 3D baseline against a thick-slice 2D FLAIR "
    "follow-up; `anatomy-*` — real baselines (Lesjak et al., Neuroinformatics 2017, CC-BY) with "
    "synthetic one-year follow-ups: lesions expanded by known volume factors 1.1–1.6 (smooth "
    "radial deformation), new lesions of real shape copied from other patients of the study, a "
    "rigid move, intensity rescale and noise (truth exact by construction); `change-*` — real "
    "two-session patients with the expert mask of new and enlarging lesion change (Lesjak et al., "
    "Neuroinformatics 2016, CC-BY), scored on the data set's common grid. Masks fed to "
    "`smoulder-longitudinal` and `lesiontrack`: the truth instance maps (phantom, anatomy) or "
    "smoulder's own segmentation (change); the subtraction peers always subtract two "
    "cross-sectional segmentations (smoulder's, SAMSEG's). SEL scores count lesions present at "
    "the first session; rate error: median relative error of the measured expansion rate "
    "(%/yr) over expanding lesions of true rate ≥ 5 %/yr that have one (`n_rates`); new and "
    "enlarging F1 are lesion-wise, pooled over intervals and subjects (enlarging: true volume "
    "growth ≥ smoulder's `change_pct_per_year`, 9 %/yr). `lesiontrack` compares every "
    "follow-up with the baseline (its design), smoulder and the subtraction consecutive "
    "sessions. `wall_s`: the longitudinal steps per subject (segmentations excluded), "
    "`peak_rss_mb`: the process peak."
)


def write_outputs(args: argparse.Namespace, records: list[dict], notes: list[str]) -> None:
    """Write ``longitudinal.json`` and ``longitudinal.md`` (description, targets, tables)."""
    lines = [
        *benchenv.write_json_and_head(args, "longitudinal", records, versions()),
        "",
        DESCRIPTION + (" Quick run: 3-mm phantoms, 2-mm real anatomy." if args.quick else ""),
        "",
        "## Targets",
        "",
        *target_lines(records),
        "",
        "## Results",
        "",
        *benchenv.results_table(records, [k for k in RECORD_KEYS if k not in ("status", "note")]),
    ]
    lines += benchenv.note_lines(records) + benchenv.not_run_lines(records, notes)
    (args.out / "longitudinal.md").write_text("\n".join(lines) + "\n")


def versions() -> str:
    import segmentation as seg_bench

    lesiontrack = seg_bench.venv_version(LESIONTRACK_BIN.parents[1], "lesiontrack")
    samseg = seg_bench.samseg_version()
    return (
        f"{benchenv.versions(('smoulder', 'torch', 'picsl_greedy'))}, "
        f"lesiontrack {lesiontrack or '(not installed)'}, samseg {samseg or '(not installed)'}"
    )


def options(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's own option: ``--subjects``."""
    parser.add_argument("--subjects", type=int, help="subjects per phantom set")


def main(argv: list[str] | None = None) -> int:
    return benchenv.main(
        argv, "longitudinal", __doc__, HELP, "--given", worker, run_benchmark, options=options
    )


if __name__ == "__main__":
    sys.exit(main())
