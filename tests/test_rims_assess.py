"""Tests of a session's rim step (:mod:`smoulder.rims.assess`) on synthetic GRE sessions.

Two lesions side by side on one 0.8-mm grid (the synthetic cases of ``test_rims_rules``): the
first with a complete paramagnetic rim, the second without; the FLAIR shares the grid (one
session, scanner coordinates).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_rims_rules import make_case

from smoulder.registration.transforms import AffineTransform
from smoulder.rims.assess import (
    ASSESSED,
    NO_SUSCEPTIBILITY,
    NOT_ASSESSED,
    RIM_COLUMNS,
    RIMS_OFF,
    GreInputs,
    GreLesions,
    Susceptibility,
    assess_rims,
    choose_input,
    field_strength,
)
from smoulder.rims.network import load_bundle


def _session() -> tuple[nib.Nifti1Image, GreLesions, Susceptibility]:
    """Return the FLAIR instances, the GRE lesions and the χ map of the two-lesion session."""
    rim, plain = make_case(rim_ppm=0.08, seed=1), make_case(seed=2)
    chi = np.concatenate([rim.chi, plain.chi], axis=0)
    labels = np.concatenate([(rim.lesion >= 0.5) * 1, (plain.lesion >= 0.5) * 2], axis=0)
    instances = nib.Nifti1Image(labels.astype(np.int16), rim.affine)
    flair = np.concatenate([rim.lesion, plain.lesion], axis=0) + 1.0
    lesions = GreLesions(
        affine=rim.affine,
        magnitude=np.concatenate([rim.magnitude, plain.magnitude], axis=0),
        valid=np.ones(chi.shape, bool),
        wm=np.concatenate([rim.wm, plain.wm], axis=0),
        labels=labels.astype(np.int16),
        flair=nib.Nifti1Image(flair.astype(np.float32), rim.affine),
        flair_to_gre=AffineTransform.identity(),
    )
    return instances, lesions, Susceptibility(chi, "qsm", "paramagnetic positive (test)")


def test_rule_based_calls_without_a_classifier() -> None:
    instances, lesions, chi = _session()
    result = assess_rims(instances, lesions, chi, None)
    rows, summary = result.rows, result.summary
    assert rows[1]["rim_call"] == "yes" and rows[2]["rim_call"] == "no"
    assert rows[1]["rim_probability"] is None  # no classifier: no probability
    assert summary.prl_count == 1 and summary.assessed == 2
    assert rows[1]["rim_coverage"] > 0.8 > rows[2]["rim_coverage"]
    assert set(rows[1]) <= set(RIM_COLUMNS)
    assert len(rows[1]["rim_sectors"]) == 12 and rows[1]["rim_sectors"].count("1") >= 10


def test_classifier_ranks_the_rim_above_the_rimless_lesion() -> None:
    instances, lesions, chi = _session()
    bundle = load_bundle()
    result = assess_rims(instances, lesions, chi, bundle)
    rows, summary = result.rows, result.summary
    assert rows[1]["rim_status"] == rows[2]["rim_status"] == ASSESSED
    assert rows[1]["rim_probability"] > rows[2]["rim_probability"]
    threshold = bundle.operating_points["balanced"]
    for lid in (1, 2):
        call = "yes" if rows[lid]["rim_probability"] >= threshold else "no"
        assert rows[lid]["rim_call"] == call
    assert summary.model and summary.model.startswith("smoulder_prl")
    assert summary.prl_count == sum(r["rim_call"] == "yes" for r in rows.values())
    assert result.lesion_ids == [1, 2] and result.patches.shape == (2, 4, 24, 24, 24)
    # the calibration used is named: the field's stratum where the bundle has one
    assert summary.b0_tesla is None and summary.calibration
    at_7t = assess_rims(instances, lesions, replace(chi, b0_tesla=7.0), bundle).summary
    stratum = bundle.calibration.stratum_of("qsm", 7.0)
    assert at_7t.sidecar()["MagneticFieldStrength"] == 7.0
    assert (stratum or "pooled") in at_7t.sidecar()["RimCalibration"]


def test_field_strength_is_read_from_the_first_sidecar_stating_it(tmp_path: Path) -> None:
    images = [tmp_path / f"{name}.nii.gz" for name in ("chi", "mag", "phase")]
    (tmp_path / "mag.json").write_text('{"MagneticFieldStrength": 7}')
    (tmp_path / "phase.json").write_text('{"MagneticFieldStrength": 3}')
    assert field_strength(images) == 7.0
    assert field_strength(images[:1]) is None  # no sidecar: not stated
    (tmp_path / "chi.json").write_text('{"MagneticFieldStrength": "high"}')
    assert field_strength(images) == 7.0  # not a field in tesla: the next sidecar says


def test_session_without_susceptibility_is_not_assessed() -> None:
    instances, _, _ = _session()
    result = assess_rims(instances, None, None, None)
    rows, summary = result.rows, result.summary
    assert {r["rim_call"] for r in rows.values()} == {NOT_ASSESSED}
    assert {r["rim_status"] for r in rows.values()} == {NO_SUSCEPTIBILITY}
    assert summary.prl_count is None and summary.sidecar()["PRLCount"] is None
    turned_off = assess_rims(instances, None, None, None, unassessed=RIMS_OFF).rows
    assert {r["rim_status"] for r in turned_off.values()} == {RIMS_OFF}


def test_lesion_outside_the_gre_is_not_assessed_with_the_reason() -> None:
    instances, lesions, chi = _session()
    lesions.valid[44:] = False  # the QSM mask stops before the second lesion
    result = assess_rims(instances, lesions, chi, None)
    rows, summary = result.rows, result.summary
    assert rows[1]["rim_status"] == ASSESSED
    assert rows[2]["rim_call"] == NOT_ASSESSED
    assert rows[2]["rim_status"].startswith("outside the GRE field of view (0 %")
    assert summary.assessed == 1


@pytest.mark.parametrize(
    ("files", "preference", "expected"),
    [
        (GreInputs(), "auto", None),
        (GreInputs(chimap=Path("chi.nii")), "phase", "qsm"),
    ],
)
def test_input_choice(files: GreInputs, preference: str, expected: str | None) -> None:
    assert choose_input(files, preference) == expected
