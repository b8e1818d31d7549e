"""Tests of lesion instances, stable IDs, the lesion table and its TSV, and lesion filling."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from smoulder.segmentation.lesions import (
    LESION_COLUMNS,
    LOCATIONS,
    TISSUE_LABELS,
    fill_lesions,
    lesion_instances,
    lesion_table,
    write_lesion_stats,
)

SHAPE = (48, 40, 40)


def distance_mm(
    shape: tuple[int, ...], center: tuple[float, ...], zooms: tuple[float, ...] = (1, 1, 1)
) -> np.ndarray:
    """Return each voxel's distance (mm) from the voxel position ``center``."""
    grid = np.indices(shape, dtype=float)
    return np.sqrt(sum(((g - c) * z) ** 2 for g, c, z in zip(grid, center, zooms, strict=True)))


def blob(
    center: tuple[float, ...],
    sigma_mm: float,
    peak: float = 0.98,
    shape: tuple[int, ...] = SHAPE,
    zooms: tuple[float, ...] = (1, 1, 1),
) -> np.ndarray:
    """Return a Gaussian probability blob (``peak`` at ``center``) as float32."""
    r = distance_mm(shape, center, zooms)
    return (peak * np.exp(-(r**2) / (2 * sigma_mm**2))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------------


def test_two_separate_blobs_are_two_lesions() -> None:
    prob = np.maximum(blob((12, 20, 20), 3.0), blob((34, 20, 20), 3.0))
    inst = lesion_instances(prob, np.eye(4))
    assert inst.dtype == np.int32
    assert sorted(np.unique(inst).tolist()) == [0, 1, 2]
    assert inst[12, 20, 20] != inst[34, 20, 20]


@pytest.mark.parametrize(
    ("n_voxels", "kept"),
    [(6, False), (7, True)],  # at 0.5 × 1 × 3 mm: 9 µl is under 10 µl, 10.5 µl is not
)
def test_lesions_under_min_volume_are_dropped_by_volume_not_voxel_count(
    n_voxels: int, kept: bool
) -> None:
    prob = np.zeros((20, 10, 10), np.float32)
    prob[2 : 2 + n_voxels, 5, 5] = 1.0
    inst = lesion_instances(prob, np.diag([0.5, 1.0, 3.0, 1.0]))
    assert int(inst.max()) == int(kept)


@pytest.mark.parametrize(("n_voxels", "kept"), [(1, False), (2, False), (3, True)])
def test_on_a_coarse_grid_isolated_voxels_are_not_lesions(n_voxels: int, kept: bool) -> None:
    # at 3 mm one voxel is 27 µl, far above the 10-µl minimum: the voxel count decides
    prob = np.zeros((12, 12, 12), np.float32)
    prob[5 : 5 + n_voxels, 5, 5] = 0.95
    prob[0, 0, 0] = prob[11, 11, 11] = 0.99  # isolated single voxels: noise
    inst = lesion_instances(prob, np.diag([3.0, 3.0, 3.0, 1.0]))
    assert int(inst.max()) == int(kept)
    assert inst[0, 0, 0] == inst[11, 11, 11] == 0


def test_min_voxels_must_be_a_positive_whole_number() -> None:
    with pytest.raises(ValueError, match="min_voxels"):
        lesion_instances(np.zeros((4, 4, 4), np.float32), np.eye(4), min_voxels=0)


def test_tiny_blob_is_removed_and_large_one_kept() -> None:
    prob = blob((20, 20, 20), 3.0)
    prob[40:42, 5:7, 5:7] = 0.99  # 8 µl
    inst = lesion_instances(prob, np.eye(4))
    assert int(inst.max()) == 1
    assert not inst[40:42, 5:7, 5:7].any()


def two_cores(second_peak: float = 0.97) -> np.ndarray:
    """Return two overlapping spheres (p ≥ 0.5) with cores ≥ 0.9 joined by a p ≈ 0.6 bridge."""
    return np.maximum(blob((18, 20, 20), 6.0), blob((30, 20, 20), 6.0, peak=second_peak))


def test_confluent_lesion_with_two_cores_is_split() -> None:
    prob = two_cores()
    assert prob[24, 20, 20] > 0.5  # one connected component ...
    assert prob[24, 20, 20] < 0.9  # ... through a lower-probability bridge
    inst = lesion_instances(prob, np.eye(4))
    assert int(inst.max()) == 2
    left, right = int(inst[18, 20, 20]), int(inst[30, 20, 20])
    assert {left, right} == {1, 2}
    # the parts meet at the probability valley, halfway between the cores
    assert inst[22, 20, 20] == left and inst[26, 20, 20] == right
    # every voxel of the component is kept
    assert np.array_equal(inst > 0, lesion_instances(prob, np.eye(4), split=False) > 0)


def test_split_can_be_turned_off() -> None:
    inst = lesion_instances(two_cores(), np.eye(4), split=False)
    assert int(inst.max()) == 1


def test_single_blob_with_one_core_is_not_split() -> None:
    inst = lesion_instances(blob((24, 20, 20), 6.0), np.eye(4))
    assert int(inst.max()) == 1


def test_core_under_min_core_volume_does_not_split() -> None:
    prob = two_cores(second_peak=0.905)  # second core: the centre voxel alone, 1 µl
    assert np.count_nonzero(prob[24:, :, :] >= 0.9) == 1
    assert int(lesion_instances(prob, np.eye(4)).max()) == 1
    assert int(lesion_instances(prob, np.eye(4), min_core_ul=1.0).max()) == 2


def test_split_that_would_leave_a_part_under_min_volume_is_undone() -> None:
    prob = two_cores()
    union_ul = np.count_nonzero(prob >= 0.5)
    # each half is about half the union: asking for more than that keeps the lesion whole
    inst = lesion_instances(prob, np.eye(4), min_volume_ul=0.6 * union_ul)
    assert int(inst.max()) == 1


def test_core_threshold_must_exceed_threshold() -> None:
    with pytest.raises(ValueError, match="core_threshold"):
        lesion_instances(two_cores(), np.eye(4), threshold=0.6, core_threshold=0.5)


def test_ids_follow_world_position_and_survive_axis_permutation_and_flip() -> None:
    zooms = (1.0, 1.5, 2.0)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-20.0, -30.0, -35.0)
    centres = [(10, 8, 30), (36, 12, 6), (20, 30, 18), (38, 28, 28)]
    prob = np.max([blob(c, 3.5, zooms=zooms) for c in centres], axis=0)
    img = nib.Nifti1Image(prob, affine)
    inst = lesion_instances(prob, affine)
    rows = lesion_table(inst, affine, prob)
    assert [r["index"] for r in rows] == [1, 2, 3, 4]
    # IDs go inferior to superior
    z = [r["centroid_z_mm"] for r in rows]
    assert z == sorted(z)

    # the same image with axes permuted and two of them flipped (affine to match)
    ornt = np.array([[2, -1], [0, 1], [1, -1]])
    moved = img.as_reoriented(ornt)
    moved_prob = np.asarray(moved.dataobj)
    assert moved_prob.shape == (SHAPE[1], SHAPE[2], SHAPE[0])
    moved_inst = lesion_instances(moved_prob, moved.affine)
    moved_rows = lesion_table(moved_inst, moved.affine, moved_prob)
    for a, b in zip(rows, moved_rows, strict=True):
        assert a["index"] == b["index"]
        assert a["n_voxels"] == b["n_voxels"]
        for key in ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm"):
            assert a[key] == pytest.approx(b[key], abs=1e-6)
    # and voxel by voxel, brought back onto the first grid
    back_ornt = nib.orientations.ornt_transform(
        nib.io_orientation(moved.affine), nib.io_orientation(affine)
    )
    back = nib.Nifti1Image(moved_inst, moved.affine).as_reoriented(back_ornt)
    assert np.allclose(back.affine, affine)
    assert np.array_equal(np.asarray(back.dataobj), inst)


def test_empty_probability_gives_no_lesions_and_a_header_only_table(tmp_path: Path) -> None:
    prob = np.zeros((10, 10, 10), np.float32)
    inst = lesion_instances(prob, np.eye(4))
    assert inst.shape == prob.shape and not inst.any()
    rows = lesion_table(inst, np.eye(4), prob)
    assert rows == []
    tsv = write_lesion_stats(rows, tmp_path / "sub-01_desc-lesions_stats.tsv")
    assert tsv.read_text() == "\t".join(LESION_COLUMNS) + "\n"
    sidecar = json.loads(tsv.with_suffix(".json").read_text())
    assert list(sidecar) == list(LESION_COLUMNS)
    assert set(sidecar["location"]["Levels"]) == set(LOCATIONS)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


# --------------------------------------------------------------------------------------------
# Table and TSV
# --------------------------------------------------------------------------------------------


def test_table_volumes_and_centroids_with_anisotropic_voxels() -> None:
    affine = np.diag([0.5, 1.0, 3.0, 1.0])
    affine[:3, 3] = (10.0, -5.0, 2.0)
    prob = np.zeros((20, 12, 8), np.float32)
    prob[4:8, 2:7, 3:5] = 0.7  # 4 × 5 × 2 = 40 voxels of 1.5 µl
    prob[5, 4, 3] = 1.0
    inst = lesion_instances(prob, affine)
    (row,) = lesion_table(inst, affine, prob)
    assert row["n_voxels"] == 40
    assert row["volume_ul"] == pytest.approx(60.0)
    assert (row["centroid_i"], row["centroid_j"], row["centroid_k"]) == (5.5, 4.0, 3.5)
    assert row["centroid_x_mm"] == pytest.approx(10.0 + 0.5 * 5.5)
    assert row["centroid_y_mm"] == pytest.approx(-5.0 + 4.0)
    assert row["centroid_z_mm"] == pytest.approx(2.0 + 3.0 * 3.5)
    assert row["max_probability"] == pytest.approx(1.0)
    assert row["mean_probability"] == pytest.approx((39 * 0.7 + 1.0) / 40, abs=1e-6)
    assert row["location"] == "unknown"
    assert list(row) == list(LESION_COLUMNS)


def test_table_without_probability_writes_na(tmp_path: Path) -> None:
    inst = np.zeros((8, 8, 8), np.int16)
    inst[1:3, 1:3, 1:3] = 4  # IDs need not be contiguous
    rows = lesion_table(inst, np.eye(4))
    assert rows[0]["index"] == 4 and rows[0]["mean_probability"] is None
    tsv = write_lesion_stats(rows, tmp_path / "lesions.tsv")
    (read,) = list(csv.DictReader(tsv.open(), delimiter="\t"))
    assert read["mean_probability"] == "n/a" and read["index"] == "4"
    assert read["volume_ul"] == "8.0"


def test_written_table_reads_back(tmp_path: Path) -> None:
    prob = np.maximum(blob((12, 20, 20), 3.0), blob((34, 20, 20), 3.0))
    rows = lesion_table(lesion_instances(prob, np.eye(4)), np.eye(4), prob)
    tsv = write_lesion_stats(rows, tmp_path / "out" / "lesions.tsv")
    read = list(csv.DictReader(tsv.open(), delimiter="\t"))
    assert [int(r["index"]) for r in read] == [1, 2]
    for r, row in zip(read, rows, strict=True):
        assert float(r["volume_ul"]) == pytest.approx(row["volume_ul"])
        assert float(r["centroid_x_mm"]) == pytest.approx(row["centroid_x_mm"], abs=1e-4)
    sidecar = json.loads((tmp_path / "out" / "lesions.json").read_text())
    assert sidecar["volume_ul"]["Units"] == "uL"
    assert all("Description" in v for v in sidecar.values())


@pytest.mark.parametrize(
    ("name", "rows", "match"),
    [
        ("lesions.csv", [], "ending in .tsv"),
        ("lesions.tsv", [{"index": 1}], "missing"),
    ],
)
def test_write_lesion_stats_rejects_bad_input(
    tmp_path: Path, name: str, rows: list[dict], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        write_lesion_stats(rows, tmp_path / name)


def test_table_rejects_maps_of_another_shape() -> None:
    inst = np.zeros((8, 8, 8), np.int32)
    with pytest.raises(ValueError, match="tissue_dseg: expected the shape"):
        lesion_table(inst, np.eye(4), tissue_dseg=np.zeros((8, 8, 9), np.int32))


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------

BRAIN_SHAPE = (64, 64, 64)
LESIONS = {
    # name: (box, expected location)
    "periventricular": ((slice(30, 35), slice(36, 40), slice(30, 35)), "periventricular"),
    "juxtacortical": ((slice(6, 10), slice(30, 35), slice(30, 35)), "juxtacortical"),
    "deep": ((slice(30, 35), slice(17, 21), slice(30, 35)), "deep_white_matter"),
    "beside_pvs": ((slice(31, 35), slice(47, 51), slice(31, 35)), "deep_white_matter"),
    "infratentorial": ((slice(30, 35), slice(30, 35), slice(10, 14)), "infratentorial"),
    # in the cortex, 2 mm from the outer CSF: that CSF is no ventricle
    "cortical": ((slice(31, 34), slice(31, 34), slice(58, 61)), "juxtacortical"),
    # deep, inside a one-voxel shell of "grey matter" (the partial-volume edge segmentations
    # leave around lesions): that shell is no cortex
    "deep_shelled": ((slice(20, 24), slice(40, 44), slice(40, 44)), "deep_white_matter"),
}
VENTRICLE = (slice(22, 42), slice(29, 35), slice(29, 35))
PVS = (slice(32, 34), slice(45, 47), slice(32, 34))  # 8 µl of CSF inside white matter


def synthetic_brain() -> tuple[np.ndarray, np.ndarray, dict[str, tuple[int, int, int]]]:
    """Return ``(tissue dseg, instance map, lesion name → a voxel of it)`` of a ball brain."""
    r = distance_mm(BRAIN_SHAPE, (32, 32, 32))
    labels = TISSUE_LABELS
    dseg = np.full(BRAIN_SHAPE, labels["background"], np.int32)
    dseg[r <= 31] = labels["csf"]  # outer CSF: touches background and cortex
    dseg[r <= 29] = labels["cortical_gm"]
    dseg[r <= 26] = labels["wm"]
    dseg[VENTRICLE] = labels["csf"]
    dseg[PVS] = labels["csf"]
    mask = np.zeros(BRAIN_SHAPE, np.float32)
    for box, _ in LESIONS.values():
        mask[box] = 1.0
    shelled = np.zeros(BRAIN_SHAPE, bool)
    shelled[LESIONS["deep_shelled"][0]] = True
    dseg[ndimage.binary_dilation(shelled, structure=np.ones((3, 3, 3)))] = labels["cortical_gm"]
    dseg[mask > 0] = labels["lesion"]
    inst = lesion_instances(mask, np.eye(4))
    voxels = {name: tuple(s.start + 1 for s in box) for name, (box, _) in LESIONS.items()}
    return dseg, inst, voxels  # type: ignore[return-value]


def test_locations_on_a_synthetic_tissue_map() -> None:
    dseg, inst, voxels = synthetic_brain()
    infratentorial = np.zeros(BRAIN_SHAPE, bool)
    infratentorial[:, :, :16] = True
    rows = lesion_table(inst, np.eye(4), None, dseg, infratentorial_mask=infratentorial)
    by_id = {r["index"]: r["location"] for r in rows}
    for name, (_, expected) in LESIONS.items():
        assert by_id[int(inst[voxels[name]])] == expected, name


def test_without_infratentorial_mask_a_lesion_is_placed_by_tissue() -> None:
    dseg, inst, voxels = synthetic_brain()
    rows = lesion_table(inst, np.eye(4), tissue_dseg=dseg)
    by_id = {r["index"]: r["location"] for r in rows}
    assert by_id[int(inst[voxels["infratentorial"]])] == "deep_white_matter"


def test_ventricle_mask_overrides_the_csf_heuristic() -> None:
    dseg, inst, voxels = synthetic_brain()
    ventricles = np.zeros(BRAIN_SHAPE, bool)
    ventricles[PVS] = True
    rows = lesion_table(inst, np.eye(4), tissue_dseg=dseg, ventricle_mask=ventricles)
    by_id = {r["index"]: r["location"] for r in rows}
    assert by_id[int(inst[voxels["beside_pvs"]])] == "periventricular"
    assert by_id[int(inst[voxels["periventricular"]])] == "deep_white_matter"


def test_without_tissue_map_location_is_unknown() -> None:
    _, inst, _ = synthetic_brain()
    assert {r["location"] for r in lesion_table(inst, np.eye(4))} == {"unknown"}


def test_tissue_labels_must_name_the_classes_used() -> None:
    dseg, inst, _ = synthetic_brain()
    with pytest.raises(ValueError, match="cortical_gm"):
        lesion_table(inst, np.eye(4), tissue_dseg=dseg, tissue_labels={"background": 0, "csf": 1})


# --------------------------------------------------------------------------------------------
# Lesion filling
# --------------------------------------------------------------------------------------------


def filling_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(t1, lesion mask, wm mask)``: WM ~ N(100, 5) in GM at 60, a lesion at 40."""
    rng = np.random.default_rng(7)
    shape = (40, 40, 40)
    t1 = rng.normal(60.0, 5.0, shape).astype(np.float32)
    wm = np.zeros(shape, bool)
    wm[8:32, 8:32, 8:32] = True
    t1[wm] = rng.normal(100.0, 5.0, int(wm.sum()))
    lesion = distance_mm(shape, (20, 20, 20)) <= 4.0
    t1[lesion] = 40.0
    return t1, lesion, wm


def test_filled_lesion_looks_like_white_matter_and_the_rest_is_unchanged() -> None:
    t1, lesion, wm = filling_case()
    filled = fill_lesions(t1, lesion, wm, rng_seed=0)
    assert filled.dtype == t1.dtype and filled.shape == t1.shape
    assert np.array_equal(filled[~lesion], t1[~lesion])
    values = filled[lesion]
    nawm = t1[wm & ~lesion]
    assert abs(values.mean() - nawm.mean()) < 1.5
    assert abs(values.std() - nawm.std()) < 1.0
    assert values.min() >= nawm.min() and values.max() <= nawm.max()


def test_filling_is_deterministic_by_seed() -> None:
    t1, lesion, wm = filling_case()
    a = fill_lesions(t1, lesion, wm, rng_seed=3)
    assert np.array_equal(a, fill_lesions(t1, lesion, wm, rng_seed=3))
    assert not np.array_equal(a, fill_lesions(t1, lesion, wm, rng_seed=4))


def test_filling_follows_the_local_white_matter_intensity() -> None:
    shape = (60, 20, 20)
    t1 = np.zeros(shape, np.float32)
    t1[:] = np.linspace(80.0, 120.0, shape[0])[:, None, None]  # a bias field along x
    lesion = np.zeros(shape, bool)
    lesion[8:11, 9:12, 9:12] = True
    lesion[49:52, 9:12, 9:12] = True
    filled = fill_lesions(t1, lesion, np.ones(shape, bool))
    assert abs(filled[9, 10, 10] - t1[9, 10, 10]) < 3.0
    assert abs(filled[50, 10, 10] - t1[50, 10, 10]) < 3.0


def test_filling_falls_back_to_all_white_matter_without_a_shell() -> None:
    shape = (30, 10, 10)
    t1 = np.full(shape, 50.0, np.float32)
    wm = np.zeros(shape, bool)
    wm[20:, :, :] = True  # far from the lesion
    t1[wm] = 110.0
    lesion = np.zeros(shape, bool)
    lesion[3:5, 4:6, 4:6] = True
    filled = fill_lesions(t1, lesion, wm)
    assert np.all(filled[lesion] == 110.0)


def test_filling_needs_normal_appearing_white_matter() -> None:
    t1, lesion, _ = filling_case()
    with pytest.raises(ValueError, match="wm_mask"):
        fill_lesions(t1, lesion, lesion)
    assert np.array_equal(fill_lesions(t1, np.zeros_like(lesion), lesion), t1)
