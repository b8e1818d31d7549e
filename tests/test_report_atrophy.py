"""The report's atrophy section: volumes per session, changes only from within the subject."""

from __future__ import annotations

from pathlib import Path

from smoulder.atrophy.columns import SESSION_COLUMNS, SUBJECT_COLUMNS
from smoulder.images import save_tsv
from smoulder.report.atrophy import atrophy_section, brain_rate


def _session(root: Path, label: str, brain: float) -> None:
    anat = root / "sub-01" / f"ses-{label}" / "anat"
    anat.mkdir(parents=True)
    row = {"brain_ml": brain, "gm_ml": 600.0, "cord_csa_mm2": 80.0, "cord_status": "measured",
           "cord_reason": "slab 15-30 mm", "cord_flag": "none"}  # fmt: skip
    save_tsv([row], anat / f"sub-01_ses-{label}_desc-atrophy_stats.tsv",
             columns=list(SESSION_COLUMNS))  # fmt: skip


def test_rates_come_only_from_the_within_subject_table(tmp_path: Path) -> None:
    """Independent volumes say -1 %/year (1000 -> 990 ml); the section shows the subject
    table's -0.30 %/year and never the subtraction."""
    _session(tmp_path, "01", 1000.0)
    _session(tmp_path, "02", 990.0)
    subject_dir = tmp_path / "sub-01"
    html = atrophy_section(subject_dir, "sub-01", ["01", "02"])
    assert "No change measured" in html and "-1.00" not in html and "990.0" in html
    assert brain_rate(subject_dir, "sub-01") is None
    rows = [
        {"session": "01", "years_from_baseline": 0.0},
        {"session": "02", "years_from_baseline": 1.0, "pbvc_from_baseline_pct": -0.3,
         "pbvc_per_year_pct": -0.3, "pbvc_class": "normal", "gm_change_from_baseline_pct": -0.5,
         "gm_per_year_pct": -0.5, "pbvc_method": "jacobian"},
    ]  # fmt: skip
    save_tsv(rows, subject_dir / "sub-01_desc-atrophy_stats.tsv", columns=list(SUBJECT_COLUMNS))
    html = atrophy_section(subject_dir, "sub-01", ["01", "02"])
    assert "No change measured" not in html
    assert "-0.30" in html and "normal" in html and "-1.00" not in html
    assert "Jacobian integration" in html
    assert brain_rate(subject_dir, "sub-01") == -0.3


def test_an_unmeasured_cord_says_why(tmp_path: Path) -> None:
    anat = tmp_path / "sub-01" / "ses-01" / "anat"
    anat.mkdir(parents=True)
    reason = "the image reaches 12 mm below the anchor; the slab needs 30 mm"
    row = {"brain_ml": 1000.0, "cord_status": "not measurable", "cord_reason": reason}
    save_tsv([row], anat / "sub-01_ses-01_desc-atrophy_stats.tsv", columns=list(SESSION_COLUMNS))
    html = atrophy_section(tmp_path / "sub-01", "sub-01", ["01"])
    assert "the slab needs 30 mm" in html
