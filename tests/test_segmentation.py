"""Segmentation: synthesis, the bundle, inference on a phantom and the command line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from smoulder.cli import main
from smoulder.errors import ConfigError, InputError
from smoulder.phantom.dataset import generate_dataset
from smoulder.phantom.generate import PhantomConfig
from smoulder.segmentation import synth
from smoulder.segmentation.inference import segment
from smoulder.segmentation.network import NetworkDef, bundle_dir, load_bundle, save_bundle

SES = "sub-01/ses-01/anat/sub-01_ses-01"


@pytest.fixture(scope="module")
def phantom_2mm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 mm phantom, one subject, one session, with lesions of every size."""
    cfg = PhantomConfig(resolution_mm=2.0, subjects=1, sessions=1, lesions=12, seed=5)
    return generate_dataset(tmp_path_factory.mktemp("seg-phantom"), cfg)


@pytest.fixture(scope="module")
def label_maps(shared_data: Path, label_map_dir: Path):
    shapes = synth.load_lesion_shapes(shared_data / "open_ms" / "lesion_masks_mni")
    return synth.load_label_maps(label_map_dir), shapes


def _truth(root: Path, name: str) -> np.ndarray:
    """Truth of the phantom (on the T1w grid, which is the FLAIR's when slices are not thicker)."""
    path = root / "derivatives" / "truth" / f"{SES}_space-T1w_{name}.nii.gz"
    return np.asarray(nib.load(path).dataobj)


# ----------------------------------------------------------------------------------- synthesis


def test_synth_sample_is_seeded_and_lesions_sit_on_white_matter(label_maps) -> None:
    maps, shapes = label_maps
    s = synth.SynthSettings(patch=32, lesions_per_patch=(6, 6), p_wm_centre=1.0)
    x1, y1 = synth.synth_sample(np.random.default_rng(1), maps, shapes, s)
    x2, y2 = synth.synth_sample(np.random.default_rng(1), maps, shapes, s)
    assert x1.shape == (3, 32, 32, 32) and y1.shape == (32, 32, 32)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert set(np.unique(y1)) <= set(range(len(synth.CLASSES)))
    assert np.isfinite(x1).all() and x1[0].max() > 0
    # a flag of 0 comes with an empty T1 channel, a flag of 1 with a painted one
    assert (x1[synth.T1_FLAG].max() == 0) == (x1[1].max() == 0)


def test_flair_lesions_range_from_cortex_bright_to_far_brighter_and_vary() -> None:
    """Real FLAIR lesions are often about as bright as cortex; training must include them."""
    lut = synth.class_lookup()
    labels = np.array([2, 3, 10, synth.LESION_LABEL])  # WM, cortex, deep GM, lesion
    rng = np.random.default_rng(0)
    below_cortex = over_wm = 0
    for _ in range(400):
        m = synth._class_means(rng, labels, synth.FLAIR_PRIOR, lut)
        lesion, wm, gm = m[synth.LESION_LABEL], m[2], max(m[3], m[10])
        assert lesion > 0.95 * wm  # hyperintense on FLAIR (up to the per-label jitter)
        below_cortex += lesion < gm
        over_wm += lesion > 1.8 * wm
    assert 0.05 < below_cortex / 400 < 0.5  # sometimes iso- or slightly hypo- to cortex
    assert over_wm > 20  # and sometimes far brighter
    # lesions differ in brightness from each other; white-matter regions of the same size do not
    grid = np.full((32, 32, 32), 2, np.int64)
    a, b = np.s_[4:12, 4:12, 4:12], np.s_[20:28, 20:28, 20:28]
    grid[a] = grid[b] = synth.LESION_LABEL
    wm_a, wm_b = np.s_[4:12, 20:28, 4:12], np.s_[20:28, 4:12, 20:28]
    full = synth.LabelMap.from_array(grid.astype(np.uint16))
    s = synth.SynthSettings(noise=(0.0, 0.0), bias=0.0, gamma=0.0)
    lesion_gap, wm_gap = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        img = synth._paint(rng, grid, full, synth.FLAIR_PRIOR, lut, False, s)
        lesion_gap.append(abs(np.log(img[a].mean() / img[b].mean())))
        wm_gap.append(abs(np.log(img[wm_a].mean() / img[wm_b].mean())))
    assert np.mean(lesion_gap) > 0.05 > 5 * np.mean(wm_gap)


def test_bright_csf_is_flair_bright_t1_dark_and_stays_csf(label_maps) -> None:
    """Unnulled CSF and choroid plexus: as bright as lesions on FLAIR, CSF on T1, class CSF."""
    lut = synth.class_lookup()
    labels = np.array([2, 4, synth.CSF_ARTIFACT_LABEL])  # WM, ventricle, bright CSF
    rng = np.random.default_rng(0)
    for _ in range(50):
        flair = synth._class_means(rng, labels, synth.FLAIR_PRIOR, lut)
        t1 = synth._class_means(rng, labels, synth.T1_PRIOR, lut)
        assert flair[synth.CSF_ARTIFACT_LABEL] >= 0.7 * flair[2] > flair[4]
        assert t1[synth.CSF_ARTIFACT_LABEL] < 0.5 * t1[2]
    # in a sample: part of the CSF turns bright, and the target is still CSF
    maps, shapes = label_maps
    s = synth.SynthSettings(patch=32, p_csf_artifact=1.0, csf_artifact_share=(0.3, 0.3))
    brighter = []
    for seed in range(6):
        x, y = synth.synth_sample(np.random.default_rng(seed), maps, shapes, s)
        csf, wm = y == synth.CLASSES.index("CSF"), y == synth.CLASSES.index("WM")
        assert y.max() < len(synth.CLASSES)  # the bright CSF label maps to a class
        if csf.sum() > 200 and wm.sum() > 200:
            brighter.append(np.percentile(x[0][csf], 95) > np.median(x[0][wm]))
    assert brighter and np.mean(brighter) > 0.5
    # off by default: the recipes of the shipped weights draw the same samples as before
    assert synth.SynthSettings().p_csf_artifact == 0.0


def test_pasted_lesions_only_replace_white_matter() -> None:
    labels = np.zeros((20, 20, 20), np.uint16)
    labels[5:15, 5:15, 5:15] = 2  # WM
    labels[5:15, 5:15, 5:8] = 3  # cortex
    shape = np.ones((6, 6, 6), bool)
    out = synth.paste_lesions(labels, [shape], np.random.default_rng(0), 5)
    assert (out == synth.LESION_LABEL).any()
    assert np.all(labels[out == synth.LESION_LABEL] == 2)
    assert np.array_equal(out[labels != 2], labels[labels != 2])


# -------------------------------------------------------------------------------------- bundle


def test_bundle_round_trip_and_clear_errors(tmp_path: Path) -> None:
    net_def = NetworkDef(channels=(4, 8), strides=(2,))
    net = net_def.build()
    root = save_bundle(tmp_path / "b", net.state_dict(), net_def, version="9.9.9")
    bundle = load_bundle(root)
    assert bundle.version == "9.9.9"
    x = torch.rand(1, 3, 16, 16, 16)
    with torch.inference_mode():
        ref = net.eval()(x)
        np.testing.assert_allclose(bundle.network(x), ref, atol=2e-2)  # half-precision weights
    weights = root / "models" / "model.pt"
    # weights of another network: named, with what was expected
    save_bundle(tmp_path / "other", NetworkDef((8, 16), (2,)).build().state_dict(), net_def)
    other = tmp_path / "other" / "models" / "model.pt"
    shutil.copy(other, weights)
    with pytest.raises(InputError, match=r"model\.pt: expected weights of the network"):
        load_bundle(root)
    weights.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match=r"model\.pt: expected PyTorch weights"):
        load_bundle(root)
    weights.unlink()
    with pytest.raises(InputError, match=r"model\.pt: expected a file of the MONAI bundle"):
        load_bundle(root)


def test_shipped_bundle_is_complete() -> None:
    root = bundle_dir()
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt",
                 "docs/README.md"):  # fmt: skip
        assert (root / name).is_file(), name
    assert (root / "models" / "model.pt").stat().st_size < 10_000_000


# ----------------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def phantom_result(phantom_2mm: Path):
    flair = nib.load(phantom_2mm / f"{SES}_FLAIR.nii.gz")
    t1 = nib.load(phantom_2mm / f"{SES}_T1w.nii.gz")
    return flair, segment(flair, t1), segment(flair)


def test_inference_finds_the_phantom_lesions(phantom_2mm: Path, phantom_result) -> None:
    flair, with_t1, flair_only = phantom_result
    truth = _truth(phantom_2mm, "desc-lesions_dseg")
    for result in (with_t1, flair_only):
        found = np.asarray(result.instances.dataobj) > 0
        assert result.dseg.shape == flair.shape
        big = [i for i in np.unique(truth) if i > 0 and (truth == i).sum() * 8 >= 100]
        hit = [i for i in big if found[truth == i].any()]
        assert len(hit) >= 0.7 * len(big), (len(hit), len(big))
        # the lesion table describes the instance map: one row per lesion, by ID
        ids = [int(i) for i in np.unique(np.asarray(result.instances.dataobj)) if i > 0]
        assert [row["index"] for row in result.lesion_rows] == ids
    assert with_t1.used_t1 and not flair_only.used_t1


def test_brain_and_tissues_match_the_phantom(phantom_2mm: Path, phantom_result) -> None:
    """Regression guards at 2 mm, FLAIR + T1 (measured: brain 0.990, GM 0.927, WM 0.900,
    lesion 0.862; the raw network without refinement: 0.844, 0.612, 0.604, 0.604)."""
    _, result, _ = phantom_result
    tissue = _truth(phantom_2mm, "desc-tissue_dseg")
    dseg = np.asarray(result.dseg.dataobj)

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    brain = np.asarray(result.brain_mask.dataobj) > 0
    assert dice(brain, _truth(phantom_2mm, "desc-brain_mask") > 0) > 0.96
    assert dice(np.isin(dseg, (2, 3)), tissue == 2) > 0.88
    assert dice(dseg == 4, tissue == 3) > 0.86
    assert dice(dseg == 5, _truth(phantom_2mm, "desc-lesions_dseg") > 0) > 0.75


def test_lesions_are_stable_under_reorientation(phantom_2mm: Path, phantom_result) -> None:
    """Axes swapped and flipped: the same lesion voxels, to 0.1 %.

    Resampling the flipped array differs in the last bits of floating point, which moves a few
    boundary voxels. IDs follow world position and are identical for identical masks
    (``tests/test_lesions.py``); through the network they are not yet guaranteed: a lesion at
    the size threshold, or a confluent lesion split at a core of nearly 0.9, can renumber the
    others (issue 5, open).
    """
    flair, _, flair_only = phantom_result
    ornt = np.array([[1, -1], [0, 1], [2, -1]])
    again = segment(flair.as_reoriented(ornt))
    back = np.asarray(again.instances.as_reoriented(ornt).dataobj)
    first = np.asarray(flair_only.instances.dataobj)
    assert back.shape == first.shape and (first > 0).any()
    assert ((back > 0) != (first > 0)).mean() < 1e-3


def test_bad_input_is_named(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(InputError, match="expected a FLAIR with signal"):
        segment(img)


# -------------------------------------------------------------------------------- command line


def test_segment_command_writes_bids_outputs(phantom_2mm: Path, tmp_path: Path) -> None:
    flair = phantom_2mm / f"{SES}_FLAIR.nii.gz"
    assert main(["segment", str(flair), "-o", str(tmp_path), "--prefix", "sub-01_"]) == 0
    for name in ("desc-brain_mask.nii.gz", "dseg.nii.gz", "dseg.tsv", "label-GM_probseg.nii.gz",
                 "label-lesion_probseg.nii.gz", "desc-lesions_dseg.nii.gz",
                 "desc-lesions_stats.tsv", "desc-lesions_stats.json"):  # fmt: skip
        assert (tmp_path / f"sub-01_{name}").is_file(), name
    rows = list(csv.DictReader((tmp_path / "sub-01_desc-lesions_stats.tsv").open(), delimiter="\t"))
    assert rows and {"index", "volume_ul", "location"} <= set(rows[0])
    side = json.loads((tmp_path / "sub-01_dseg.json").read_text())
    assert side["Settings"] == {"refine": True, "lesion_prior_floor": 0.1, "min_lesion_ul": 10.0,
                                "min_lesion_voxels": 3, "screen_candidates": True}  # fmt: skip
    # no lesion kept: an empty table (header only), not a crash; the settings say why
    out = tmp_path / "none"
    cmd = ["segment", str(flair), "-o", str(out), "--min-lesion-ul", "1e9"]
    assert main([*cmd, "--lesion-prior-floor", "0"]) == 0
    lines = (out / "desc-lesions_stats.tsv").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("index")
    side = json.loads((out / "dseg.json").read_text())["Settings"]
    assert side["lesion_prior_floor"] == 0.0 and side["min_lesion_ul"] == 1e9


def test_train_command_resumes_and_refuses_another_recipe(tmp_path: Path,
                                                          label_map_dir: Path) -> None:  # fmt: skip
    args = ["train", "segmentation", str(tmp_path / "run"), "--iterations", "2", "--batch", "1",
            "--patch", "32", "--channels", "4,8", "--validate-every", "2", "--label-maps",
            str(label_map_dir), "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 2
    assert load_bundle(tmp_path / "run" / "bundle").network is not None
    with pytest.raises(ConfigError, match="expected the recipe this run was started with"):
        from smoulder.segmentation.command import run_train

        run_train([*args[1:-4], "--learning-rate", "0.1", *args[-4:]])


@pytest.mark.parametrize(
    "case", ["identity", "las-flip", "permuted-shifted", "anisotropic", "half-voxel", "oblique"]
)
def test_resampling_shortcuts_match_the_general_interpolation(case: str) -> None:
    from scipy import ndimage as ndi

    from smoulder.grids import resample_to_grid

    rng = np.random.default_rng(3)
    data = rng.random((9, 11, 7)).astype(np.float32)
    src = np.eye(4)
    if case == "las-flip":
        src = np.diag([-1.0, 1, 1, 1])
        src[0, 3] = 8.0
    elif case == "permuted-shifted":
        src = np.array([[0, 0, 1, 2.0], [-1, 0, 0, 5], [0, 1, 0, -3], [0, 0, 0, 1]])
    elif case == "anisotropic":
        src = np.diag([0.9, 1.0, 3.0, 1])
    elif case == "half-voxel":
        src[:3, 3] = [0.5, -0.5, 0.25]
    elif case == "oblique":
        c, s = np.cos(0.2), np.sin(0.2)
        src[:2, :2] = [[c, -s], [s, c]]
    dst = np.eye(4)
    dst[:3, 3] = [-1.0, 0.0, 2.0]
    m = np.linalg.inv(src) @ dst
    shape = (10, 12, 9)
    general = ndi.affine_transform(data, m[:3, :3], m[:3, 3], output_shape=shape, order=1)
    np.testing.assert_allclose(resample_to_grid(data, src, shape, dst), general, atol=1e-5)
