"""Lesion activity over time: tracking, fates, slowly expanding lesions, dates.

A small synthetic head (textured tissue, ventricles, a cortical shell) carries lesions whose
fate is known: one grows concentrically, one only moves, one stays, one is new, one is in both
sessions' images but segmented only in the later one. The two sessions are registered for real
(greedy, halfway); the three-session and constancy cases use known deformations instead.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from smoulder.longitudinal.activity import ActivitySettings, SessionImages, lesion_activity
from smoulder.longitudinal.intervals import session_times, years_since_first
from smoulder.longitudinal.space import SubjectSpace, subject_space
from smoulder.longitudinal.tracking import track_lesions
from smoulder.registration.transforms import AffineTransform, DisplacementTransform

SHAPE = (56, 60, 48)
VOXEL_MM = 2.0


def _head(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return a textured synthetic head (FLAIR-like) and its white-matter probability."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) - s / 2 for s in SHAPE], indexing="ij")
    r = np.sqrt(sum((c / (s * 0.42)) ** 2 for c, s in zip((z, y, x), SHAPE, strict=True)))
    img = np.where(r < 1, 1.0, 0.0)
    img = np.where((r > 0.85) & (r < 1), 1.25, img)
    ventricles = np.sqrt((z / 5) ** 2 + (y / 10) ** 2 + (x / 3) ** 2) < 1
    img = np.where(ventricles, 0.3, img)
    img = img * (1 + 0.6 * ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.5))
    return img.astype(np.float32), ((r < 0.85) & ~ventricles).astype(np.float32)


def _ball(centre: tuple[float, ...], radius: float) -> np.ndarray:
    """Return a partial-volume ball (voxel units)."""
    grid = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    return np.clip(radius + 0.5 - d, 0, 1).astype(np.float32)


def _session(
    label: str,
    lesions: list[tuple[tuple[float, ...], float] | None],
    *,
    segmented: list[bool] | None = None,
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    seed: int = 0,
) -> SessionImages:
    """Return a session: lesions drawn into the head; ``segmented`` says which are in its mask."""
    base, wm = _head()
    rng = np.random.default_rng([seed, int(label)])
    img = base.copy()
    inst = np.zeros(SHAPE, np.int16)
    prob = np.zeros(SHAPE, np.float32)
    for i, lesion in enumerate(lesions, start=1):
        if lesion is None:  # not there (yet)
            continue
        f = _ball(*lesion)
        img = img * (1 - f) + 1.9 * f
        if segmented is None or segmented[i - 1]:
            inst[f >= 0.5] = i
            prob = np.maximum(prob, f)
    img = img + 0.02 * rng.standard_normal(SHAPE).astype(np.float32)
    affine = np.diag([VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = np.array([-56.0, -60.0, -48.0]) + np.array(shift_mm)
    return SessionImages(
        label,
        nib.Nifti1Image(img, affine),
        nib.Nifti1Image(inst, affine),
        nib.Nifti1Image(prob, affine),
        wm=nib.Nifti1Image(wm, affine),
    )


GROWS, MOVES, STAYS, NEW, MISSED = 1, 2, 3, 4, 5
BEFORE = [((20, 18, 16), 3.0), ((32, 40, 30), 3.0), ((22, 36, 14), 3.0), None,
          ((36, 26, 18), 2.5)]  # fmt: skip
AFTER = [((20, 18, 16), 4.0), ((32, 41.5, 30), 3.0), ((22, 36, 14), 3.0), ((34, 20, 30), 2.5),
         ((36, 26, 18), 2.5)]  # fmt: skip


@pytest.fixture(scope="module")
def pair() -> tuple[list[SessionImages], SubjectSpace]:
    """Two sessions registered for real; the 'missed' lesion is in both images but only the
    later segmentation (the earlier one has it in the image, not in its mask)."""
    before = _session("1", BEFORE, segmented=[True, True, True, True, False])
    after = _session("2", AFTER, shift_mm=(1.3, 0.0, -0.7))
    sessions = [before, after]
    space = subject_space({s.label: s.flair for s in sessions}, engine="greedy", threads=2)
    return sessions, space


def _later_rows(activity: object) -> dict[str, dict]:
    rows = activity.rows  # type: ignore[attr-defined]
    first = {r["lesion_id"]: r for r in rows if r["session"] == "1"}
    later = {r["lesion_id"]: r for r in rows if r["session"] == "2"}
    by_instance = {}
    for lid, row in later.items():
        key = row["instances"] or first[lid]["instances"]
        by_instance[key] = row
    return by_instance


def test_growth_moves_and_new_lesions_get_their_fates(pair: tuple) -> None:
    sessions, space = pair
    activity = lesion_activity(space, sessions, [0.0, 1.0])
    rows = _later_rows(activity)
    grows, moves, stays = rows[str(GROWS)], rows[str(MOVES)], rows[str(STAYS)]
    assert grows["fate"] == "enlarging" and grows["sel_call"] == "yes", grows
    assert grows["sel_concentricity"] >= 0.75
    # (4.5 / 3.5)^3 - 1 = 112 % a year by volume; the Jacobian sees most of it
    assert 50 < grows["rate"] < 200
    assert moves["sel_call"] == "no" and moves["fate"] != "enlarging", moves
    assert stays["fate"] == "stable" and stays["sel_call"] == "no", stays
    new = rows[str(NEW)]
    assert new["fate"] == "new" and new["sel_call"] == "n/a", new
    missed = rows[str(MISSED)]  # segmented only in the later session, unchanged in the images
    assert missed["fate"] == "stable" and "no FLAIR change" in missed["fate_evidence"], missed
    interval = activity.intervals[0]
    assert (interval["new_count"], interval["sel_count"]) == (1, 1)
    assert interval["enlarging_count"] >= 1 and interval["years"] == 1.0
    assert np.isfinite(interval["noise_floor"]) and interval["noise_floor"] > 0
    # the change map holds the new lesion, on the within-subject grid
    change = activity.change["1-2"]
    new_id = next(r["lesion_id"] for r in activity.rows if r["instances"] == str(NEW))
    assert change[activity.labels["2"] == new_id].all()


def test_without_dates_rates_are_per_interval(pair: tuple) -> None:
    sessions, space = pair
    activity = lesion_activity(space, sessions, [None, None])
    assert activity.messages and "date is missing" in activity.messages[0]
    assert activity.intervals[0]["years"] == "n/a"
    grows = _later_rows(activity)[str(GROWS)]
    assert grows["rate_unit"] == "%/interval" and grows["fate"] == "enlarging"


def test_sessions_with_different_voxel_sizes(pair: tuple) -> None:
    """A thick-slice follow-up (2 × 2 × 4 mm) still tracks the same lesions."""
    sessions, _ = pair
    later = sessions[1]
    thick = {}
    for name in ("flair", "lesions", "lesion_probability", "wm"):
        img = getattr(later, name)
        data = np.asarray(img.dataobj)
        if name == "lesions":
            coarse = data[:, :, ::2]
        else:
            coarse = 0.5 * (data[:, :, ::2] + data[:, :, 1::2])
        affine = img.affine.copy()
        affine[2, 2] = 2 * VOXEL_MM
        affine[2, 3] += VOXEL_MM / 2
        thick[name] = nib.Nifti1Image(coarse.astype(data.dtype), affine)
    follow_up = SessionImages("2", thick["flair"], thick["lesions"], thick["lesion_probability"],
                              wm=thick["wm"])  # fmt: skip
    both = [sessions[0], follow_up]
    space = subject_space({s.label: s.flair for s in both}, engine="greedy", threads=2)
    zooms = space.grid.header.get_zooms()[:3]
    assert np.allclose(zooms, zooms[0])  # isotropic within-subject grid
    activity = lesion_activity(space, both, [0.0, 1.0])
    rows = _later_rows(activity)
    assert rows[str(STAYS)]["fate"] == "stable"
    assert rows[str(GROWS)]["sel_call"] == "yes"


# ------------------------------------------------------------------------ known deformations


def _radial(
    centre_mm: np.ndarray, growth_mm: float, grid: nib.Nifti1Image
) -> DisplacementTransform:
    """Return grid → session points of a session whose lesion at ``centre_mm`` has grown by
    ``growth_mm`` radially."""
    ijk = np.indices(grid.shape[:3]).reshape(3, -1).T
    world = nib.affines.apply_affine(grid.affine, ijk)
    rel = world - centre_mm
    dist = np.linalg.norm(rel, axis=1, keepdims=True)
    # grid points map to session points pushed outward: a grid neighbourhood of the lesion
    # stands for a larger one in that session (Jacobian > 1), where the lesion is larger.
    # Uniform expansion inside radius R, and a divergence-free r^-2 push outside it.
    radius = 3.0 * VOXEL_MM + 1.0
    far = growth_mm * radius**2 / np.maximum(dist, radius) ** 2
    push = np.where(dist < radius, growth_mm * dist / radius, far)
    unit = rel / np.maximum(dist, 1e-6)
    disp = (push * unit).T.reshape(3, *grid.shape[:3]).astype(np.float32)
    return DisplacementTransform(disp, grid.affine)


def _static_sessions(n: int) -> list[SessionImages]:
    return [_session(str(k + 1), BEFORE[:3], seed=k) for k in range(n)]


def _space_with(growth_mm: list[float], sessions: list[SessionImages]) -> SubjectSpace:
    grid = sessions[0].flair
    centre = nib.affines.apply_affine(grid.affine, np.array(BEFORE[GROWS - 1][0], float))
    to_session = {
        s.label: (AffineTransform.identity() if g == 0 else _radial(centre, g, grid))
        for s, g in zip(sessions, growth_mm, strict=True)
    }
    return SubjectSpace(grid, to_session, "template")  # type: ignore[arg-type]


def test_three_sessions_steady_growth_is_constant() -> None:
    sessions = _static_sessions(3)
    space = _space_with([0.0, 0.5, 1.0], sessions)
    activity = lesion_activity(space, sessions, [0.0, 1.0, 2.0])
    last = {r["lesion_id"]: r for r in activity.rows if r["session"] == "3"}
    grows = last[GROWS]
    assert grows["sel_constancy"] > 0.9 and grows["sel_call"] == "yes", grows
    assert last[STAYS]["sel_call"] == "no"
    assert [i["interval"] for i in activity.intervals] == ["1-2", "2-3"]


def test_three_sessions_growth_then_shrinkage_is_not_constant() -> None:
    sessions = _static_sessions(3)
    space = _space_with([0.0, 1.0, 0.2], sessions)
    activity = lesion_activity(space, sessions, [0.0, 1.0, 2.0])
    grows = {r["lesion_id"]: r for r in activity.rows if r["session"] == "3"}[GROWS]
    assert grows["sel_constancy"] < 0.8 and grows["sel_call"] == "no", grows


# ------------------------------------------------------------------------ tracking and dates


def test_merge_and_split_keep_ids_traceable() -> None:
    a = np.zeros((1, 1, 20), np.int16)
    a[0, 0, 1:4], a[0, 0, 5:8], a[0, 0, 12:18] = 1, 2, 3
    b = np.zeros_like(a)
    b[0, 0, 1:8] = 4  # 1 and 2 merge
    b[0, 0, 12:14], b[0, 0, 16:18] = 5, 6  # 3 splits
    tracks = track_lesions([a, b])
    ids = {tuple(tracks.lineage[i][0].instances): i for i in tracks.ids if tracks.present(i, 0)}
    one, two, three = ids[(1,)], ids[(2,)], ids[(3,)]
    assert tracks.lineage[one][1].merged_from == [two]
    assert tracks.lineage[two][1].event == "merged" and tracks.lineage[two][1].merged_into == one
    pieces = [i for i in tracks.ids if tracks.lineage[i][1].split_from == three]
    assert len(pieces) == 1 and tracks.lineage[three][1].event == "split"
    assert set(np.unique(tracks.labels[1])) == {0, one, three, pieces[0]}


def test_session_dates_from_sessions_scans_and_sidecars(tmp_path: Path) -> None:
    sub = tmp_path / "sub-01"
    for ses in ("01", "02", "03", "04"):
        (sub / f"ses-{ses}" / "anat").mkdir(parents=True)
    (sub / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-01\t2020-01-01T10:00:00\nses-02\tn/a\n"
    )
    (sub / "ses-02" / "sub-01_ses-02_scans.tsv").write_text(
        "filename\tacq_time\nanat/a.nii.gz\t2021-01-01T12:00:00\nanat/b.nii.gz\t2021-01-01T09:00:00\n"
    )
    (sub / "ses-03" / "anat" / "sub-01_ses-03_FLAIR.json").write_text(
        '{"AcquisitionDate": "2022-01-01", "AcquisitionTime": "08:00:00"}'
    )
    times, sources = session_times(tmp_path, "01", ["01", "02", "03", "04"])
    assert times[:3] == [
        datetime(2020, 1, 1, 10), datetime(2021, 1, 1, 9), datetime(2022, 1, 1, 8)
    ]  # fmt: skip
    assert sources == {"01": "sessions.tsv", "02": "scans.tsv",
                       "03": "sidecar sub-01_ses-03_FLAIR.json", "04": "missing"}  # fmt: skip
    assert years_since_first(times) == [None] * 4  # one missing date: no annual rates


def test_settings_come_from_the_configuration() -> None:
    from dataclasses import asdict

    from smoulder.config import resolve

    cfg = resolve(overrides={"longitudinal": {"sel": {"min_voxels": 7}}})
    settings = ActivitySettings.from_mapping(asdict(cfg.longitudinal))
    assert settings.sel.min_voxels == 7 and settings.change_pct_per_year == 9.0
