"""Lesions across sessions in the subject report: cards per persistent lesion ID with their fates,
SEL numbers and crops of every session on the within-subject grid; activity per interval in the
summary; filters by fate; a subject without the longitudinal table as before.

The derivatives are made by hand, tiny: two sessions of a 20³ FLAIR at 1 mm. The subject moved
2 mm along x at the second session, so its FLAIR reaches the within-subject grid (the first
session's grid here) only through its displacement field. Persistent lesions: 1 enlarges (and is
an SEL), 2 resolves, 3 is new; the second session numbers its own instances otherwise.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smoulder.derivatives import bids_name
from smoulder.images import save_json, save_tsv
from smoulder.longitudinal.activity import COLUMNS, INTERVAL_COLUMNS
from smoulder.registration.transforms import DisplacementTransform
from smoulder.report import render
from smoulder.report.subject import build_index, build_subject_report
from smoulder.segmentation.classes import CLASSES, LESION

SUBJECT = "sub-01"
SHAPE = (20, 20, 20)
GRID = np.diag([1.0, 1.0, 1.0, 1.0])
GRID[:3, 3] = -10.0
#: The second session's head sits 2 mm further along x in its scanner space.
SHIFT_MM = 2.0
#: Lesions in grid (first-session) world mm: persistent ID -> (centre, radius per session).
LESIONS = {
    1: ((-3.0, 0.0, 0.0), (2.5, 3.5)),
    2: ((5.0, -4.0, 0.0), (2.0, None)),
    3: ((3.0, 5.0, 4.0), (None, 2.0)),
}
#: The sessions' own instance IDs of each persistent lesion.
INSTANCES = {"01": {1: 1, 2: 2}, "02": {1: 2, 3: 1}}
SEL_ROW = {
    "sel_candidate_ul": "42.0",
    "sel_rate": "24.0",
    "sel_lesion_rate": "20.5",
    "sel_concentricity": "0.92",
    "sel_constancy": "n/a",
    "sel_noise_floor": "5.5",
    "sel_call": "yes",
    "t1_change_pct": "-3.2",
}
TABLE_ROWS = {
    (1, "01"): {"fate": "present", "fate_evidence": "first session", "volume_ul": "65.0"},
    (1, "02"): {
        "fate": "enlarging",
        "fate_evidence": "expansion 24.0 (% of its volume, per year)",
        "volume_ul": "180.0",
        "expansion_pct": "24.0",
        "rate": "24.0",
        "rate_unit": "%/year",
        "growth_ul": "40.0",
        "change_z": "2.4",
        "rim_probability": "0.81",
        "rim_call": "yes",
        **SEL_ROW,
    },
    (2, "01"): {"fate": "present", "fate_evidence": "first session", "volume_ul": "33.0"},
    (2, "02"): {"fate": "resolved", "volume_ul": "0"},
    (3, "01"): {"fate": "absent", "volume_ul": "0"},
    (3, "02"): {
        "fate": "new",
        "fate_evidence": "no earlier lesion; brightened (mean z 3.1)",
        "volume_ul": "33.0",
        "change_z": "3.1",
    },
}
INTERVAL = {
    "interval": "01-02",
    "from_session": "01",
    "to_session": "02",
    "years": "1.5",
    "new_count": "1",
    "new_volume_ul": "33.0",
    "enlarging_count": "1",
    "enlarging_volume_ul": "115.0",
    "shrinking_count": "0",
    "resolved_count": "1",
    "sel_count": "1",
    "sel_volume_ul": "42.0",
    "prl_count": "1",
    "prl_sel_count": "1",
    "noise_floor": "5.5",
    "nawm_rate_sd": "2.1",
    "change_noise_sd": "0.03",
}


def _ball(centre_mm, radius_mm: float, shift_mm: float = 0.0) -> np.ndarray:
    """Return the voxels of the grid within ``radius_mm`` of ``centre_mm`` moved by ``shift_mm``
    along x."""
    world = np.indices(SHAPE).reshape(3, -1).T @ GRID[:3, :3].T + GRID[:3, 3]
    centre = np.add(centre_mm, (shift_mm, 0.0, 0.0))
    return (np.linalg.norm(world - centre, axis=1) <= radius_mm).reshape(SHAPE)


def _save(data: np.ndarray, anat: Path, suffix: str, **entities) -> Path:
    name = bids_name({"sub": "01", **entities}, suffix=suffix, extension=".nii.gz")
    nib.save(nib.Nifti1Image(data, GRID), anat / name)
    return anat / name


def _session(root: Path, label: str, k: int) -> None:
    """Write one session's own derivatives and its maps on the within-subject grid."""
    anat = root / SUBJECT / f"ses-{label}" / "anat"
    anat.mkdir(parents=True)
    ses = {"ses": label}
    own = np.zeros(SHAPE, np.uint8)  # on the session's own grid: the head moved
    persistent = np.zeros(SHAPE, np.int16)  # on the within-subject grid
    for lid, (centre, radii) in LESIONS.items():
        if radii[k] is not None:
            own[_ball(centre, radii[k], SHIFT_MM * k)] = INSTANCES[label][lid]
            persistent[_ball(centre, radii[k])] = lid
    _save(np.where(own > 0, 300.0, 100.0).astype(np.float32), anat, "FLAIR", **ses, desc="preproc")
    dseg = np.where(own > 0, LESION, CLASSES.index("WM")).astype(np.uint8)
    _save(dseg, anat, "dseg", **ses)
    _save(own, anat, "dseg", **ses, desc="lesions")
    classes = [{"index": i, "name": n} for i, n in enumerate(CLASSES)]
    save_tsv(classes, anat / bids_name({"sub": "01", **ses}, suffix="dseg", extension=".tsv"))
    rows = [
        {"index": inst, "location": "periventricular", "volume_ul": float((own == inst).sum())}
        for inst in sorted(INSTANCES[label].values())
    ]
    stats = {"sub": "01", **ses, "desc": "lesions"}
    save_tsv(rows, anat / bids_name(stats, suffix="stats", extension=".tsv"))
    _save(persistent, anat, "dseg", **ses, space="longitudinal", desc="lesions")
    disp = np.zeros((3, *SHAPE), np.float32)
    disp[0] = SHIFT_MM * k  # grid point p lies at p + shift in the session's space
    xfm = {"sub": "01", **ses, "from": "longitudinal", "to": f"ses{label}", "mode": "image"}
    DisplacementTransform(disp, GRID).save(anat / bids_name(xfm, suffix="xfm", extension=".nii.gz"))
    if k:
        growth = _ball(LESIONS[1][0], 4.5) & ~_ball(LESIONS[1][0], 2.0)
        expansion = np.where(growth, 30.0, 0.0).astype(np.float32)
        expansion[_ball(LESIONS[2][0], 3.0)] = -40.0
        _save(expansion, anat, "map", **ses, space="longitudinal", desc="expansion")
        _save((growth & (persistent == 1)).astype(np.uint8), anat, "mask", **ses,
              space="longitudinal", desc="SEL")  # fmt: skip


def _derivatives(root: Path, *, table: bool = True, dated: bool = True) -> Path:
    """Write a two-session subject under ``root`` (the smoulder output folder)."""
    for k, label in enumerate(("01", "02")):
        _session(root, label, k)
    if not table:
        return root
    anat = root / SUBJECT / "anat"
    anat.mkdir()
    rows = []
    for (lid, session), values in TABLE_ROWS.items():
        instance = INSTANCES[session].get(lid)
        row = {c: "n/a" for c in COLUMNS} | {"merged_into": "0", "split_from": "0"}
        row |= {"lesion_id": lid, "session": session, "instances": instance or ""}
        row |= (
            values if dated else {k: v.replace("%/year", "%/interval") for k, v in values.items()}
        )
        rows.append(row)
    table_path = anat / "sub-01_desc-lesions_longitudinal.tsv"
    save_tsv(rows, table_path)
    dates = {"01": "2020-01-06T09:00:00", "02": "2021-07-06T09:00:00"}
    messages = [] if dated else ["ses-02: no acquisition date found; rates are per interval"]
    if not dated:
        del dates["02"]
    meta = {"SessionDates": dates, "SessionDateSources": dict.fromkeys(dates, "sessions.tsv")}
    save_json({**meta, "Messages": messages}, table_path.with_suffix(".json"))
    interval = {c: INTERVAL.get(c, "n/a") for c in INTERVAL_COLUMNS}
    if not dated:
        interval["years"] = "n/a"
    save_tsv([interval], anat / "sub-01_desc-activity_longitudinal.tsv")
    return root


def _card(page: str, lid: int) -> str:
    start = page.index(f'data-lesion-id="{lid}"')
    return page[start : page.index("</article>", start)]


def _blob(page: str, name: str) -> dict:
    return json.loads(page.split(f'id="{name}">')[1].split("</script>")[0])


def _pixels(uri: str) -> np.ndarray:
    from PIL import Image

    raw = base64.b64decode(uri.removeprefix("data:image/png;base64,"))
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def _colour(picture: np.ndarray, rgb) -> np.ndarray:
    return (picture == np.array(rgb, np.uint8)).all(-1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = _derivatives(tmp_path_factory.mktemp("longitudinal") / "smoulder")
    build_subject_report(root, SUBJECT)
    return root


@pytest.fixture(scope="module")
def page(built: Path) -> str:
    return (built / f"{SUBJECT}.html").read_text()


def test_cards_are_the_persistent_lesions_with_their_fates(page: str) -> None:
    assert "Lesions (3, tracked over 2 sessions)" in page
    enlarging, resolved, new = (_card(page, lid) for lid in (1, 2, 3))
    assert 'data-fates="enlarging"' in enlarging and 'data-sel-call="yes"' in enlarging
    assert 'data-fates="resolved"' in resolved and 'data-fates="new"' in new
    assert "ses-02 <b class='fate fate-enlarging'>enlarging</b>" in enlarging
    assert "expansion 24.0 (% of its volume, per year)" in enlarging  # the evidence sentence
    assert "no earlier lesion; brightened (mean z 3.1)" in new
    assert "rim: ses-01 n/a, ses-02 yes (0.81)" in enlarging
    # volumes per session are the table's, with each session's own instance IDs
    assert (
        "volume 65.0 µl" in enlarging
        and "volume 180.0 µl <span class='note'>(instances 2)" in enlarging
    )
    assert "Volume per session: ses-01: 65 µl, ses-02: 180 µl" in enlarging
    assert "Volume per session: ses-01: 0 µl, ses-02: 33 µl" in new


def test_sel_numbers_are_the_tables(page: str) -> None:
    card = _card(page, 1)
    assert "SEL: yes, 24.0 %/year (noise floor 5.5 %/year)" in card
    for text in (
        "<b>SEL yes</b>: candidate rate 24.0 %/year",
        "lesion rate 20.5 %/year",
        "noise floor 5.5 %/year",
        "concentricity 0.92",
        "candidate 42 µl",
        "T1 change -3.2 % of NAWM",
        "expansion +24.0 % · rate +24.0 %/year · brightened growth 40 µl",
    ):
        assert text in card, text
    assert "constancy" not in card  # two sessions: no constancy
    assert "SEL: n/a" in _card(page, 3)


def test_every_session_is_cropped_alike_on_the_grid(page: str) -> None:
    grid = _blob(page, "grid-images")
    assert set(grid) == {"1", "2", "3"}
    assert set(grid["1"]) == {"ses-01:FLAIR", "ses-02:FLAIR", "ses-02:expansion"}
    card = _card(page, 1)
    for key in grid["1"]:
        assert f'data-grid="{key}"' in card
    first, second = (_pixels(grid["1"][f"ses-0{k}:FLAIR"]["contour"]) for k in (1, 2))
    assert first.shape == second.shape
    red = [_colour(p, render.RED) for p in (first, second)]
    assert red[0].any() and red[1].any() and red[1].sum() > red[0].sum()  # it grew
    # the new lesion is outlined at the second session only
    new = [_pixels(grid["3"][f"ses-0{k}:FLAIR"]["contour"]) for k in (1, 2)]
    assert not _colour(new[0], render.RED).any() and _colour(new[1], render.RED).any()
    # the second session's FLAIR reached the grid through its field: its bright lesion sits
    # inside the outline drawn from the grid's labels, centred in the crop like the first's
    plain = _pixels(grid["1"]["ses-02:FLAIR"]["gray"])[..., 0]
    width = plain.shape[1] // 3  # the axial plane, leftmost of three
    bright = np.argwhere(plain[:, :width] > 200)
    assert abs(bright[:, 1].mean() - (width - 2) / 2) < 0.1 * width


def test_expansion_crop_is_diverging_with_its_scale(page: str) -> None:
    grid = _blob(page, "grid-images")
    shown = grid["1"]["ses-02:expansion"]
    assert shown["window"] == "expansion ±50 %/year (blue shrinking, red growing)"
    assert "ses-02 expansion — expansion ±50 %/year" in _card(page, 1)
    colours = _pixels(shown["gray"])
    growing = (colours[..., 0] == 255) & (colours[..., 1] < 255)
    assert growing.any()
    shrinking = _pixels(grid["2"]["ses-02:expansion"]["gray"])
    assert ((shrinking[..., 2] == 255) & (shrinking[..., 0] < 255)).any()
    outlined = _pixels(shown["contour"])
    assert _colour(outlined, render.BLACK).any() and _colour(outlined, render.GREEN).any()
    assert "colour-bar" in page and "not on the grid" not in _card(page, 1)


def test_summary_shows_activity_per_interval(page: str, built: Path) -> None:
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    row = summary.split("<tr data-interval='01-02'>")[1].split("</tr>")[0]
    for column, value in (
        ("new_count", "1"),
        ("new_volume_ul", "33"),
        ("enlarging_count", "1"),
        ("enlarging_volume_ul", "115"),
        ("resolved_count", "1"),
        ("sel_count", "1"),
        ("prl_count", "1"),
        ("prl_sel_count", "1"),
        ("noise_floor", "5.5"),
    ):
        assert f"<td class='{column}'>{value}</td>" in row, column
    assert "<td>1.50</td>" in row
    index = build_index(built, [SUBJECT]).read_text()
    assert "01-02: 1 new, 1 enlarging, 1 SEL, 1 PRL ∧ SEL" in index
    assert "0/3 (not started)" in index


def test_filters_by_fate_and_sel(page: str) -> None:
    for value in ("fate-new", "fate-enlarging", "sel-call", "sel"):
        assert f'<option value="{value}">' in page
    assert '<option value="sel-rate">SEL rate</option>' in page


def test_missing_date_is_named_and_rates_are_per_interval(tmp_path: Path) -> None:
    root = _derivatives(tmp_path / "smoulder", dated=False)
    page = build_subject_report(root, SUBJECT).read_text()
    assert "ses-02: no acquisition date found; rates are per interval" in page
    assert "ses-02: no date" in page
    card = _card(page, 1)
    assert "rate +24.0 %/interval" in card and "expansion ±50 %/interval" in card


def test_subject_without_the_table_renders_as_before(tmp_path: Path) -> None:
    root = _derivatives(tmp_path / "smoulder", table=False)
    page = build_subject_report(root, SUBJECT).read_text()
    assert "Lesions (2, reference ses-01)" in page
    assert "Lesion activity: not measured by this run" in page
    assert "SEL: not measured" in _card(page, 1)
    assert _blob(page, "grid-images") == {}
    assert set(_blob(page, "lesion-images")) == {"1", "2"}
    assert '<option value="fate-new">' not in page


def test_rater_filters_tracked_cards_in_a_real_browser(built: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("Debian chromium and chromium-driver are not installed ('make browser')")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    shown = (
        "return Array.from(document.querySelectorAll('.card:not(.hidden)'))"
        ".map(c => c.dataset.lesionId)"
    )
    try:
        driver.get((built / f"{SUBJECT}.html").as_uri())
        choose = Select(driver.find_element(By.ID, "filter"))
        for value, expected in (
            ("fate-new", ["3"]),
            ("fate-enlarging", ["1"]),
            ("sel-call", ["1"]),
        ):
            choose.select_by_value(value)
            assert driver.execute_script(shown) == expected, value
        card = driver.find_element(By.CSS_SELECTOR, "article[data-lesion-id='1']")
        driver.execute_script("arguments[0].scrollIntoView()", card)
        loaded = (
            "return Array.from(arguments[0].querySelectorAll('img[data-grid]'))"
            ".map(i => i.complete && i.naturalWidth > 0)"
        )
        deadline = time.time() + 10
        while not all(states := driver.execute_script(loaded, card)) and time.time() < deadline:
            time.sleep(0.1)
        assert states == [True, True, True]
    finally:
        driver.quit()
