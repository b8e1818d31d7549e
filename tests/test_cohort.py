"""The group level's cohort tables and page, from subject tables written on the fly."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from smoulder.cohort import INTERVAL_COLUMNS, SESSION_COLUMNS, cohort_tables
from smoulder.report.cohort import cohort_page


def write_tsv(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def subject(root: Path, sub: str, *, rims: bool, lesions: list[list[float]]) -> None:
    """Write a subject's lesion tables (volumes in µl per session), atrophy and activity."""
    for k, volumes in enumerate(lesions, start=1):
        ses = f"ses-0{k}"
        anat = root / sub / ses / "anat"
        rows: list[dict[str, object]] = []
        for i, v in enumerate(volumes, start=1):
            row: dict[str, object] = {"index": i, "volume_ul": v}
            if rims:
                row |= {"rim_call": "yes" if i == 1 else "no", "rim_status": "assessed"}
            rows.append(row)
        if rows:
            write_tsv(anat / f"{sub}_{ses}_desc-lesions_stats.tsv", rows)
        else:
            (anat).mkdir(parents=True, exist_ok=True)
            (anat / f"{sub}_{ses}_desc-lesions_stats.tsv").write_text("index\tvolume_ul\n")
        volumes = {"brain_ml": 1100 - k, "gm_ml": 600 - k, "icv_ml": 1500, "bpf": 0.73}
        cord = {"nbv_ml": 1110 - k, "cord_csa_mm2": 80.5, "cord_status": "measured"}
        write_tsv(anat / f"{sub}_{ses}_desc-atrophy_stats.tsv", [volumes | cord])
    write_tsv(root / sub / "anat" / f"{sub}_desc-atrophy_stats.tsv",
              [{"session": "01", "years_from_baseline": 0.0, "pbvc_interval_pct": "n/a",
                "pbvc_per_year_pct": "n/a", "pbvc_class": "n/a"},
               {"session": "02", "years_from_baseline": 1.5, "pbvc_interval_pct": -0.75,
                "pbvc_per_year_pct": -0.5, "pbvc_class": "pathological"}])  # fmt: skip
    write_tsv(root / sub / "anat" / f"{sub}_desc-activity_longitudinal.tsv",
              [{"interval": "01-02", "from_session": "01", "to_session": "02", "years": 1.5,
                "new_count": 2, "new_volume_ul": 250.0, "enlarging_count": 1,
                "enlarging_volume_ul": 40.0, "sel_count": 1, "sel_volume_ul": 1200.0,
                "prl_sel_count": 0}])  # fmt: skip


def test_cohort_tables_gather_every_marker_with_units(tmp_path: Path) -> None:
    subject(tmp_path, "sub-01", rims=True, lesions=[[100.0, 50.0], [120.0, 50.0, 250.0]])
    subject(tmp_path, "sub-02", rims=True, lesions=[[], [30.0]])
    t = cohort_tables(tmp_path)
    assert [(r["participant_id"], r["session_id"]) for r in t.sessions] == [
        ("sub-01", "ses-01"), ("sub-01", "ses-02"), ("sub-02", "ses-01"), ("sub-02", "ses-02")
    ]  # fmt: skip
    first = t.sessions[0]
    assert first["lesion_count"] == "2" and float(first["lesion_volume_ml"]) == 0.15
    assert first["prl_count"] == "1" and first["rim_assessed_count"] == "2"
    assert t.sessions[2]["lesion_count"] == "0" and t.sessions[2]["lesion_volume_ml"] == "0"
    assert first["brain_ml"] == "1099" and first["cord_csa_mm2"] == "80.5"
    assert len(t.intervals) == 2
    iv = t.intervals[0]
    assert (iv["from_session"], iv["to_session"], iv["years"]) == ("ses-01", "ses-02", "1.5")
    assert float(iv["new_volume_ml"]) == 0.25 and iv["sel_count"] == "1"
    assert iv["pbvc_pct"] == "-0.75" and iv["pbvc_class"] == "pathological"
    assert t.session_dictionary["lesion_volume_ml"]["Units"] == "mL"
    assert t.interval_dictionary["pbvc_per_year_pct"]["Units"] == "%/year"
    assert "Source" in t.interval_dictionary["new_count"]
    # every column of every row is in its dictionary, in the same order
    assert list(t.sessions[0]) == list(t.session_dictionary)
    assert list(t.intervals[0]) == list(t.interval_dictionary)
    # a marker no subject has is an absent column: gm_per_year_pct was never written
    assert "gm_per_year_pct" not in t.interval_dictionary
    names = {c.name for c in SESSION_COLUMNS} | {c.name for c in INTERVAL_COLUMNS}
    assert set(t.session_dictionary) - {"participant_id", "session_id"} <= names


def test_without_rim_data_the_prl_columns_are_absent(tmp_path: Path) -> None:
    subject(tmp_path, "sub-01", rims=False, lesions=[[100.0], [100.0]])
    t = cohort_tables(tmp_path)
    assert "prl_count" not in t.session_dictionary
    assert all("prl_count" not in r for r in t.sessions)
    only = cohort_tables(tmp_path, participants=["02"])
    assert only.sessions == [] and only.intervals == []


def test_cohort_page_links_reports_and_plots_markers(tmp_path: Path) -> None:
    subject(tmp_path, "sub-01", rims=True, lesions=[[100.0], [150.0]])
    subject(tmp_path, "sub-02", rims=True, lesions=[[10.0], [20.0]])
    page = cohort_page(cohort_tables(tmp_path), subjects_with_reports=["sub-01"])
    assert "<a href='sub-01.html'>sub-01</a>" in page
    assert "sub-02.html" not in page and "sub-02: 2 sessions" in page
    assert page.count("<polyline") >= 2 and "<rect" in page


@pytest.mark.parametrize("missing", ["activity", "atrophy"])
def test_an_interval_with_one_source_gets_na_for_the_other(tmp_path: Path, missing: str) -> None:
    subject(tmp_path, "sub-01", rims=True, lesions=[[100.0], [150.0]])
    name = {"activity": "desc-activity_longitudinal", "atrophy": "desc-atrophy_stats"}[missing]
    (tmp_path / "sub-01" / "anat" / f"sub-01_{name}.tsv").unlink()
    subject(tmp_path, "sub-02", rims=True, lesions=[[10.0], [20.0]])
    t = cohort_tables(tmp_path)
    row = t.intervals[0]
    column = "new_count" if missing == "activity" else "pbvc_pct"
    assert row[column] == "n/a" and t.intervals[1][column] != "n/a"
