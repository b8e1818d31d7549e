"""Benchmark: paramagnetic rim lesions — smoulder's rim classifier against its rule-based detector.

    python benchmarks/rims.py --out DIR [--quick] [--sessions N] [--cases 3T-1mm,...]
                              [--bundle PATH] [--cache DIR] [--device cpu|cuda] [--threads 2]
                              [--seed S] [--append]

Writes ``DIR/rims.json`` (a list of records) and ``DIR/rims.md`` (the tables, with the targets).

Sets (cases)
------------
Held-out phantom subjects (:mod:`smoulder.rims.simulate`): one session each, made with seeds
from :data:`smoulder.rims.simulate.FIRST_HELD_OUT_SEED` (10 000; training seeds stay below) plus
the set's offset plus ``--seed`` − 1, the lesion mix of training (``TRAINING_MIX``: rims complete
and partial, veins beside lesions, central veins, iso-rims) with the share of complete rims
drawn per subject (:data:`PRL_SHARE`, so that the subjects' PRL counts differ, as the count ICC
needs), and an acquisition drawn as
``draw_acquisition`` draws it (echoes, echo times, SNR), conditioned on the set's field:

``3T-1mm`` — 3 T, 1 mm (seeds 10 000 + k); lesions: the truth masks; input: the QSM.
``7T-like`` — 7 T, 0.8 mm, the whole head (seeds 11 000 + k). Truth masks, QSM.
``7T-0.5mm-slab`` — 7 T, 0.5 mm GRE voxels in an oblique slab 64 mm thick, tilted 5–25° either
    way about the left-right axis (seeds 13 000 + k), as 7 T PRL studies acquire it; the
    phantom's anatomy on its 0.8 mm grid (a whole brain at 0.5 mm costs ~8 times as much to
    simulate). Lesions outside the slab are not assessed (the pipeline's rule); those it cuts
    are scored. Truth masks, QSM.
``phase-only`` — field and voxel as drawn (seeds 12 000 + k); the homodyne-filtered phase of the
    last echo instead of the QSM, for both methods. Truth masks.
``end-to-end`` — the ``3T-1mm`` sessions, the lesions found by smoulder's own segmentation
    (``smoulder.segmentation.inference.segment`` on the FLAIR and T1w, its lesion instances)
    instead of the truth masks. Each predicted lesion takes the label of the truth lesion it
    overlaps most on the GRE grid (none: a false-positive lesion, a non-rim); truth lesions the
    segmentation missed are not scored per lesion, but count in the subject's true PRL count.

Label: 1 for a complete rim (truth ``rim == "yes"``), 0 for partial rims, no rim and every mimic.

Methods
-------
``smoulder-prl`` — the rim bundle (``--bundle``; default the shipped ``smoulder_prl``:
    ``smoulder.rims.network.load_bundle``): each lesion's 4-channel patch in the GRE grid
    (``GreLesions.patch``, as the pipeline's rim step) and, for a bundle that fuses them, its
    rule-based measures, then ``predict`` (8-flip TTA, calibrated probability); calls at
    the bundle's three operating points. Skipped, with a note, when there is no bundle.
``smoulder-rules`` — the rule-based detector (``smoulder.rims.rules.measure_rim``) on the same
    lesions and arrays: ``rule_score`` (rim coverage) for the AUCs, ``rule_call`` (consensus and
    coverage) for sensitivity and specificity and the PRL count; one operating point, no
    probability (no ECE).

Measured
--------
Per lesion: ``roc_auc`` (with its DeLong 95 % interval ``roc_auc_low``, ``roc_auc_high``),
``pr_auc`` (average precision), ``ece`` (10 equal-width bins; ``ece_low``, ``ece_high``: the
2.5th and 97.5th percentiles of 1 000 bootstrap resamples of the lesions, seeded: on a few
hundred lesions the ECE's own sampling spread is several hundredths; a resample's ECE is biased
upwards, so the interval can lie above the measured value), ``sensitivity_<point>`` and
``specificity_<point>`` at ``balanced``, ``high_specificity``, ``high_sensitivity`` (plain
``sensitivity``, ``specificity``: balanced; the rule-based detector: its call), from
:mod:`smoulder.rims.calibration`. Per subject: ``count_icc`` — ICC(2,1) (two-way random effects,
absolute agreement, single measure; Shrout & Fleiss 1979) of the PRL count called against the
true one; ``true_count_sd`` — the SD of the true counts over the subjects (the ICC is only
meaningful where they differ); ``count_mae`` — the mean absolute error of the called count;
``prl_ge1_accuracy`` and ``prl_ge4_accuracy`` — the share of subjects whose "≥ 1 PRL" and "≥ 4
PRL" calls match the truth. ``wall_s`` — seconds per 100 lesions in a child process pinned to
``--threads`` CPUs: patch extraction, the rule-based measures a fusing bundle reads, and
prediction (classifier; bundle loading and one warm-up pass not included) or ``measure_rim``
(rules); reading the cached session is not included.

``--quick`` (< 10 min on 2 cores): 2 sessions per set, every set at 2 mm. Full: 10 sessions
per set. The phantom sessions (dataset, QSM, phase, truth on the GRE grid) and the
segmentations are cached under ``--cache``, named by the source of the code that made them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import benchenv
import numpy as np
from benchenv import Skipped, cuda_or_skip, fmt

if TYPE_CHECKING:
    from smoulder.rims.simulate import Acquisition, PhantomSession

SETS = ("3T-1mm", "7T-like", "7T-0.5mm-slab", "phase-only", "end-to-end")
METHODS = ("smoulder-prl", "smoulder-rules")
CLASSIFIER, RULES = METHODS
POINTS = ("balanced", "high_specificity", "high_sensitivity")
FULL_SESSIONS, QUICK_SESSIONS = 10, 2
QUICK_RES_MM = 2.0
#: What made a cached session: the phantom, the QSM reconstruction, the session loader.
SESSION_MODULES = ("smoulder.phantom", "smoulder.qsm", "smoulder.rims.simulate")
#: Range of the share of a held-out subject's lesions given a complete rim (drawn per seed).
PRL_SHARE = (0.0, 0.5)
#: ... and a cached end-to-end segmentation.
SEGMENTATION_MODULES = ("smoulder.segmentation",)

#: Targets (issue 22), on the held-out phantom sets.
TARGETS = {
    "roc_auc": 0.95,
    "pr_auc": 0.85,
    "ece": 0.05,
    "count_icc": 0.9,
    "end_to_end_auc_gap": 0.03,
    "wall_s_per_100": 5.0,
}

HELP = {
    "quick": f"{QUICK_SESSIONS} sessions per set, at {QUICK_RES_MM:g} mm",
    "methods": f"comma-separated, of {', '.join(METHODS)}",
    "cases": f"comma-separated sets or globs, of {', '.join(SETS)}",
    "device": "the classifier's device (the rules run on the CPU)",
    "seed": "sessions of a set use seeds 10000 + offset + SEED - 1 + k",
    "keep": "keep the children's work folders",
}
#: The per-lesion table's columns (the records' first keys).
LESION_COLS = (
    "method",
    "case",
    "device",
    "input",
    "res_mm",
    "n_subjects",
    "n_lesions",
    "n_rims",
    "roc_auc",
    "roc_auc_low",
    "roc_auc_high",
    "pr_auc",
    "ece",
    "ece_low",
    "ece_high",
    "sensitivity",
    "specificity",
)
#: ... the operating points' columns.
POINT_COLS = tuple(f"{m}_{p}" for p in POINTS for m in ("sensitivity", "specificity"))
#: ... and the per-subject columns.
SUBJECT_COLS = (
    "count_icc",
    "true_count_sd",
    "count_mae",
    "prl_ge1_accuracy",
    "prl_ge4_accuracy",
    "wall_s",
)
#: What the progress lines show.
SHOWN = ("n_lesions", "n_rims", "roc_auc", "pr_auc", "ece", "sensitivity", "specificity", "wall_s")
RECORD_KEYS = (*LESION_COLS, *POINT_COLS, *SUBJECT_COLS, "status", "note")


@dataclass(frozen=True)
class SetSpec:
    """How a set's sessions are drawn and which lesions and input it scores."""

    seed_offset: int
    b0_tesla: float | None  # None: as drawn
    res_mm: float | None  # None: as drawn
    input_kind: str  # "qsm" or "phase"
    segmented: bool = False  # lesions from smoulder's segmentation, not the truth
    gre_voxel_mm: float | None = None  # None: the phantom grid's
    slab_mm: float | None = None  # an oblique slab of this thickness (tilt drawn per seed)


SPECS = {
    "3T-1mm": SetSpec(0, 3.0, 1.0, "qsm"),
    "7T-like": SetSpec(1000, 7.0, 0.8, "qsm"),
    "7T-0.5mm-slab": SetSpec(3000, 7.0, 0.8, "qsm", gre_voxel_mm=0.5, slab_mm=64.0),
    "phase-only": SetSpec(2000, None, None, "phase"),
    "end-to-end": SetSpec(0, 3.0, 1.0, "qsm", segmented=True),
}


# ============================================================================ metrics


def icc_agreement(ratings: np.ndarray) -> float:
    """Return ICC(2,1) of ``ratings`` (subjects × raters): two-way random, absolute agreement.

    ``(MSR − MSE) / (MSR + (k − 1) MSE + k (MSC − MSE) / n)`` (Shrout & Fleiss 1979); NaN with
    fewer than two subjects or when nothing varies.

    Examples:
        >>> y = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9]]
        >>> y += [[6, 2, 4, 7]]  # Shrout & Fleiss's example: ICC(2,1) = 0.29
        >>> round(icc_agreement(np.array(y)), 2)
        0.29
        >>> icc_agreement(np.array([[1, 1], [3, 3], [0, 0]]))
        1.0
        >>> icc_agreement(np.array([[2, 2], [2, 2]]))
        nan
    """
    y = np.asarray(ratings, dtype=np.float64)
    n, k = y.shape
    if n < 2 or k < 2:
        return float("nan")
    grand = y.mean()
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((y - grand) ** 2).sum() - ss_rows - ss_cols
    ms_rows, ms_cols = ss_rows / (n - 1), ss_cols / (k - 1)
    ms_error = ss_error / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    if denominator <= 0:
        return float("nan")
    return float(round((ms_rows - ms_error) / denominator, 12))


def lesion_metrics(labels: np.ndarray, score: np.ndarray, *, probability: bool) -> dict:
    """Return the AUCs of ``score`` (ROC with its DeLong 95 % interval, PR) and, when it is a
    probability, its expected calibration error (else None)."""
    from smoulder.rims.calibration import (
        auc_confidence_interval,
        expected_calibration_error,
        pr_auc,
        roc_auc,
    )

    low, high = auc_confidence_interval(score, labels)
    return {
        "roc_auc": roc_auc(score, labels),
        "roc_auc_low": low,
        "roc_auc_high": high,
        "pr_auc": pr_auc(score, labels),
        "ece": expected_calibration_error(score, labels) if probability else None,
        **(ece_interval(score, labels) if probability else {}),
    }


def ece_interval(prob: np.ndarray, labels: np.ndarray, n: int = 1000, seed: int = 0) -> dict:
    """Return ``ece_low``/``ece_high``: the 95 % percentile interval of the ECE over ``n``
    bootstrap resamples of the lesions (seeded)."""
    from smoulder.rims.calibration import expected_calibration_error

    p, y = np.asarray(prob, np.float64), np.asarray(labels)
    if p.size < 2:
        return {"ece_low": None, "ece_high": None}
    rng = np.random.default_rng(seed)
    values = [expected_calibration_error(p[i], y[i]) for i in rng.integers(0, p.size, (n, p.size))]
    low, high = np.percentile(values, [2.5, 97.5])
    return {"ece_low": float(low), "ece_high": float(high)}


def call_metrics(labels: np.ndarray, called: np.ndarray, suffix: str = "") -> dict:
    """Return ``sensitivity<suffix>`` and ``specificity<suffix>`` of the lesions ``called``."""
    from smoulder.rims.calibration import sensitivity_specificity

    sens, spec = sensitivity_specificity(called.astype(np.float64), labels, 0.5)
    return {f"sensitivity{suffix}": sens, f"specificity{suffix}": spec}


def subject_metrics(subjects: np.ndarray, called: np.ndarray, truth_prl: dict[str, int]) -> dict:
    """Return the per-subject metrics: ICC(2,1) of the PRL counts, accuracy of the ≥ 1 and ≥ 4
    PRL patient calls (``called``: the lesions called rims; ``truth_prl``: true counts)."""
    names = sorted(truth_prl)
    true = np.array([truth_prl[s] for s in names])
    pred = np.array([int(called[subjects == s].sum()) for s in names])
    return {
        "count_icc": icc_agreement(np.c_[true, pred]),
        # the ICC needs true counts that differ between subjects: say how much they do
        "true_count_sd": float(np.std(true, ddof=1)) if true.size > 1 else None,
        "count_mae": float(np.mean(np.abs(pred - true))),
        "prl_ge1_accuracy": float(np.mean((true >= 1) == (pred >= 1))),
        "prl_ge4_accuracy": float(np.mean((true >= 4) == (pred >= 4))),
    }


def score(method: str, result: dict) -> dict:
    """Return a child's result with the metrics computed from its per-lesion rows.

    The classifier calls a rim where its probability reaches an operating point's threshold
    (plain ``sensitivity``, ``specificity`` and the counts: balanced); the rules by their call.
    """
    rows, truth_prl = result.pop("lesions"), result.pop("truth_prl")
    points = result.pop("operating_points", None)
    labels = np.array([r["label"] for r in rows], dtype=np.int64)
    subjects = np.array([r["subject"] for r in rows])
    value = np.array([r["score"] for r in rows], dtype=np.float64)
    out = {**result, "n_subjects": len(truth_prl), "n_lesions": len(rows)}
    out["n_rims"] = int(labels.sum())
    if method == CLASSIFIER:
        called = value >= points["balanced"]
        for point in POINTS:
            out.update(call_metrics(labels, value >= points[point], f"_{point}"))
    else:
        called = np.array([r["call"] for r in rows], dtype=bool)
    if rows:
        out.update(lesion_metrics(labels, value, probability=method == CLASSIFIER))
        out.update(call_metrics(labels, called))
    out.update(subject_metrics(subjects, called, truth_prl))
    return out


# ============================================================================ sessions


def held_out_acquisition(seed: int, spec: SetSpec, quick: bool) -> Acquisition:
    """Return the acquisition of the session of ``seed``: drawn as in training, redrawn from
    the same stream until its field is the set's, then the set's voxel (2 mm in quick) and,
    for a slab set, its GRE voxel (none in quick), slab and a tilt of 5–25° either way."""
    from smoulder.rims.simulate import draw_acquisition, draw_tilt

    rng = np.random.default_rng([seed, 1])
    acq = draw_acquisition(rng)
    while spec.b0_tesla is not None and acq.b0_tesla != spec.b0_tesla:
        acq = draw_acquisition(rng)
    res_mm = QUICK_RES_MM if quick else spec.res_mm
    if res_mm is not None:
        acq = replace(acq, resolution_mm=res_mm)
    if spec.slab_mm is not None:
        tilt = draw_tilt(np.random.default_rng([seed, 3]))
        gre = None if quick else spec.gre_voxel_mm
        acq = replace(acq, gre_voxel_mm=gre, tilt_deg=round(tilt, 1), slab_mm=spec.slab_mm)
    return acq


def held_out_prl_share(seed: int) -> float:
    """Return the share of complete rims among the lesions of the held-out subject ``seed``.

    Examples:
        >>> all(PRL_SHARE[0] <= held_out_prl_share(s) <= PRL_SHARE[1] for s in range(10000, 10050))
        True
    """
    return float(np.random.default_rng([seed, 2]).uniform(*PRL_SHARE))


def session_folder(cache: Path, seed: int, spec: SetSpec, quick: bool) -> Path:
    """Return the cached session of ``seed`` (generated, reconstructed and saved if absent):
    its folder holds the phantom (``phantom/``) and ``session.npz`` (:func:`save_session`)."""
    from smoulder.phantom.dataset import generate_dataset
    from smoulder.rims.simulate import load_session, session_config

    acq = held_out_acquisition(seed, spec, quick)
    share = held_out_prl_share(seed)
    version = benchenv.source_fingerprint(*SESSION_MODULES)
    geometry = ""
    if acq.slab_mm is not None:
        gre = acq.gre_voxel_mm or acq.resolution_mm
        geometry = f"-gre{gre:g}mm-slab{acq.slab_mm:g}-tilt{acq.tilt_deg:g}"
    grid = f"{acq.b0_tesla:g}T-{acq.resolution_mm:g}mm{geometry}"
    name = f"seed-{seed}-{grid}-prl{share:.3f}-{version}"
    folder = cache / name
    if not (folder / "session.npz").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"  generating {folder.name} ({len(acq.echo_times_ms)} echoes) ...", flush=True)
        config = replace(session_config(seed, acq), prl_fraction=share)
        root = generate_dataset(folder / "phantom", config)
        save_session(load_session(root), folder / "session.npz")
    return folder


def save_session(session: PhantomSession, path: Path) -> None:
    """Write a phantom session's arrays, truth labels and FLAIR path to ``path`` (npz)."""
    from smoulder.images import atomic_path

    with atomic_path(path) as tmp:  # keeps the .npz suffix: numpy adds none
        np.savez_compressed(
            tmp,
            affine=session.affine,
            magnitude=session.magnitude.astype(np.float32),
            qsm_mask=session.qsm_mask,
            wm=session.wm.astype(np.float32),
            labels=session.labels,
            chi_ppm=session.chi_ppm.astype(np.float32),
            phase_rad=session.phase_rad.astype(np.float32),
            rim_ids=np.array(list(session.rims), dtype=np.int64),
            rim_labels=np.array(list(session.rims.values()), dtype=np.int64),
            flair=str(session.flair.get_filename()),
        )


def read_session(path: Path, override: Path | None = None) -> PhantomSession:
    """Return the session saved by :func:`save_session`, its lesions and labels replaced by
    those of ``override`` (:func:`segmented_lesions`) when given."""
    import nibabel as nib

    from smoulder.registration.transforms import AffineTransform
    from smoulder.rims.simulate import PhantomSession

    data = np.load(path)
    labels, ids, rims = data["labels"], data["rim_ids"], data["rim_labels"]
    if override is not None:
        other = np.load(override)
        labels, ids, rims = other["labels"], other["rim_ids"], other["rim_labels"]
    return PhantomSession(
        affine=data["affine"],
        magnitude=data["magnitude"],
        qsm_mask=data["qsm_mask"],
        wm=data["wm"],
        labels=labels,
        flair=nib.load(str(data["flair"])),
        flair_to_gre=AffineTransform.identity(),
        chi_ppm=data["chi_ppm"],
        phase_rad=data["phase_rad"],
        rims={int(i): int(r) for i, r in zip(ids, rims, strict=True)},
    )


def segmented_lesions(folder: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """Return the cached end-to-end lesions of a session (segmented if absent) and a summary.

    ``segmentation-<version>.npz`` holds the segmentation's lesion instances on the GRE grid
    (``labels``), each one's label (``rim_ids``, ``rim_labels``: the rim label of the truth
    lesion it overlaps most there, 0 for none), how many overlap no truth lesion
    (``false_positive``), how many truth lesions no prediction overlaps (``missed``), and the
    segmentation's ``wall_s``.
    """
    version = benchenv.source_fingerprint(*SEGMENTATION_MODULES)
    path = folder / f"segmentation-{version}.npz"
    if not path.is_file():
        import nibabel as nib

        from smoulder.devices import torch_threads
        from smoulder.images import atomic_path
        from smoulder.registration.transforms import AffineTransform
        from smoulder.rims.patches import lesion_labels_in_gre
        from smoulder.segmentation.inference import segment

        truth = read_session(folder / "session.npz")
        anat = folder / "phantom" / "sub-01" / "ses-01" / "anat"
        t1 = nib.load(anat / "sub-01_ses-01_T1w.nii.gz")
        start = time.perf_counter()
        with torch_threads(args.threads):
            result = segment(truth.flair, t1, device=cuda_or_skip(args.device))
        wall = time.perf_counter() - start
        grid = nib.Nifti1Image(np.zeros(truth.labels.shape, np.uint8), truth.affine)
        labels = lesion_labels_in_gre(result.instances, grid, AffineTransform.identity())
        ids, best = match_lesions(labels, truth.labels)
        true_ids = set(truth.lesions())
        hit = set(np.unique(truth.labels[(labels > 0) & (truth.labels > 0)]).tolist())
        with atomic_path(path) as tmp:
            np.savez_compressed(
                tmp,
                labels=labels,
                rim_ids=ids,
                rim_labels=np.array([truth.rims.get(int(t), 0) for t in best], np.int64),
                false_positive=int((best == 0).sum()),
                missed=len(true_ids - hit),
                wall_s=wall,
            )
    data = np.load(path)
    summary = (
        f"{data['rim_ids'].size} lesions ({int(data['false_positive'])} false positive), "
        f"{int(data['missed'])} true missed, segmentation {float(data['wall_s']):.0f} s"
    )
    return path, summary


def match_lesions(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the predicted lesion ids and the truth lesion each overlaps most (0: none).

    Examples:
        >>> pred = np.array([0, 1, 1, 1, 2, 3])
        >>> true = np.array([0, 5, 5, 6, 0, 6])
        >>> match_lesions(pred, true)
        (array([1, 2, 3]), array([5, 0, 6]))
    """
    ids = np.unique(predicted[predicted > 0]).astype(np.int64)
    best = []
    for lesion in ids:
        hits = truth[(predicted == lesion) & (truth > 0)].astype(np.int64)
        best.append(int(np.bincount(hits).argmax()) if hits.size else 0)
    return ids, np.array(best, dtype=np.int64)


# ============================================================================ the methods


def measure_set(method: str, given: dict, device: str, threads: int) -> dict:
    """Child process: return one method's per-lesion rows, the true PRL count per subject and
    ``wall_s`` per 100 lesions (:func:`classify` or :func:`rule_based`) on a set's sessions."""
    from smoulder.devices import torch_threads

    kind = given["input"]
    sessions = {}
    truth_prl = {}
    for item in given["sessions"]:
        truth = read_session(Path(item["session"]))
        truth_prl[item["subject"]] = sum(truth.rims[i] for i in truth.lesions())
        override = Path(item["lesions"]) if item["lesions"] else None
        session = read_session(Path(item["session"]), override)
        sessions[item["subject"]] = replace(session, b0_tesla=float(item["b0_tesla"]))
    with torch_threads(threads):
        if method == CLASSIFIER:
            result = classify(sessions, kind, given["bundle"], cuda_or_skip(device), threads)
        elif method == RULES:
            result = rule_based(sessions, kind, threads)
        else:
            raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    n = max(len(result["lesions"]), 1)
    result["wall_s"] = round(result.pop("seconds") * 100.0 / n, 3)
    return {**result, "truth_prl": truth_prl}


def classify(
    sessions: dict[str, PhantomSession],
    kind: str,
    bundle_path: str | None,
    device: str,
    threads: int,
) -> dict:
    """Return the classifier's calibrated probability per lesion and the seconds it took
    (patches and prediction; the bundle's loading and a warm-up pass not included)."""
    from smoulder.errors import InputError
    from smoulder.rims.network import load_bundle, predict
    from smoulder.rims.patches import CHANNELS, PATCH_SHAPE
    from smoulder.rims.rules import FEATURES

    try:
        bundle = load_bundle(bundle_path, device=device)
    except InputError as exc:
        raise Skipped(
            f"no rim bundle ({exc}): train one (`smoulder train rims RUN`) or pass --bundle"
        ) from exc
    fused = bundle.fusion is not None  # then the rule-based measures are part of its input
    warm = np.zeros((1, len(CHANNELS), *PATCH_SHAPE), np.float32)
    predict(bundle, warm, device, features=np.zeros((1, len(FEATURES)), np.float32))
    start = time.perf_counter()
    keys, patches, features, fields = [], [], [], []
    for subject, session in sessions.items():
        grid, data = session.grid, session.susceptibility(kind)  # as the pipeline's step
        for lesion in session.lesions():
            keys.append((subject, lesion, session.rims[lesion]))
            fields.append(session.b0_tesla)  # the sidecar's MagneticFieldStrength
            if fused:  # the patch and the measures, the lesion's regions computed once
                patch, measures = grid.assess(lesion, data, kind)
                features.append(measures.features())
            else:
                patch = grid.patch(lesion, data, kind)
            patches.append(patch)
    patched = time.perf_counter()
    # predict returns host arrays: a GPU has finished when it returns
    measures = np.stack(features) if features else None
    prob = (
        predict(
            bundle, np.stack(patches), device, features=measures, input_kind=kind, b0_tesla=fields
        )
        if patches
        else np.zeros(0)
    )
    seconds = time.perf_counter() - start
    rows = [
        {"subject": s, "lesion": int(i), "label": int(y), "score": float(p)}
        for (s, i, y), p in zip(keys, prob, strict=True)
    ]
    label = f"cpu ({threads} threads)"
    if device == "cuda":
        import torch

        label = f"cuda ({torch.cuda.get_device_name()})"
    share = (patched - start) / seconds if seconds > 0 else float("nan")
    what = "patches and rule-based measures" if fused else "patches"
    return {
        "lesions": rows,
        "seconds": seconds,
        "operating_points": bundle.operating_points,
        "device": label,
        "note": f"bundle {bundle.path.name} {bundle.version}; {what} {share:.0%} of wall_s",
    }


def rule_based(sessions: dict[str, PhantomSession], kind: str, threads: int) -> dict:
    """Return the rule-based score (rim coverage) and call per lesion and the seconds taken."""
    start = time.perf_counter()
    rows = []
    for subject, session in sessions.items():
        grid, data = session.grid, session.susceptibility(kind)
        for lesion in session.lesions():
            m = grid.measure(lesion, data, kind)
            rows.append(
                {
                    "subject": subject,
                    "lesion": lesion,
                    "label": session.rims[lesion],
                    "score": m.rule_score,
                    "call": bool(m.rule_call),
                }
            )
    return {
        "lesions": rows,
        "seconds": time.perf_counter() - start,
        "device": f"cpu ({threads} threads)",
    }


def worker(method: str, set_json: Path, work: Path, device: str, threads: int) -> int:
    """Child process entry: measure one method on one set, ``result.json`` in ``work``."""
    given = json.loads(set_json.read_text())
    return benchenv.worker_main(work, lambda: measure_set(method, given, device, threads))


def run_method(method: str, given: dict, args: argparse.Namespace) -> dict:
    """Run ``method`` on a set in a fresh child pinned to ``--threads`` CPUs; return its record
    fields (metrics and cost), or its failure."""
    work = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=args.cache / "work"))
    (work / "set.json").write_text(json.dumps(given))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    cmd += ["--set-json", str(work / "set.json"), "--work", str(work)]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, benchenv.cpus(args.threads))), *cmd]
    env = benchenv.thread_env(args.threads)
    return benchenv.child_result(cmd, work, env, args, lambda result: score(method, result))


# ============================================================================ driver


def prepare_set(name: str, args: argparse.Namespace) -> tuple[dict, str]:
    """Return what a set's children read (sessions, input, bundle), generating and caching its
    sessions (and segmentations), and a note on how its lesions were found."""
    from smoulder.rims.simulate import FIRST_HELD_OUT_SEED

    spec = SPECS[name]
    count = args.sessions or (QUICK_SESSIONS if args.quick else FULL_SESSIONS)
    first = FIRST_HELD_OUT_SEED + spec.seed_offset + args.seed - 1
    items, notes = [], []
    for seed in range(first, first + count):
        folder = session_folder(args.cache / "sessions", seed, spec, args.quick)
        lesions = None
        if spec.segmented:
            path, summary = segmented_lesions(folder, args)
            lesions = str(path)
            notes.append(f"seed {seed}: {summary}")
        items.append(
            {
                "subject": f"seed{seed}",
                "session": str(folder / "session.npz"),
                "lesions": lesions,
                "b0_tesla": held_out_acquisition(seed, spec, args.quick).b0_tesla,
            }
        )
    bundle = str(args.bundle) if args.bundle else None
    given = {"set": name, "input": spec.input_kind, "sessions": items, "bundle": bundle}
    return given, "; ".join(notes)


def make_record(method: str, name: str, result: dict, args: argparse.Namespace, note: str) -> dict:
    """Return the record of one method on one set (floats to 4 digits, NaN as null)."""
    spec = SPECS[name]
    rec: dict = {key: None for key in RECORD_KEYS}
    rec.update(method=method, case=name, status="ok", note="", input=spec.input_kind)
    rec["res_mm"] = QUICK_RES_MM if args.quick else spec.gre_voxel_mm or spec.res_mm
    for key, value in result.items():
        if key in rec:
            rec[key] = None if isinstance(value, float) and math.isnan(value) else value
            if isinstance(rec[key], float):
                rec[key] = round(rec[key], 4)
    rec["note"] = "; ".join(n for n in (rec["note"], note) if n)
    return rec


def selected_methods(args: argparse.Namespace) -> list[str]:
    if args.methods:
        return [m.strip() for m in args.methods.split(",") if m.strip()]
    return list(METHODS)


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    records = benchenv.previous_records(args.out / "rims.json", args.append)
    notes: list[str] = []
    (args.cache / "work").mkdir(parents=True, exist_ok=True)
    for name in benchenv.selected_cases(args.cases, list(SETS), list(SETS)):
        if name not in SPECS:
            notes.append(f"{name}: unknown set (use {', '.join(SETS)})")
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        given, note = prepare_set(name, args)
        print(f"  {len(given['sessions'])} sessions ready in {time.perf_counter() - t0:.0f} s")
        for method in selected_methods(args):
            t1 = time.perf_counter()
            rec = make_record(method, name, run_method(method, given, args), args, note)
            records = [r for r in records if (r["method"], r["case"]) != (method, name)]
            records.append(rec)
            figures = " ".join(f"{key} {rec[key]}" for key in SHOWN)
            took = time.perf_counter() - t1
            print(
                f"  {method} {rec['status']} {figures} ({took:.0f} s) {rec['note'][:160]}",
                flush=True,
            )
            write_outputs(args, records, notes)
    write_outputs(args, records, notes)
    return records


# ============================================================================ tables


def target_lines(records: list[dict]) -> list[str]:
    """Return the targets table: per set and figure, the classifier's and the rules' values,
    and whether the classifier meets the target and beats the rules."""
    ok = {(r["method"], r["case"]): r for r in records if r["status"] == "ok"}

    def value(method: str, case: str, key: str) -> float | None:
        return ok.get((method, case), {}).get(key)

    rows = []
    figures = (
        ("roc_auc", f"ROC-AUC ≥ {TARGETS['roc_auc']}", TARGETS["roc_auc"], True),
        ("pr_auc", f"PR-AUC ≥ {TARGETS['pr_auc']}", TARGETS["pr_auc"], True),
        ("ece", f"ECE ≤ {TARGETS['ece']}", TARGETS["ece"], False),
        ("count_icc", f"PRL count ICC(2,1) ≥ {TARGETS['count_icc']}", TARGETS["count_icc"], True),
        ("sensitivity", "sensitivity (balanced) above the rules'", None, True),
        ("specificity", "specificity (balanced) above the rules'", None, True),
        ("prl_ge1_accuracy", "≥ 1 PRL patient call accuracy above the rules'", None, True),
        ("prl_ge4_accuracy", "≥ 4 PRL patient call accuracy above the rules'", None, True),
    )
    for case in SETS:
        for key, what, goal, above in figures:
            ours, rules = value(CLASSIFIER, case, key), value(RULES, case, key)
            if ours is None and rules is None:
                continue
            met = ""
            if ours is not None:
                good = goal is None or (ours >= goal if above else ours <= goal)
                beats = rules is None or (ours > rules if above else ours < rules)
                met = "yes" if good and beats else "no"
            rows.append(f"| {case} | {what} | {fmt(ours)} | {fmt(rules)} | {met} |")
    truth, e2e = value(CLASSIFIER, "3T-1mm", "roc_auc"), value(CLASSIFIER, "end-to-end", "roc_auc")
    if truth is not None and e2e is not None:
        gap = TARGETS["end_to_end_auc_gap"]
        met = "yes" if truth - e2e <= gap else "no"
        rows.append(
            f"| end-to-end | ROC-AUC within {gap} of 3T-1mm's (truth masks, same sessions) "
            f"| {fmt(e2e)} vs {fmt(truth)} | {fmt(value(RULES, 'end-to-end', 'roc_auc'))} vs "
            f"{fmt(value(RULES, '3T-1mm', 'roc_auc'))} | {met} |"
        )
    goal = TARGETS["wall_s_per_100"]
    walls = [r["wall_s"] for (m, _), r in ok.items() if m == CLASSIFIER and r["wall_s"] is not None]
    rules_walls = [
        r["wall_s"] for (m, _), r in ok.items() if m == RULES and r["wall_s"] is not None
    ]
    if walls or rules_walls:
        worst = max(walls, default=None)
        met = "" if worst is None else "yes" if worst <= goal else "no"
        rows.append(
            f"| all (worst set) | ≤ {goal:g} s per 100 lesions on 2 CPU cores (patches included) "
            f"| {fmt(worst)} | {fmt(max(rules_walls, default=None))} | {met} |"
        )
    head = [
        f"| set | target | {CLASSIFIER} | {RULES} | {CLASSIFIER} meets it (and beats the rules) |",
        "|---|---|---|---|---|",
    ]
    return head + rows


#: The Markdown report's description of the run (beside the tables).
DESCRIPTION = (
    "Held-out phantom subjects (seeds ≥ 10 000; training uses seeds below), one session each, "
    "the training lesion mix (complete and partial rims, veins beside lesions, central veins, "
    "iso-rims) with the share of complete rims drawn per subject (0–50 %) and acquisitions "
    "drawn as in training (1–5 echoes, SNR 15–50), conditioned on "
    "the set's field. `3T-1mm`: 3 T, 1 mm, QSM. `7T-like`: 7 T at 0.8 mm, QSM, the whole head. "
    "`7T-0.5mm-slab`: 7 T, 0.5 mm GRE voxels in a 64-mm oblique slab tilted 5–25° (anatomy "
    "on the phantom's 0.8 mm grid), QSM; lesions outside the slab not assessed. `phase-only`: "
    "field and voxel as drawn, the homodyne-filtered phase instead of the QSM. `end-to-end`: "
    "the `3T-1mm` sessions with the lesions of smoulder's own segmentation (FLAIR + T1w), each "
    "labelled by the truth lesion it overlaps most (none: a non-rim); missed truth lesions "
    "count in the true PRL counts only. A rim is a complete one (truth `rim == yes`); partial "
    "rims and mimics are negatives. `smoulder-prl`: the rim bundle (8-flip TTA, calibrated "
    "probability, the bundle's operating points; plain sensitivity/specificity and the PRL "
    "count at `balanced`). `smoulder-rules`: the rule-based detector on the same lesions "
    "and arrays, its coverage for the AUCs, its call (consensus and coverage) for "
    "sensitivity, specificity and counts; no probability, so no ECE and no other operating "
    "point. `roc_auc_low`/`_high`: DeLong 95 % interval. `count_icc`: ICC(2,1), two-way "
    "random effects, absolute agreement, of the called against the true PRL count per "
    "subject (null below 2 subjects or when no count varies); it is only meaningful where the "
    "true counts differ between subjects (`true_count_sd`); `count_mae`: the mean absolute "
    "error of the called count. `prl_ge1/ge4_accuracy`: share "
    "of subjects whose ≥ 1 / ≥ 4 PRL call matches the truth. `wall_s`: seconds per 100 "
    "lesions in a child pinned to the threads given, patch extraction and prediction "
    "(classifier; bundle loading and one warm-up pass excluded) or the rule-based measures. "
    "For orientation on real data (published, not comparable): ALPaCA lesion-level PRL AUROC "
    "0.91; raters agree with κ ≈ 0.69. There is no open PRL-rated patient data."
)


def write_outputs(args: argparse.Namespace, records: list[dict], notes: list[str]) -> None:
    """Write ``rims.json`` and ``rims.md`` (description, targets, tables, notes)."""
    packages = ("smoulder", "torch", "monai", "numpy", "scipy")
    lines = [
        *benchenv.write_json_and_head(args, "rims", records, benchenv.versions(packages)),
        "",
        DESCRIPTION
        + (
            f" Quick run: every set at {QUICK_RES_MM:g} mm, not its named voxel."
            if args.quick
            else ""
        ),
        "",
        "## Targets",
        "",
        *target_lines(records),
        "",
        "## Per lesion",
        "",
        *benchenv.results_table(records, list(LESION_COLS)),
        "",
        "## Operating points (classifier)",
        "",
        *benchenv.results_table(
            [r for r in records if r["method"] == CLASSIFIER], ["method", "case", *POINT_COLS]
        ),
        "",
        "## Per subject and time",
        "",
        *benchenv.results_table(records, ["method", "case", *SUBJECT_COLS]),
    ]
    lines += benchenv.note_lines(records) + benchenv.not_run_lines(records, notes)
    (args.out / "rims.md").write_text("\n".join(lines) + "\n")


def options(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's own options: ``--sessions``, ``--bundle``."""
    parser.add_argument(
        "--sessions",
        type=int,
        help=f"sessions per set (default {FULL_SESSIONS}; {QUICK_SESSIONS} with --quick)",
    )
    parser.add_argument(
        "--bundle", type=Path, help="rim bundle folder (default: the shipped smoulder_prl)"
    )


def main(argv: list[str] | None = None) -> int:
    return benchenv.main(
        argv, "rims", __doc__, HELP, "--set-json", worker, run_benchmark, options=options
    )


if __name__ == "__main__":
    sys.exit(main())
