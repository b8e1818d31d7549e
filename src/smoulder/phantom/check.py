"""Compare what the pipeline measured on a phantom with the phantom's truth.

``smoulder demo`` ends with this table so that a new user sees at once whether the numbers are
right, and where they are not. Each row is one marker of one session or interval, measured
(from the pipeline's derivatives) beside the truth (from the phantom's
``derivatives/truth``):

* per session: the number of lesions (against every true lesion, and against the true lesions
  large enough for the pipeline to count on that session's grid), and the lesion Dice (the
  pipeline's ``desc-lesions_dseg`` moved onto the truth's grid by nearest neighbour);
* per session with rim calls: paramagnetic rim lesions (calls ``yes`` against the true
  lesions of that session with a complete rim, ``rim`` = ``yes``; partial rims are not counted);
* per interval, where the subject tables exist: new lesions and slowly expanding lesions
  (``sub-X_desc-activity_longitudinal.tsv`` against the truth's ``first_session`` and ``sel``),
  PBVC, grey-matter change and cord-area change (``sub-X_desc-atrophy_stats.tsv`` against
  ``sub-X_desc-atrophy_truth.tsv``).

The truth counts every lesion the phantom drew, even one smaller than a voxel; the pipeline
cannot see those, which is part of what the comparison shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from smoulder.grids import resample_to_grid
from smoulder.images import read_tsv


@dataclass(frozen=True)
class Comparison:
    """One marker of one session or interval: measured beside the truth."""

    subject: str
    when: str  # "ses-01", or "ses-01→ses-02" for an interval
    marker: str
    measured: float | None
    truth: float | None
    unit: str = ""

    @property
    def error(self) -> float | None:
        """Measured minus truth (``None`` where either is missing)."""
        if self.measured is None or self.truth is None:
            return None
        return self.measured - self.truth


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "", "n/a") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def truth_lesion_counts(truth_subject: Path, min_ul: float = 0.0) -> dict[str, int]:
    """Return, per session label (``ses-01``), how many lesions the phantom drew there.

    Only lesions of at least ``min_ul`` µl count (0: every lesion present).
    """
    counts: dict[str, int] = {}
    for sub_tsv in truth_subject.glob("sub-*_desc-lesionvolumes_truth.tsv"):
        for row in read_tsv(sub_tsv):
            volume_ul = 1000.0 * (_number(row["volume_ml"]) or 0.0)
            if volume_ul > 0 and volume_ul >= min_ul:
                counts[row["session"]] = counts.get(row["session"], 0) + 1
    return counts


def lesion_dice(measured: Path, truth: Path) -> float:
    """Return the Dice of two lesion label images (non-zero = lesion), on ``truth``'s grid."""
    m_img, t_img = nib.load(measured), nib.load(truth)
    t = np.asarray(t_img.dataobj) > 0
    m = np.asarray(m_img.dataobj) > 0
    if m.shape != t.shape or not np.allclose(m_img.affine, t_img.affine, atol=1e-4):
        m = resample_to_grid(m.astype(np.float32), m_img.affine, t.shape, t_img.affine, 0) > 0.5
    total = int(m.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((m & t).sum()) / total


def _session_rows(
    subject: str, truth_dir: Path, out_dir: Path, minimum: tuple[float, int]
) -> list[Comparison]:
    counts = truth_lesion_counts(truth_dir)
    found: list[Comparison] = []
    for ses_dir in sorted(out_dir.glob("ses-*")):
        ses = ses_dir.name
        prefix = f"{subject}_{ses}"
        stats = ses_dir / "anat" / f"{prefix}_desc-lesions_stats.tsv"
        if not stats.is_file():
            continue
        n_found = len(read_tsv(stats))
        found.append(Comparison(subject, ses, "lesions", n_found, counts.get(ses), ""))
        measured = ses_dir / "anat" / f"{prefix}_desc-lesions_dseg.nii.gz"
        truth = truth_dir / ses / "anat" / f"{prefix}_space-T1w_desc-lesions_dseg.nii.gz"
        if measured.is_file():
            # what the grid can show: lesions above the pipeline's minimum in µl and in voxels
            voxel_ul = float(abs(np.linalg.det(nib.load(measured).affine[:3, :3])))
            min_ul = max(minimum[0], minimum[1] * voxel_ul)
            shown = truth_lesion_counts(truth_dir, min_ul).get(ses, 0)
            marker = f"lesions >= {min_ul:.0f} µl"
            found.append(Comparison(subject, ses, marker, n_found, shown, ""))
        if measured.is_file() and truth.is_file():
            found.append(Comparison(subject, ses, "lesion Dice", lesion_dice(measured, truth), 1.0))
        rows = read_tsv(stats)
        if rows and "rim_call" in rows[0]:
            calls = sum(r["rim_call"] == "yes" for r in rows)
            found.append(Comparison(subject, ses, "PRL", calls, _true_rims(truth_dir, ses), ""))
    return found


def _truth_lesions(truth_dir: Path) -> list[dict[str, str]]:
    tables = sorted(truth_dir.glob("sub-*_desc-lesions_truth.tsv"))
    return read_tsv(tables[0]) if tables else []


def _present(truth_dir: Path, session: str) -> set[str]:
    """Return the IDs of the true lesions with a volume in ``session``."""
    ids: set[str] = set()
    for table in truth_dir.glob("sub-*_desc-lesionvolumes_truth.tsv"):
        ids |= {
            r["lesion_id"]
            for r in read_tsv(table)
            if r["session"] == session and (_number(r["volume_ml"]) or 0.0) > 0
        }
    return ids


def _true_rims(truth_dir: Path, session: str) -> int:
    present = _present(truth_dir, session)
    return sum(r["rim"] == "yes" and r["lesion_id"] in present for r in _truth_lesions(truth_dir))


#: Interval markers: (name, measured column, truth column, unit).
_INTERVAL_MARKERS = (
    ("PBVC", "pbvc_from_baseline_pct", "pbvc_from_baseline_pct", "%"),
    ("GM change", "gm_change_from_baseline_pct", "gm_change_from_baseline_pct", "%"),
    (
        "cord area change",
        "cord_csa_change_from_baseline_pct",
        "cord_csa_change_from_baseline_pct",
        "%",
    ),
)


def _interval_rows(subject: str, truth_dir: Path, out_dir: Path) -> list[Comparison]:
    measured_tsv = out_dir / "anat" / f"{subject}_desc-atrophy_stats.tsv"
    truth_tsv = truth_dir / f"{subject}_desc-atrophy_truth.tsv"
    if not (measured_tsv.is_file() and truth_tsv.is_file()):
        return []
    truth = {row["session"].removeprefix("ses-"): row for row in read_tsv(truth_tsv)}
    rows = read_tsv(measured_tsv)
    if not rows:
        return []
    baseline = "ses-" + rows[0]["session"].removeprefix("ses-")
    found = _activity_rows(subject, truth_dir, out_dir)
    for row in rows[1:]:
        ses = row["session"].removeprefix("ses-")
        when = f"{baseline}→ses-{ses}"
        for name, column, truth_column, unit in _INTERVAL_MARKERS:
            true_row = truth.get(ses, {})
            found.append(
                Comparison(
                    subject,
                    when,
                    name,
                    _number(row.get(column)),
                    _number(true_row.get(truth_column)),
                    unit,
                )
            )
    return found


def _activity_rows(subject: str, truth_dir: Path, out_dir: Path) -> list[Comparison]:
    """Return new-lesion and SEL counts per interval beside the truth's."""
    activity = out_dir / "anat" / f"{subject}_desc-activity_longitudinal.tsv"
    if not activity.is_file():
        return []
    lesions = _truth_lesions(truth_dir)
    found = []
    for row in read_tsv(activity):
        before, after = "ses-" + row["from_session"], "ses-" + row["to_session"]
        when = f"{before}→{after}"
        new = sum(r["first_session"] == after for r in lesions)
        both = _present(truth_dir, before) & _present(truth_dir, after)
        sel = sum(r["sel"] == "yes" and r["lesion_id"] in both for r in lesions)
        found.append(Comparison(subject, when, "new lesions", _number(row.get("new_count")), new))
        found.append(Comparison(subject, when, "SEL", _number(row.get("sel_count")), sel))
    return found


def compare_with_truth(
    bids: Path, derivatives: Path, min_lesion: tuple[float, int] = (10.0, 3)
) -> list[Comparison]:
    """Return every marker the pipeline wrote for a phantom dataset beside its truth.

    Args:
        bids: the phantom's BIDS folder (its truth under ``derivatives/truth``).
        derivatives: the pipeline's output folder (``.../smoulder``).
        min_lesion: the smallest lesion the pipeline counts (µl, voxels): a second lesion row
            compares the count with the true lesions at least that large on the session's
            grid, the ones it could count at all.

    Raises:
        FileNotFoundError: ``bids`` holds no phantom truth.
    """
    truth_root = bids / "derivatives" / "truth"
    if not truth_root.is_dir():
        raise FileNotFoundError(
            f"{truth_root}: expected the phantom's truth folder (smoulder phantom writes it); "
            "only a phantom dataset can be compared with its truth"
        )
    found: list[Comparison] = []
    for truth_dir in sorted(truth_root.glob("sub-*")):
        subject = truth_dir.name
        out_dir = derivatives / subject
        if out_dir.is_dir():
            found += _session_rows(subject, truth_dir, out_dir, min_lesion)
            found += _interval_rows(subject, truth_dir, out_dir)
    return found


def _cell(value: float | None, marker: str) -> str:
    if value is None:
        return "n/a"
    if marker.startswith("lesions") or marker in ("PRL", "new lesions", "SEL"):
        return str(int(round(value)))
    return f"{value:.3f}" if marker == "lesion Dice" else f"{value:+.2f}"


def format_comparison(rows: list[Comparison]) -> str:
    """Return the comparison as an aligned text table (one line per row).

    Examples:
        >>> print(format_comparison([Comparison("sub-01", "ses-01", "lesions", 7, 8)]))
        subject  when    marker   measured  truth
        sub-01   ses-01  lesions  7         8
    """
    table = [("subject", "when", "marker", "measured", "truth")]
    for r in rows:
        unit = f" {r.unit}" if r.unit else ""
        table.append(
            (
                r.subject,
                r.when,
                r.marker,
                _cell(r.measured, r.marker) + unit,
                _cell(r.truth, r.marker) + unit,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    )
