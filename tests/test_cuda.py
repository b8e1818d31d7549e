"""The CUDA paths give what the CPU gives: segmentation, QSM and registration.

Skipped without a CUDA device (CI has none); ``benchmarks/device/run.sh`` runs them on a lent
GPU. ``SMOULDER_TEST_ALT_DEVICE=cpu`` runs them CPU against CPU, which checks the tests
themselves on a machine without a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from smoulder.phantom.dataset import generate_dataset
from smoulder.phantom.generate import PhantomConfig

DEVICE = os.environ.get("SMOULDER_TEST_ALT_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"
)
SES = "sub-01/ses-01/anat/sub-01_ses-01"


@pytest.fixture(scope="module")
def phantom_2mm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = PhantomConfig(resolution_mm=2.0, subjects=1, sessions=2, lesions=12, seed=5)
    return generate_dataset(tmp_path_factory.mktemp("cuda-phantom"), cfg)


def test_auto_device_is_the_gpu() -> None:
    from smoulder.devices import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_segmentation_agrees_with_the_cpu(phantom_2mm: Path) -> None:
    from smoulder.segmentation.inference import segment

    flair = nib.load(phantom_2mm / f"{SES}_FLAIR.nii.gz")
    t1 = nib.load(phantom_2mm / f"{SES}_T1w.nii.gz")
    cpu, alt = segment(flair, t1, device="cpu"), segment(flair, t1, device=DEVICE)
    a, b = np.asarray(cpu.dseg.dataobj), np.asarray(alt.dseg.dataobj)
    assert (a == b).mean() > 0.995
    lesion_a, lesion_b = a == 5, b == 5
    assert 2 * (lesion_a & lesion_b).sum() / (lesion_a.sum() + lesion_b.sum()) > 0.95
    n_a = len(np.unique(np.asarray(cpu.instances.dataobj))) - 1
    n_b = len(np.unique(np.asarray(alt.instances.dataobj))) - 1
    assert abs(n_a - n_b) <= 1, (n_a, n_b)
    assert alt.device == DEVICE


def test_qsm_agrees_with_the_cpu(tmp_path: Path) -> None:
    from test_qsm import _write_echoes

    from smoulder.qsm.reconstruct import load_echoes, reconstruct

    mags, phases, mask, chi = _write_echoes(tmp_path)
    echoes = load_echoes(mags, phases)
    for method in ("tv", "tkd"):
        cpu = reconstruct(echoes, mask, method=method, device="cpu")
        alt = reconstruct(echoes, mask, method=method, device=DEVICE)
        kept = cpu.mask & alt.mask
        assert kept.sum() > 0.9 * cpu.mask.sum()
        diff = np.abs(cpu.chi_ppm[kept] - alt.chi_ppm[kept])
        # float32 FFTs differ between libraries in the last bits; iterations carry that on
        assert diff.max() < 2e-3, (method, float(diff.max()))


def test_deformable_registration_agrees_with_the_cpu(phantom_2mm: Path) -> None:
    from smoulder.images import coarsen
    from smoulder.registration.engines import halfway

    anat = phantom_2mm / "sub-01"
    # 4-mm copies: the CPU half of the comparison stays short
    a = coarsen(nib.load(anat / "ses-01/anat/sub-01_ses-01_FLAIR.nii.gz"), 4.0)
    b = coarsen(nib.load(anat / "ses-02/anat/sub-01_ses-02_FLAIR.nii.gz"), 4.0)
    cpu = halfway(a, b, engine="torch", device="cpu", seed=0)
    alt = halfway(a, b, engine="torch", device=DEVICE, seed=0)
    brain = np.argwhere(np.asarray(a.dataobj) > np.percentile(np.asarray(a.dataobj), 60))
    pts = nib.affines.apply_affine(a.affine, brain)
    gap = np.linalg.norm(cpu.a_to_b.apply(pts) - alt.a_to_b.apply(pts), axis=1)
    assert gap.mean() < 0.2, float(gap.mean())  # mm: a twentieth of a 4-mm voxel
    assert alt.device == DEVICE
