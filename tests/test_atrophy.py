"""Atrophy: cross-sectional volumes, within-subject PBVC and grey-matter change."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from smoulder.atrophy.subject import AtrophySession, classify, subject_atrophy
from smoulder.atrophy.volumes import ATROPHY_TISSUES, session_volumes, tissue_volumes_ml
from smoulder.longitudinal.space import SubjectSpace
from smoulder.registration.transforms import AffineTransform
from smoulder.segmentation.classes import CLASSES

NAMES = {name: k for k, name in enumerate(CLASSES)}
SHAPE = (64, 64, 64)
CENTRE = np.array([31.5, 31.5, 31.5])


def _dseg() -> np.ndarray:
    """Return a class map holding ``i + 1`` voxels of class ``i`` (background: 1 voxel)."""
    labels = np.concatenate([np.full(i + 1, i) for i in range(len(CLASSES))])
    return labels.reshape(1, 1, -1).astype(np.uint8)


@pytest.mark.parametrize(
    ("tissue", "voxels"),
    [
        ("brain", 3 + 4 + 5 + 6),  # cortical GM, deep GM, WM, lesion
        ("GM", 3 + 4),
        ("WM", 5),  # lesions excluded
        ("WM_lesions_filled", 5 + 6),  # lesions counted as WM, as atrophy measures do
        ("lesion", 6),
        ("CSF", 2),
    ],
)
def test_tissue_volume_sums_the_classes_of_the_tissue(tissue: str, voxels: int) -> None:
    affine = np.diag([2.0, 1.0, 0.5, 1.0])  # 1 mm³ voxels, anisotropic
    affine[:3, 3] = 10.0
    volumes = tissue_volumes_ml(_dseg(), affine, NAMES, (tissue,))
    assert volumes == {tissue: pytest.approx(voxels / 1000.0)}


def test_tissue_volumes_default_to_the_atrophy_tissues_and_skip_missing_classes() -> None:
    dseg = np.array([[[0, 4, 4]]], np.int16)
    volumes = tissue_volumes_ml(dseg, np.diag([10.0, 10.0, 10.0, 1.0]), {"bg": 0, "WM": 4})
    assert list(volumes) == list(ATROPHY_TISSUES)
    assert volumes == {"brain": 2.0, "GM": 0.0, "WM_lesions_filled": 2.0, "lesion": 0.0}


def _head(scale: float, seed: int) -> dict[str, nib.Nifti1Image]:
    """Return a ball 'brain' (radius 18 mm, a grey-matter shell over white matter) in a CSF
    ball (radius 24 mm), every length scaled by ``scale`` about the centre, 1 mm voxels."""
    r = np.linalg.norm(np.indices(SHAPE, dtype=np.float32) - CENTRE[:, None, None, None], axis=0)
    r = r / scale

    def ball(radius: float) -> np.ndarray:
        return np.clip(radius - r + 0.5, 0.0, 1.0).astype(np.float32)

    brain, wm, icv = ball(18.0), ball(14.0), ball(24.0)
    gm, csf = brain - wm, icv - brain
    image = 1.0 * wm + 0.7 * gm + 0.15 * csf + 0.4 * (1 - icv)
    image += np.random.default_rng(seed).normal(0, 0.01, SHAPE).astype(np.float32)
    image = ndimage.gaussian_filter(image, 0.5)
    aff = np.eye(4)
    return {k: nib.Nifti1Image(v, aff) for k, v in
            {"image": image, "brain": brain, "gm": gm}.items()}  # fmt: skip


def _scaling(f: float) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] *= f
    m[:3, 3] = CENTRE - f * CENTRE
    return m


@pytest.mark.parametrize("pbvc", [-1.0, -0.4])
def test_a_known_uniform_scaling_gives_its_pbvc(pbvc: float) -> None:
    """Session b is session a shrunk uniformly: the Jacobian integration returns the scaling's
    volume change exactly, and the boundary shift (rigid alignment only) within 0.1 points."""
    f = (1 + pbvc / 100) ** (1 / 3)
    a, b = _head(1.0, 0), _head(f, 1)
    grid = a["image"]
    space = SubjectSpace(
        grid,
        {"1": AffineTransform.identity(), "2": AffineTransform(_scaling(f))},
        "halfway",
        linear={"1": np.eye(4), "2": np.eye(4)},  # the linear part: rigid, no scaling
    )
    sessions = [
        AtrophySession(label, h["image"], h["brain"], h["gm"], h["image"])
        for label, h in (("1", a), ("2", b))
    ]
    rows, cords = subject_atrophy(space, sessions, [0.0, 2.0])
    later = rows[1]
    assert later["pbvc_jacobian_interval_pct"] == pytest.approx(pbvc, abs=0.01)
    assert later["gm_change_interval_pct"] == pytest.approx(pbvc, abs=0.01)
    assert later["pbvc_boundary_shift_interval_pct"] == pytest.approx(pbvc, abs=0.1)
    assert later["pbvc_per_year_pct"] == pytest.approx(pbvc / 2, abs=0.01)
    assert later["pbvc_class"] == ("pathological" if pbvc / 2 <= -0.4 else "normal")
    assert rows[0].get("pbvc_interval_pct") is None  # nothing before the first session
    assert cords == [None, None]


def test_no_change_gives_no_pbvc() -> None:
    """A rescan (new noise, same head) reads no volume change by either estimator."""
    a, b = _head(1.0, 0), _head(1.0, 5)
    space = SubjectSpace(
        a["image"], {"1": AffineTransform.identity(), "2": AffineTransform.identity()}, "halfway"
    )
    sessions = [
        AtrophySession(label, h["image"], h["brain"], h["gm"], None)
        for label, h in (("1", a), ("2", b))
    ]
    rows, _ = subject_atrophy(space, sessions, [None, None])
    assert abs(rows[1]["pbvc_jacobian_interval_pct"]) < 1e-6
    assert abs(rows[1]["pbvc_boundary_shift_interval_pct"]) < 0.05
    # without dates: changes per interval, no yearly rate and no class
    assert rows[1]["pbvc_per_year_pct"] == "n/a" and rows[1]["pbvc_class"] == "n/a"


def test_lesion_filling_leaves_grey_matter_unchanged() -> None:
    """Lesions drawn into white matter change neither the grey matter nor the lesion-filled
    white matter, only the lesion volume; brain and intracranial volumes stay."""
    rng = np.random.default_rng(0)
    dseg = rng.choice([NAMES["CSF"], NAMES["cortical_GM"], NAMES["deep_GM"], NAMES["WM"]],
                      size=(20, 20, 20))  # fmt: skip
    with_lesions = dseg.copy()
    with_lesions[(dseg == NAMES["WM"]) & (rng.random(dseg.shape) < 0.2)] = NAMES["lesion"]
    before = session_volumes(dseg, np.eye(4), NAMES)
    after = session_volumes(with_lesions, np.eye(4), NAMES)
    assert after["lesion_ml"] > 0 == before["lesion_ml"]
    for key in ("gm_ml", "cortical_gm_ml", "deep_gm_ml", "wm_lesions_filled_ml", "brain_ml",
                "icv_ml", "nbv_ml"):  # fmt: skip
        assert after[key] == before[key], key


def test_cutoffs_are_cited() -> None:
    """The whole-brain cut-off is -0.4 %/year; measures without a published one say so."""
    assert classify("brain", -0.4) == "pathological"
    assert classify("brain", -0.39) == "normal"
    assert classify("gm", -5.0) == "no published cut-off"


def test_a_missing_session_date_is_named(tmp_path: Path) -> None:
    """A subject whose second session has no date anywhere: the session is named and the
    changes stay per interval (no yearly rate, no class)."""
    from smoulder.longitudinal.intervals import missing_dates, session_times

    for ses in ("01", "02"):
        (tmp_path / "sub-01" / f"ses-{ses}" / "anat").mkdir(parents=True)
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-01\t2020-01-06T09:00:00\nses-02\tn/a\n"
    )
    times, sources = session_times(tmp_path, "01", ["01", "02"])
    assert times[1] is None and sources == {"01": "sessions.tsv", "02": "missing"}
    (message,) = missing_dates(sources)
    assert "session(s) 02" in message
