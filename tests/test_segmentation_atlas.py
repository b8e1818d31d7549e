"""The infratentorial prior: what ships, how it is rebuilt, and how it lands on a session."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smoulder.grids import sample_world
from smoulder.segmentation.atlas import (
    PRIOR,
    build_prior,
    infratentorial_prior,
    read_prior,
    template_parenchyma,
    template_transform,
    ventricle_mask,
)
from smoulder.segmentation.lesions import lesion_table

#: MNI152 points (mm): (name, infratentorial?)
POINTS = {
    "left cerebellar hemisphere": ((-25.0, -65.0, -40.0), True),
    "right cerebellar hemisphere": ((25.0, -65.0, -40.0), True),
    "pons": ((0.0, -25.0, -35.0), True),
    "thalamus": ((10.0, -18.0, 8.0), False),
    "anterior temporal white matter": ((-35.0, 2.0, -29.0), False),
    "inferior occipital lobe": ((30.0, -85.0, -12.0), False),
}


def test_the_shipped_prior_puts_cerebellum_and_brainstem_below_the_tentorium() -> None:
    assert PRIOR.is_file()
    prior = infratentorial_prior()
    for name, (point, below) in POINTS.items():
        value = float(sample_world(prior, np.array([point]))[0])
        assert (value >= 0.5) == below, (name, value)
    volume_ml = float((np.asarray(prior.dataobj) >= 0.5).sum()) * 8 / 1000  # 2 mm voxels
    assert 150 < volume_ml < 260  # cerebellum + brainstem; measured 202 ml


def test_the_prior_is_rebuilt_from_label_maps(shared_data: Path, tmp_path: Path) -> None:
    maps = sorted((shared_data / "synthseg_label_maps").glob("training_seg_*.nii.gz"))[:2]
    out = build_prior(maps, tmp_path / "prior.nii.gz")
    img = nib.load(out)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.uint8 and data.max() == 100
    shipped = np.asarray(nib.load(PRIOR).dataobj) >= 50
    rebuilt = data >= 50
    overlap = 2 * (shipped & rebuilt).sum() / (shipped.sum() + rebuilt.sum())
    assert overlap > 0.85  # two maps against twenty


def test_a_moved_brain_finds_its_cerebellum_and_not_its_thalamus() -> None:
    """The template itself, shifted 12 mm and turned 8° in its header, as a session."""
    template = template_parenchyma()
    angle = np.radians(8.0)
    move = np.eye(4)
    move[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    move[:3, 3] = [12.0, -6.0, 9.0]
    affine = move @ template.affine
    data = np.asarray(template.dataobj, np.float32)
    where = np.zeros(data.shape, bool)
    voxels = {}
    for name, (point, _) in POINTS.items():
        vox = np.linalg.inv(template.affine) @ np.r_[point, 1.0]
        voxels[name] = tuple(int(round(v)) for v in vox[:3])
        where[voxels[name]] = True
    to_template = template_transform(data, affine)
    assert to_template is not None
    prob = read_prior(infratentorial_prior(), to_template, affine, where)
    for name, (_, below) in POINTS.items():
        assert (prob[voxels[name]] >= 0.5) == below, (name, prob[voxels[name]])
    assert not prob[~where].any()


@pytest.mark.parametrize("share", [0.75, 0.25])
def test_a_lesion_is_infratentorial_when_most_of_it_is(share: float) -> None:
    inst = np.zeros((10, 10, 10), np.int16)
    inst[2:6, 2:4, 2:4] = 1  # 16 voxels
    below = np.zeros(inst.shape, bool)
    below[2 : 2 + int(4 * share), 2:4, 2:4] = True
    rows = lesion_table(inst, np.eye(4), infratentorial_mask=below)
    assert (rows[0]["location"] == "infratentorial") == (share > 0.5)


def test_a_brain_the_template_cannot_fit_gets_no_infratentorial_call() -> None:
    """A 5 cm ball is no brain: the fit's scales are implausible, so nothing is called."""
    g = np.indices((80, 80, 80)).astype(float) - 40
    ball = (np.sqrt((g**2).sum(0)) < 25).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = -40
    with pytest.warns(UserWarning, match="did not fit"):
        assert template_transform(ball, affine) is None


def test_ventricles_are_the_csf_inside_the_envelope() -> None:
    """On the template moved in its header: CSF at the lateral ventricles is ventricular,
    CSF in the Sylvian fissure or over the frontal lobes is not."""
    template = template_parenchyma()
    move = np.eye(4)
    move[:3, 3] = [-8.0, 10.0, 5.0]
    affine = move @ template.affine
    data = np.asarray(template.dataobj, np.float32)
    to_template = template_transform(data, affine)
    assert to_template is not None
    csf = np.ones(data.shape, bool)  # every voxel might be CSF: the envelope decides
    ventricles = ventricle_mask(csf, affine, to_template)
    for point, inside in (
        ((-15.0, -20.0, 22.0), True),
        ((15.0, -20.0, 22.0), True),
        ((-20.0, -40.0, 15.0), True),
        ((55.0, -20.0, 10.0), False),
        ((0.0, 50.0, 40.0), False),
    ):
        vox = np.linalg.inv(template.affine) @ np.r_[point, 1.0]  # same voxel, moved world
        assert ventricles[tuple(int(round(v)) for v in vox[:3])] == inside, point
    assert 20 < ventricles.sum() * 8 / 1000 < 200  # ml inside the envelope
