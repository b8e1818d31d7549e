"""The head-model GRE phantom: lesions, rims, oblique B0 and the files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smoulder.phantom.qsm_head import (
    AIR,
    WHITE_MATTER,
    HeadGreConfig,
    place_lesions,
    simulate_labels,
    write_bids,
)
from smoulder.qsm.core import b0_in_voxels
from smoulder.qsm.reconstruct import load_echoes


def _toy_head(n: int = 48) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """A ball of white matter in a grey-matter shell, in air."""
    g = np.stack(np.meshgrid(*[np.arange(n) - n / 2] * 3, indexing="ij"))
    r = np.sqrt((g**2).sum(0))
    labels = np.full((n, n, n), AIR, np.int16)
    labels[r < 20] = 9
    labels[r < 17] = WHITE_MATTER
    chi = {i: 0.0 for i in range(1, 17)}
    chi.update({WHITE_MATTER: -0.03, 9: 0.02, AIR: 9.2})
    return labels, r < 20, chi


def test_lesions_sit_in_white_matter_with_rims_only_where_asked() -> None:
    labels, _, _ = _toy_head()
    config = HeadGreConfig(voxel_mm=1.0, rim_lesions=2, plain_lesions=2, radius_mm=(3.0, 4.0))
    lesion, rim = place_lesions(labels == WHITE_MATTER, config, np.random.default_rng(0))
    assert (lesion > 0).sum() > 4 * 50
    assert np.all(labels[lesion > 0] == WHITE_MATTER)
    assert 0 < (rim >= 0.5).sum() < (lesion >= 0.5).sum()
    assert np.all(rim <= lesion + 1e-6)
    with pytest.raises(ValueError, match="no room"):
        place_lesions(labels == WHITE_MATTER, HeadGreConfig(radius_mm=(30.0, 31.0)),
                      np.random.default_rng(0))  # fmt: skip


@pytest.mark.parametrize("tilt", [0.0, 25.0])
def test_simulated_gre_reads_back_with_its_b0_direction(tmp_path: Path, tilt: float) -> None:
    labels, brain, chi = _toy_head()
    config = HeadGreConfig(voxel_mm=1.0, echoes=3, rim_lesions=1, plain_lesions=1,
                           radius_mm=(3.0, 4.0), tilt_deg=tilt)  # fmt: skip
    phantom = simulate_labels(labels, brain, chi, config)
    rim, core = phantom["rim"] >= 0.5, (phantom["lesion"] >= 0.5) & (phantom["rim"] == 0)
    assert phantom["chi_ppm"][rim].mean() > phantom["chi_ppm"][core].mean() + 0.02
    # the affine carries the tilt: a reader finds B0 at the angle it was simulated with
    b0 = b0_in_voxels(phantom["affine"])
    assert np.degrees(np.arccos(abs(b0[2]))) == pytest.approx(tilt, abs=1e-6)
    root = write_bids(phantom, tmp_path / "ds")
    anat = root / "sub-01" / "ses-01" / "anat"
    echoes = load_echoes(
        sorted(anat.glob("*part-mag*.nii.gz")), sorted(anat.glob("*part-phase*.nii.gz"))
    )
    assert echoes.echo_times_ms == pytest.approx(config.echo_times_ms)
    assert np.abs(echoes.phase).max() <= np.pi + 1e-5
    truth = root / "derivatives" / "truth" / "sub-01" / "ses-01" / "anat"
    names = sorted(p.name for p in truth.glob("*.nii.gz"))
    assert names == [
        "sub-01_ses-01_Chimap.nii.gz",
        "sub-01_ses-01_desc-brain_mask.nii.gz",
        "sub-01_ses-01_desc-field_fieldmap.nii.gz",
        "sub-01_ses-01_label-lesion_probseg.nii.gz",
        "sub-01_ses-01_label-rim_probseg.nii.gz",
    ]
    assert json.loads((root / "dataset_description.json").read_text())["GeneratedBy"]
    assert nib.load(truth / names[0]).shape == labels.shape
