"""Longitudinal: session intervals and reference lesions followed into later sessions."""

from __future__ import annotations

from datetime import datetime

import nibabel as nib
import numpy as np
import pytest

from smoulder.longitudinal.intervals import session_dates, years_since_first
from smoulder.longitudinal.matching import lesion_volumes_ul, map_instances
from smoulder.registration.transforms import AffineTransform


def test_session_dates_skip_rows_without_a_date() -> None:
    rows = [
        {"session_id": "ses-01", "acq_time": "2020-01-01T00:00:00"},
        {"session_id": "ses-02", "acq_time": "2022-01-01"},
        {"session_id": "ses-03", "acq_time": "n/a"},
        {"session_id": "ses-04"},
    ]
    dates = session_dates(rows)
    assert list(dates) == ["ses-01", "ses-02"]
    assert years_since_first(list(dates.values())) == pytest.approx([0.0, 731 / 365.25])


@pytest.mark.parametrize("times", [[], [None, datetime(2020, 1, 1)]])
def test_years_since_first_without_all_dates_is_none(times: list[datetime | None]) -> None:
    assert years_since_first(times) == [None] * len(times)


def test_lesion_volumes_follow_each_reference_lesion() -> None:
    ref = np.zeros((4, 4, 1), np.int16)
    ref[0, :2] = 1  # 2 voxels
    ref[2, :] = 3  # 4 voxels; lesion 2 absent from the map
    later = np.zeros_like(ref)
    later[0, 0] = 7  # half of lesion 1, whatever its own label
    later[2, :3] = 1  # 3 of lesion 3's voxels
    later[3, :] = 2  # outside every reference lesion: not counted
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # 2 µl voxels
    volumes = lesion_volumes_ul(ref, affine, [later, None, np.zeros_like(ref)])
    assert volumes == {
        1: [4.0, 2.0, None, 0.0],
        2: [0.0, 0.0, None, 0.0],
        3: [8.0, 6.0, None, 0.0],
    }


def test_map_instances_keeps_labels_through_a_shift() -> None:
    affine = np.eye(4)
    later = np.zeros((6, 6, 6), np.int16)
    later[3, 2, 2], later[4, 2, 2] = 5, 9
    shift = np.eye(4)
    shift[0, 3] = 1.0  # reference point x maps to later point x + 1 mm
    reference = nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), affine)
    mapped = map_instances(nib.Nifti1Image(later, affine), reference, AffineTransform(shift))
    assert mapped[2, 2, 2] == 5 and mapped[3, 2, 2] == 9
    assert set(np.unique(mapped)) == {0, 5, 9}


def test_slow_concentric_growth_is_concentric_and_a_shift_is_not() -> None:
    """The edge band holds a lesion's growing rim and the tissue it pushes aside: sectors
    whose mean expansion is positive but below the growth threshold still count as
    expanding, while a shift (one side expanding, the other contracting) stays near half."""
    from smoulder.longitudinal.sel import SELSettings, measure

    z, y, x = np.mgrid[:25, :25, :25] - 12
    r = np.sqrt(x**2 + y**2 + z**2)
    lesion = r <= 5
    slow = np.where(lesion, 6.0, np.where(r <= 7, -2.0, 0.0)).astype(np.float32)
    grows = measure(slow, lesion, 1.0, SELSettings())
    assert grows.concentricity >= SELSettings().min_concentricity
    shift = np.where(r <= 7, 10.0 * x / 5.0, 0.0).astype(np.float32)
    moves = measure(shift, lesion, 1.0, SELSettings())
    assert moves.concentricity < SELSettings().min_concentricity
