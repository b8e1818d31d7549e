"""Rim results in the subject report: card header and evidence, the GRE-grid crop with its
sector marks, sorting data, and the PRL counts of the summary and the cohort index.

The derivatives are made by hand, tiny: a 20³ FLAIR at 1 mm with two lesions, and the
classified χ map on a GRE grid of other voxel sizes whose first axis runs right → left.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smoulder.derivatives import bids_name
from smoulder.images import save_json, save_tsv
from smoulder.registration.transforms import AffineTransform
from smoulder.report import render
from smoulder.report.subject import CROP_HALF_MM, CROP_PX, build_index, build_subject_report
from smoulder.segmentation.classes import CLASSES, LESION

SUBJECT = "sub-01"
ENTITIES = {"sub": "01", "ses": "01"}
FLAIR_AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
FLAIR_AFFINE[:3, 3] = -10.0
#: GRE grid: 0.8 × 0.8 × 1.5 mm, first voxel axis towards the subject's left (x = 10 − 0.8 i).
GRE_AFFINE = np.diag([-0.8, 0.8, 1.5, 1.0])
GRE_AFFINE[:3, 3] = (10.0, -10.0, -10.0)
GRE_SHAPE = (26, 26, 14)
#: The same grid stored coronally: voxel axes x, z, y; the slice (axial) axis is the second.
CORONAL = (GRE_AFFINE[:, [0, 2, 1, 3]], (26, 14, 26))
#: Lesion 1 sits at world (−3, 0, 0): GRE slice k = 7 (z = 0.5 mm) goes through it.
RIM_SLICE = 7
#: Lesion 1's sectors: a rim in sectors 0–2 only (atan2 in [−π, −π/2): GRE −i and −j, that is
#: towards the subject's right (the GRE's first axis runs right → left) and posterior).
SECTORS = "111000000000"
QSM_NAME = f"QSM (GRE grid, slice {RIM_SLICE})"

RIM_ROWS = {
    1: {
        "rim_probability": "0.87",
        "rim_call": "yes",
        "rim_status": "assessed",
        "rim_input": "qsm",
        "rim_coverage": "0.75",
        "rim_consensus": "True",
        "rim_rule_call": "True",
        "central_vein": "True",
        "rim_chi_ppm": "0.04",
        "core_chi_ppm": "0.01",
        "shell_chi_ppm": "0.0",
        "rim_slice": str(RIM_SLICE),
        "rim_sectors": SECTORS,
        "t1_black_hole": "False",
        "t1w_ratio": "0.91",
        "qt1_ms": "1450",
    },
    2: {
        "rim_probability": "n/a",
        "rim_call": "not assessed",
        "rim_status": "outside the GRE field of view (12 % inside)",
        "rim_input": "n/a",
        "rim_coverage": "n/a",
        "rim_consensus": "n/a",
        "rim_rule_call": "n/a",
        "central_vein": "n/a",
        "rim_chi_ppm": "n/a",
        "core_chi_ppm": "n/a",
        "shell_chi_ppm": "n/a",
        "rim_slice": "n/a",
        "rim_sectors": "n/a",
        "t1_black_hole": "True",
        "t1w_ratio": "0.62",
        "qt1_ms": "n/a",
    },
}
RIM_SIDECAR = {
    "PRLCount": 1,
    "LesionsAssessedForRims": 1,
    "RimInput": "qsm",
    "SignConvention": "Paramagnetic positive: iron-laden rims are bright.",
    "RimModel": "smoulder_prl 0.2.0",
    "RimOperatingPoints": {"balanced": 0.34, "high_specificity": 0.7, "high_sensitivity": 0.2},
}


def _save(data: np.ndarray, affine: np.ndarray, anat: Path, suffix: str, **entities) -> Path:
    path = anat / bids_name({**ENTITIES, **entities}, suffix=suffix, extension=".nii.gz")
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _ball(shape, affine: np.ndarray, centre_mm, radius_mm: float) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(world - centre_mm, axis=1) <= radius_mm).reshape(shape)


def _derivatives(
    root: Path,
    *,
    rims: bool = True,
    xfm_shift_mm: float | None = None,
    rim_rows: dict[int, dict[str, str]] = RIM_ROWS,
    gre: tuple[np.ndarray, tuple[int, int, int]] = (GRE_AFFINE, GRE_SHAPE),
) -> Path:
    """Write one session's derivatives under ``root`` (the smoulder output folder)."""
    anat = root / SUBJECT / "ses-01" / "anat"
    anat.mkdir(parents=True)
    shape = (20, 20, 20)
    lesions = np.zeros(shape, np.uint8)
    lesions[_ball(shape, FLAIR_AFFINE, (-3.0, 0.0, 0.0), 3.0)] = 1
    lesions[_ball(shape, FLAIR_AFFINE, (5.0, 0.0, 0.0), 2.0)] = 2
    flair = np.where(lesions > 0, 300.0, 100.0).astype(np.float32)
    dseg = np.where(lesions > 0, LESION, CLASSES.index("WM")).astype(np.uint8)
    _save(flair, FLAIR_AFFINE, anat, "FLAIR", desc="preproc")
    _save(dseg, FLAIR_AFFINE, anat, "dseg")
    _save(lesions, FLAIR_AFFINE, anat, "dseg", desc="lesions")
    classes = [{"index": i, "name": n} for i, n in enumerate(CLASSES)]
    save_tsv(classes, anat / bids_name(ENTITIES, suffix="dseg", extension=".tsv"))
    rows = [
        {
            "index": lid,
            "location": "deep_white_matter",
            "volume_ul": float((lesions == lid).sum()),
            "mean_probability": 0.9,
            **(rim_rows[lid] if rims else {}),
        }
        for lid in (1, 2)
    ]
    stats = anat / bids_name({**ENTITIES, "desc": "lesions"}, suffix="stats", extension=".tsv")
    save_tsv(rows, stats)
    meta = {"index": {"Description": "lesion ID"}, **(RIM_SIDECAR if rims else {})}
    save_json(meta, stats.with_suffix(".json"))
    if rims:
        affine, shape = gre
        chi = np.zeros(shape, np.float32)
        shell = _ball(shape, affine, (-3.0, 0.0, 0.0), 4.5)
        chi[shell & ~_ball(shape, affine, (-3.0, 0.0, 0.0), 3.0)] = 0.1
        _save(chi, affine, anat, "Chimap", desc="rims")
    if xfm_shift_mm is not None:
        matrix = np.eye(4)
        matrix[0, 3] = xfm_shift_mm
        entities = {**ENTITIES, "from": "MEGRE", "to": "FLAIR", "mode": "image"}
        AffineTransform(matrix).save(anat / bids_name(entities, suffix="xfm", extension=".mat"))
    return root


def _card(page: str, lid: int) -> str:
    start = page.index(f'data-lesion-id="{lid}"')
    return page[start : page.index("</article>", start)]


def _images(page: str) -> dict[str, dict[str, dict[str, str]]]:
    return json.loads(page.split('id="lesion-images">')[1].split("</script>")[0])


def _rim_images(page: str) -> dict[str, dict[str, str]]:
    return json.loads(page.split('id="rim-images">')[1].split("</script>")[0])


def _pixels(uri: str) -> np.ndarray:
    from PIL import Image

    raw = base64.b64decode(uri.removeprefix("data:image/png;base64,"))
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = _derivatives(tmp_path_factory.mktemp("rims") / "smoulder")
    return build_subject_report(root, SUBJECT).read_text()


def test_card_header_evidence_and_data_attributes(page: str) -> None:
    assessed, skipped = _card(page, 1), _card(page, 2)
    assert "rim probability 0.87 · rim: yes" in assessed
    assert 'data-rim-probability="0.870"' in assessed and 'data-rim-call="yes"' in assessed
    for text in (
        "rim coverage 75 %",
        "consensus yes",
        "central vein yes",
        "χ rim +0.040 / core +0.010 / shell +0.000 ppm (QSM)",
        "T1 black hole no",
        "qT1 1450 ms",
    ):
        assert text in assessed, text
    assert "rim: not assessed (outside the GRE field of view (12 % inside))" in skipped
    assert 'data-rim-probability=""' in skipped and 'data-rim-call="not assessed"' in skipped
    assert "T1 black hole yes" in skipped and "qT1" not in skipped and "coverage" not in skipped
    assert '<option value="rim">rim probability</option>' in page
    assert "balanced operating point (0.34)" in page


def test_gre_crop_only_for_the_assessed_lesion(page: str) -> None:
    crops = _rim_images(page)
    assert set(crops) == {"1"} and crops["1"]["name"] == QSM_NAME
    assert 'data-rim-crop="1"' in _card(page, 1) and "data-rim-crop" not in _card(page, 2)
    assert f"{QSM_NAME} — QSM ±0.15 ppm: -0.15 to 0.15" in _card(page, 1)
    assert "GRE grid" not in _card(page, 2)
    assert all("GRE grid" not in name for v in _images(page).values() for name in v)
    gray = _pixels(crops["1"]["gray"])
    side = 2 * round(CROP_HALF_MM / 0.8) + 1  # GRE pixels (0.8 mm), not FLAIR ones (1 mm)
    assert gray.shape[:2] == (side * (CROP_PX // side),) * 2


def _marks_on_screen(lined: np.ndarray) -> None:
    """Assert that the rim marks of :data:`SECTORS` lie right of and below the lesion."""
    red = np.argwhere((lined == render.RED).all(-1))
    cyan = np.argwhere((lined == render.CYAN).all(-1))
    assert len(red) and len(cyan)
    centre = red.mean(0)
    # sectors 0-2: subject's right (picture right, neurological) and posterior (picture down)
    assert (cyan[:, 0] > centre[0]).all() and (cyan[:, 1] > centre[1]).all()


def test_rim_marks_lie_where_the_sectors_say_on_screen(page: str) -> None:
    _marks_on_screen(_pixels(_rim_images(page)["1"]["contour"]))


def test_gre_grid_stored_coronally_slices_along_its_axial_axis(tmp_path: Path) -> None:
    root = _derivatives(tmp_path / "smoulder", gre=CORONAL)
    crops = _rim_images(build_subject_report(root, SUBJECT).read_text())
    assert crops["1"]["name"] == QSM_NAME
    _marks_on_screen(_pixels(crops["1"]["contour"]))


def test_summary_and_index_count_rim_lesions(page: str, tmp_path: Path) -> None:
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert "<td class='prl'>1</td>" in summary and "smoulder_prl 0.2.0" in summary
    assert "Paramagnetic positive" in summary
    root = _derivatives(tmp_path / "smoulder")
    index = build_index(root, [SUBJECT]).read_text()
    assert "<td class='prl'>ses-01: 1</td>" in index


def test_old_derivatives_say_not_measured(tmp_path: Path) -> None:
    root = _derivatives(tmp_path / "smoulder", rims=False)
    page = build_subject_report(root, SUBJECT).read_text()
    card = _card(page, 1)
    assert "rim probability: not measured" in card and 'data-rim-call=""' in card
    assert "not measured by this run" in page and "GRE grid" not in page
    index = build_index(root, [SUBJECT]).read_text()
    assert "<td class='prl'>ses-01: n/a</td>" in index


@pytest.mark.parametrize(("shift_mm", "crop"), [(0.0, True), (500.0, False)])
def test_gre_to_flair_transform_places_the_lesion(
    tmp_path: Path, shift_mm: float, crop: bool
) -> None:
    root = _derivatives(tmp_path / "smoulder", xfm_shift_mm=shift_mm)
    crops = _rim_images(build_subject_report(root, SUBJECT).read_text())
    assert ("1" in crops) is crop


def test_assessed_lesion_without_sectors_gets_its_centre_slice_unmarked(tmp_path: Path) -> None:
    no_slice = {**RIM_ROWS[1], "rim_call": "no", "rim_slice": "n/a", "rim_sectors": "n/a"}
    root = _derivatives(tmp_path / "smoulder", rim_rows={**RIM_ROWS, 1: no_slice})
    crops = _rim_images(build_subject_report(root, SUBJECT).read_text())
    assert crops["1"]["name"] == "QSM (GRE grid, slice 7, no sectors)"  # z = 0 → k = 6.7
    lined = _pixels(crops["1"]["contour"])
    assert (lined == render.RED).all(-1).any() and not (lined == render.CYAN).all(-1).any()


@pytest.mark.parametrize(
    ("sector", "signs"),
    [(0, (-1, -1)), (2, (-1, -1)), (3, (1, -1)), (6, (1, 1)), (9, (-1, 1))],
)
@pytest.mark.parametrize("spacing_mm", [(1.0, 1.0), (0.5, 1.5)])
def test_sector_marks_cover_exactly_the_flagged_sector(
    sector: int, signs: tuple[int, int], spacing_mm: tuple[float, float]
) -> None:
    flags = "".join("1" if s == sector else "-" for s in range(12))
    centre = (15.3, 14.6)
    rim, no_rim = render.sector_marks((31, 31), centre, flags, 6.0, spacing_mm=spacing_mm)
    assert rim.any() and not no_rim.any()
    x, y = ((np.argwhere(rim) - centre) * spacing_mm).T
    assert np.sign(x.mean()) == signs[0] and np.sign(y.mean()) == signs[1]
    angle = np.arctan2(y, x)
    lo = -np.pi + 2 * np.pi * sector / 12
    assert ((angle >= lo - 1e-9) & (angle < lo + 2 * np.pi / 12)).all()
    assert (np.hypot(x, y) >= 6.0).all() and (np.hypot(x, y) < 7.0).all()


def test_sector_marks_dot_the_sectors_without_a_rim_and_reject_bad_flags() -> None:
    rim, no_rim = render.sector_marks((21, 21), (10, 10), "0" * 12, 5.0, width_mm=2.0)
    assert not rim.any() and no_rim.any()
    with pytest.raises(ValueError, match="sector flags"):
        render.sector_marks((5, 5), (2, 2), "1x", 1.0)
