"""Fine-tuning on real cases: the case folder, its targets, and leave-one-out bookkeeping."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smoulder.cli import main
from smoulder.errors import InputError
from smoulder.segmentation.classes import LESION
from smoulder.segmentation.real import RealCase, case_images, cases_seen_by, prepare_case


def _case(folder: Path, with_gold: bool = True) -> np.ndarray:
    """Write a small FLAIR/T1 pair with one bright white-matter blob and its expert mask."""
    folder.mkdir(parents=True)
    g = np.stack(np.meshgrid(*[np.arange(40) - 20.0] * 3, indexing="ij"))
    r = np.sqrt((g**2).sum(0))
    flair = np.where(r < 16, 300.0, 0.0) + np.where(r < 12, -80.0, 0.0)
    blob = ((g - np.array([5.0, 0, 0])[:, None, None, None]) ** 2).sum(0) < 3**2
    flair[blob] = 500.0
    t1 = np.where(r < 16, 200.0, 0.0) + np.where(r < 12, 150.0, 0.0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(flair.astype(np.float32), affine), folder / "FLAIR_x.nii.gz")
    nib.save(nib.Nifti1Image(t1.astype(np.float32), affine), folder / "T1_x.nii.gz")
    nib.save(nib.Nifti1Image(t1.astype(np.float32), affine), folder / "T1POST_x.nii.gz")
    if with_gold:
        gold = nib.Nifti1Image(blob.astype(np.uint8), affine)
        nib.save(gold, folder / "GOLD_STANDARD_x.nii.gz")
    return blob


def test_case_folder_is_read_and_bad_folders_are_named(tmp_path: Path) -> None:
    _case(tmp_path / "patient99")
    found = case_images(tmp_path / "patient99")
    assert found["FLAIR"].name == "FLAIR_x.nii.gz"  # type: ignore[union-attr]
    assert found["T1"].name == "T1_x.nii.gz"  # type: ignore[union-attr]  (not the post-contrast)
    _case(tmp_path / "patient98", with_gold=False)
    with pytest.raises(InputError, match="patient98: expected one lesions image"):
        case_images(tmp_path / "patient98")


def test_targets_take_lesions_from_the_expert(tmp_path: Path) -> None:
    blob = _case(tmp_path / "patient99")
    path = prepare_case(tmp_path / "patient99", None, tmp_path / "cache")
    case = RealCase.load(path)
    assert case.channels.shape == (3, 40, 40, 40) and case.channels[2].max() == 1.0
    assert np.array_equal(case.labels == LESION, blob)  # identity grid: exactly the expert's
    assert prepare_case(tmp_path / "patient99", None, tmp_path / "cache") == path  # cached


def test_fine_tuning_records_the_cases_it_saw(label_map_dir: Path, tmp_path: Path) -> None:
    _case(tmp_path / "patient99")
    args = ["train", "segmentation", str(tmp_path / "run"), "--iterations", "2", "--batch", "1",
            "--patch", "32", "--channels", "4,8", "--validate-every", "2", "--label-maps",
            str(label_map_dir), "--threads", "1", "--real-case", str(tmp_path / "patient99"),
            "--real-fraction", "1.0"]  # fmt: skip
    assert main(args) == 0
    assert cases_seen_by(tmp_path / "run" / "bundle") == ["patient99"]
