"""The phantom's truth is consistent with its images and with what was requested."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smoulder.inputs import discover, validate_session
from smoulder.phantom.dataset import generate_dataset
from smoulder.phantom.generate import PhantomConfig
from smoulder.phantom.lesions import blob_sdf, sdf_from_mask
from smoulder.registration.fields import (
    exponentiate,
    gradient_of_poisson,
    jacobian_determinant,
    smooth_random_velocity,
)
from tests.conftest import FAST_PHANTOM

TRUTH = Path("derivatives/truth/sub-01")


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def truth_map(root: Path, ses: str, name: str) -> np.ndarray:
    return load(root / TRUTH / ses / "anat" / f"sub-01_{ses}_space-T1w_{name}.nii.gz")


def voxel_ml(root: Path) -> float:
    img = nib.load(str(root / "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"))
    return float(np.prod(img.header.get_zooms()[:3])) / 1000


# ------------------------------------------------------------------- truth consistency


def test_pbvc_from_maps_equals_requested(phantom_dir: Path) -> None:
    rows = read_tsv(phantom_dir / TRUTH / "sub-01_desc-atrophy_truth.tsv")
    vml = voxel_ml(phantom_dir)
    volumes = []
    for row in rows:
        brain = truth_map(phantom_dir, row["session"], "label-brain_probseg").sum() * vml
        assert brain == pytest.approx(float(row["brain_volume_ml"]), abs=1e-3)
        volumes.append(brain)
    pbvc = 100 * (volumes[1] / volumes[0] - 1) / float(rows[1]["years_from_baseline"])
    assert abs(pbvc - FAST_PHANTOM.pbvc_per_year) < 0.02
    assert abs(float(rows[1]["pbvc_per_year_pct"]) - FAST_PHANTOM.pbvc_per_year) < 0.02
    gm_target = FAST_PHANTOM.pbvc_per_year + FAST_PHANTOM.gm_extra_change_per_year
    assert abs(float(rows[1]["gm_change_from_baseline_pct"]) - gm_target) < 0.02


def test_lesion_volumes_from_maps_equal_table(phantom_dir: Path) -> None:
    long_rows = read_tsv(phantom_dir / TRUTH / "sub-01_desc-lesionvolumes_truth.tsv")
    lesions = {
        int(r["lesion_id"]): r
        for r in read_tsv(phantom_dir / TRUTH / "sub-01_desc-lesions_truth.tsv")
    }
    vml = voxel_ml(phantom_dir)
    for ses in ("ses-01", "ses-02"):
        table_total = sum(float(r["volume_ml"]) for r in long_rows if r["session"] == ses)
        map_total = truth_map(phantom_dir, ses, "label-lesion_probseg").sum() * vml
        assert map_total == pytest.approx(table_total, rel=1e-4, abs=1e-5)
        ids = set(np.unique(truth_map(phantom_dir, ses, "desc-lesions_dseg")).tolist()) - {0}
        present = {int(r["lesion_id"]) for r in long_rows if r["session"] == ses}
        assert ids <= present
    for lid, row in lesions.items():
        sessions = [r["session"] for r in long_rows if int(r["lesion_id"]) == lid]
        if row["kind"] == "new":
            assert "ses-01" not in sessions
        vols = {
            r["session"]: float(r["volume_ml"]) for r in long_rows if int(r["lesion_id"]) == lid
        }
        if row["kind"] == "sel" and len(vols) == 2:
            assert vols["ses-02"] > vols["ses-01"]
        if row["kind"] == "shrinking" and len(vols) == 2:
            assert vols["ses-02"] < vols["ses-01"]


def test_table_rates_and_kinds(phantom_dir: Path) -> None:
    rows = read_tsv(phantom_dir / TRUTH / "sub-01_desc-lesions_truth.tsv")
    kinds = {r["kind"] for r in rows}
    assert {"stable", "sel", "new"} <= kinds
    assert {r["rim"] for r in rows} >= {"yes", "no"}
    assert {r["mimic"] for r in rows} >= {"none", "central_vein", "vein_adjacent"}
    for r in rows:
        rate = float(r["radial_rate_mm_per_year"])
        assert (rate > 0) == (r["kind"] == "sel")
        assert r["sel"] == ("yes" if r["kind"] == "sel" else "no")


def test_rims_are_paramagnetic_shells(phantom_dir: Path) -> None:
    rim = truth_map(phantom_dir, "ses-01", "label-rim_probseg")
    lesion = truth_map(phantom_dir, "ses-01", "label-lesion_probseg")
    chi = truth_map(phantom_dir, "ses-01", "Chimap")
    assert np.all(rim <= lesion + 1e-5)
    rim_vox, core_vox = rim > 0.4, (lesion > 0.9) & (rim < 0.05)
    assert rim_vox.any() and core_vox.any()
    assert chi[rim_vox].mean() > chi[core_vox].mean() + 0.02


def test_cord_csa_is_exact(phantom_dir: Path) -> None:
    rows = read_tsv(phantom_dir / TRUTH / "sub-01_desc-atrophy_truth.tsv")
    params = json.loads((phantom_dir / TRUTH / "sub-01_phantom.json").read_text())
    a, b = params["cord_axes_mm"]
    assert float(rows[0]["cord_csa_mm2"]) == pytest.approx(np.pi * a * b, rel=1e-6)
    assert float(rows[1]["cord_csa_change_from_baseline_pct"]) == pytest.approx(
        FAST_PHANTOM.cord_loss_per_year_pct, abs=1e-3
    )
    img = nib.load(
        str(phantom_dir / TRUTH / "ses-01/anat/sub-01_ses-01_space-T1w_label-cord_probseg.nii.gz")
    )
    cord = np.asarray(img.dataobj)
    zooms = img.header.get_zooms()
    per_slice = cord.sum((0, 1)) * zooms[0] * zooms[1]
    full = per_slice[per_slice > 0.8 * per_slice.max()]
    # slices across the (slightly tilted) cord, away from its ends
    assert np.median(full) == pytest.approx(float(rows[0]["cord_csa_mm2"]), rel=0.04)


def test_true_deformation_maps_baseline_onto_followup(phantom_dir: Path) -> None:
    """The ITK field written as truth, applied by antspyx, maps session 1 onto session 2."""
    ants = pytest.importorskip("ants")
    folder = phantom_dir / TRUTH
    fixed = ants.image_read(
        str(folder / "ses-02/anat/sub-01_ses-02_space-T1w_label-brain_probseg.nii.gz")
    )
    moving = ants.image_read(
        str(folder / "ses-01/anat/sub-01_ses-01_space-T1w_label-brain_probseg.nii.gz")
    )
    field = folder / "ses-02/anat/sub-01_ses-02_from-baseline_to-T1w_mode-image_xfm.nii.gz"
    warped = ants.apply_transforms(fixed, moving, transformlist=[str(field)], interpolator="linear")
    f, w, m = fixed.numpy(), warped.numpy(), moving.numpy()
    err_mapped = np.abs(w - f).mean()
    err_unmapped = np.abs(m - f).mean()
    assert err_mapped < 0.3 * err_unmapped
    assert np.corrcoef(w.ravel(), f.ravel())[0, 1] > 0.97


def test_raw_dataset_passes_our_checks(phantom_dir: Path) -> None:
    sessions = [validate_session(s) for s in discover(phantom_dir)]
    assert len(sessions) == 2
    for s in sessions:
        assert s.errors == []
        assert {"lesion_segmentation", "prl", "qsm_reconstruction", "atrophy"} <= set(s.analyses)
        assert len(s.echo_times_s) == len(FAST_PHANTOM.echo_times_ms)


def test_phase_is_wrapped_radians(phantom_dir: Path) -> None:
    phase = load(phantom_dir / "sub-01/ses-01/anat/sub-01_ses-01_echo-4_part-phase_MEGRE.nii.gz")
    assert phase.min() >= -np.pi - 1e-5 and phase.max() <= np.pi + 1e-5
    assert phase.max() - phase.min() > 6.0


def test_contrasts_follow_tissue_physics(phantom_dir: Path) -> None:
    wm = truth_map(phantom_dir, "ses-01", "label-WM_probseg") > 0.95
    csf = truth_map(phantom_dir, "ses-01", "label-CSF_probseg") > 0.95
    lesion = truth_map(phantom_dir, "ses-01", "label-lesion_probseg") > 0.95
    anat = phantom_dir / "sub-01/ses-01/anat"
    flair = load(anat / "sub-01_ses-01_FLAIR.nii.gz")
    t1w = load(anat / "sub-01_ses-01_T1w.nii.gz")
    assert flair[lesion].mean() > flair[wm].mean() > flair[csf].mean()
    assert t1w[wm].mean() > t1w[lesion].mean() and t1w[wm].mean() > t1w[csf].mean()


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    cfg = PhantomConfig(resolution_mm=4.0, sessions=1, lesions=4, seed=11)
    a, b = generate_dataset(tmp_path / "a", cfg), generate_dataset(tmp_path / "b", cfg)
    c = generate_dataset(
        tmp_path / "c", PhantomConfig(resolution_mm=4.0, sessions=1, lesions=4, seed=12)
    )
    rel = "sub-01/ses-01/anat/sub-01_ses-01_echo-1_part-phase_MEGRE.nii.gz"
    np.testing.assert_array_equal(load(a / rel), load(b / rel))
    assert not np.array_equal(load(a / rel), load(c / rel))
    lesions = "derivatives/truth/sub-01/sub-01_desc-lesions_truth.tsv"
    assert (a / lesions).read_text() == (b / lesions).read_text()


def test_flair_inflow_brightens_csf_on_the_flair_only(tmp_path: Path) -> None:
    cfg = PhantomConfig(resolution_mm=4.0, sessions=1, lesions=4, seed=11)
    plain = generate_dataset(tmp_path / "plain", cfg)
    inflow = generate_dataset(
        tmp_path / "inflow", PhantomConfig(**{**cfg.__dict__, "flair_inflow": 0.4})
    )
    anat, truth = (
        "sub-01/ses-01/anat/sub-01_ses-01",
        "derivatives/truth/sub-01/ses-01/anat/sub-01_ses-01",
    )
    tissue = load(plain / f"{truth}_space-T1w_desc-tissue_dseg.nii.gz")
    np.testing.assert_array_equal(
        tissue, load(inflow / f"{truth}_space-T1w_desc-tissue_dseg.nii.gz")
    )
    csf, wm = tissue == 1, tissue == 3
    flair_plain, flair_inflow = (
        load(plain / f"{anat}_FLAIR.nii.gz"),
        load(inflow / f"{anat}_FLAIR.nii.gz"),
    )
    wm_level = np.median(flair_plain[wm])
    # CSF is nulled without inflow; with it, part of the CSF is as bright as white matter or more
    assert np.mean(flair_plain[csf] > 0.6 * wm_level) < 0.05
    assert 0.1 < np.mean(flair_inflow[csf] > 0.6 * wm_level) < 0.6
    # the white matter's FLAIR is not touched (beyond noise), and the T1w keeps CSF dark
    assert np.median(flair_inflow[wm]) == pytest.approx(wm_level, rel=0.05)
    t1 = load(inflow / f"{anat}_T1w.nii.gz")
    assert np.percentile(t1[csf], 90) < 0.6 * np.median(t1[wm])
    with pytest.raises(ValueError, match="flair_inflow"):
        PhantomConfig(flair_inflow=1.5)


@pytest.mark.slow
def test_bids_validator_finds_no_errors(phantom_dir: Path) -> None:
    """The raw phantom passes the official BIDS validator (npm bids-validator)."""
    root = Path(__file__).resolve().parents[1]
    exe = root / ".ci" / "node_modules" / ".bin" / "bids-validator"
    exe_path = str(exe) if exe.exists() else shutil.which("bids-validator")
    if exe_path is None:
        pytest.skip("bids-validator not installed (make test installs it when npm is present)")
    proc = subprocess.run(
        [exe_path, "--json", str(phantom_dir)], capture_output=True, text=True, timeout=600
    )
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["issues"]["errors"] == [], report["issues"]["errors"]


# ------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("shape", [(9, 9, 9), (12, 7, 5)])
def test_sdf_of_box(shape: tuple[int, int, int]) -> None:
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 1:-1] = True
    sdf = sdf_from_mask(mask, 1.0)
    assert np.all(sdf[mask] < 0) and np.all(sdf[~mask] > 0)


@pytest.mark.parametrize("volume_ml", [0.01, 0.3, 3.0])
def test_blob_volume(volume_ml: float) -> None:
    patch = blob_sdf(np.random.default_rng(0), volume_ml)
    measured = (patch.data <= 0).sum() * patch.spacing_mm**3 / 1000
    assert measured == pytest.approx(volume_ml, rel=0.35)


def test_random_diffeomorphism_has_no_folds() -> None:
    rng = np.random.default_rng(1)
    vel = smooth_random_velocity((24, 24, 24), rng, max_voxels=3.0, smoothness_voxels=3.0)
    jac = jacobian_determinant(exponentiate(vel))
    assert jac.min() > 0


def test_poisson_velocity_has_prescribed_divergence() -> None:
    source = np.zeros((32, 32, 32), np.float32)
    source[10:20, 10:20, 10:20] = -0.01
    source[source == 0] = 0.01 * 1000 / (32**3 - 1000)
    vel = gradient_of_poisson(source, (1.0, 1.0, 1.0))
    div = sum(np.gradient(vel[i], axis=i) for i in range(3))
    inner = div[12:18, 12:18, 12:18]
    assert inner.mean() == pytest.approx(-0.01, rel=0.05)


@pytest.mark.realdata
def test_label_map_anatomy_and_real_lesion_shapes(shared_data: Path, tmp_path: Path) -> None:
    """SynthSeg label maps as anatomy and real MS lesion masks as shapes (../shared/data)."""
    cfg = PhantomConfig(
        resolution_mm=4.0,
        sessions=2,
        lesions=6,
        new_lesions_per_session=1,
        seed=5,
        anatomy=str(shared_data / "synthseg_label_maps" / "training_seg_01.nii.gz"),
        lesion_masks=str(shared_data / "open_ms" / "lesion_masks_mni"),
    )
    root = generate_dataset(tmp_path / "ph", cfg)
    rows = read_tsv(root / TRUTH / "sub-01_desc-lesions_truth.tsv")
    assert any(r["shape_source"].startswith("patient") for r in rows)
    atrophy = read_tsv(root / TRUTH / "sub-01_desc-atrophy_truth.tsv")
    assert abs(float(atrophy[1]["pbvc_per_year_pct"]) - cfg.pbvc_per_year) < 0.02
    params = json.loads((root / TRUTH / "sub-01_phantom.json").read_text())
    assert "training_seg_01" in params["anatomy"]


def test_infratentorial_candidates_lie_below_the_tentorium() -> None:
    """The phantom's infratentorial lesions go into cerebellum and brainstem, not into the
    temporal lobes' white matter, which reaches as low; checked against the shipped prior
    (built independently, from 20 SynthSeg label maps)."""
    from smoulder.grids import sample_world
    from smoulder.phantom.anatomy import load_anatomy
    from smoulder.phantom.lesions import location_candidates
    from smoulder.segmentation.atlas import infratentorial_prior

    candidates = location_candidates(load_anatomy(2.0))
    prior = infratentorial_prior()
    below = sample_world(prior, candidates["infratentorial"]) >= 0.5
    assert len(below) > 500
    assert below.mean() > 0.98, below.mean()
    for location in ("periventricular", "juxtacortical", "deep"):
        assert (sample_world(prior, candidates[location]) >= 0.5).mean() < 0.02, location
