"""QA report: built from a phantom run, reviewed in a real headless Chromium, served safely."""

from __future__ import annotations

import csv
import http.client
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from smoulder.cli import main
from smoulder.errors import InputError
from smoulder.report.review import merge_review, read_review, review_path
from smoulder.report.server import make_server
from smoulder.report.subject import build_subject_report

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def run_out(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Outputs of a fast participant run on the shared phantom (reports built at its end)."""
    root = tmp_path_factory.mktemp("report")
    out, work = root / "out", root / "work"
    argv = [str(phantom_dir), str(out), "participant", "--fast", "-w", str(work)]
    assert main([*argv, "--skip-data-check", "--nprocs", "2"]) == 0
    return out / "smoulder"


def _lesion_ids(root: Path) -> list[int]:
    """Return the lesion IDs of the cards: the subject's persistent IDs when the run tracked
    lesions over sessions, else the first session's instances."""
    tracked = root / "sub-01" / "anat" / "sub-01_desc-lesions_longitudinal.tsv"
    if tracked.exists():
        with tracked.open() as handle:
            rows = csv.DictReader(handle, delimiter="\t")
            return sorted({int(r["lesion_id"]) for r in rows})
    stats = root / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_desc-lesions_stats.tsv"
    with stats.open() as handle:
        return [int(r["index"]) for r in csv.DictReader(handle, delimiter="\t")]


def test_run_builds_subject_report_and_index(run_out: Path) -> None:
    page = (run_out / "sub-01.html").read_text()
    ids = _lesion_ids(run_out)
    assert len(ids) >= 2
    for lid in ids:
        assert f'data-lesion-id="{lid}"' in page
    images = json.loads(page.split('id="lesion-images">')[1].split("</script>")[0])
    assert set(images) == {str(i) for i in ids}
    assert all(len(v) == 3 for v in images.values())  # FLAIR, T1w, GRE
    for section in ("summary", "registration", "segmentation", "atrophy", "lesions"):
        assert f'<section id="{section}">' in page
    index = (run_out / "index.html").read_text()
    assert "sub-01.html" in index and f"0/{len(ids)} (not started)" in index


def test_reports_only_rebuilds_from_derivatives(run_out: Path, capsys) -> None:
    (run_out / "sub-01.html").unlink()
    assert main(["unused-bids", str(run_out.parent), "participant", "--reports-only"]) == 0
    assert (run_out / "sub-01.html").exists()
    assert "sub-01.html" in capsys.readouterr().out


def test_user_strings_are_escaped(run_out: Path, tmp_path: Path) -> None:
    root = tmp_path / "smoulder"
    shutil.copytree(run_out, root)
    stats = root / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_desc-lesions_stats.tsv"
    text = stats.read_text().replace("periventricular", "<img src=x onerror=alert(1)>")
    text = text.replace("juxtacortical", "<img src=x onerror=alert(1)>")
    text = text.replace("deep_white_matter", "<img src=x onerror=alert(1)>")
    stats.write_text(text)
    note = "</script><script>alert(1)</script> & <b>"
    merge_review(
        review_path(root / "sub-01", "sub-01"),
        [{"lesion_id": 1, "rater": "<i>R</i>", "note": note}],
    )
    page = build_subject_report(root, "sub-01").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "</script><script>alert(1)" not in page and "<\\/script>" in page
    assert "<i>R</i>" not in page.split('id="report-data">')[0]


def test_review_table_keeps_each_raters_rows_under_concurrency(tmp_path: Path) -> None:
    path = review_path(tmp_path, "sub-01")

    def rate(rater: str) -> None:
        for lid in range(1, 21):
            merge_review(path, [{"lesion_id": lid, "rater": rater, "lesion": "yes", "rim": "none"}])

    threads = [threading.Thread(target=rate, args=(f"R{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = read_review(path)
    assert len(rows) == 80 and {r["rater"] for r in rows} == {"R0", "R1", "R2", "R3"}
    with pytest.raises(InputError, match="rim one of"):
        merge_review(path, [{"lesion_id": 1, "rater": "A", "rim": "yes"}])
    with pytest.raises(InputError, match="rater"):
        merge_review(path, [{"lesion_id": 1, "rater": "", "lesion": "yes"}])
    assert len(read_review(path)) == 80  # a rejected save changes nothing


@pytest.fixture()
def server(run_out: Path):
    srv = make_server(run_out, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(srv, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def test_review_server_saves_rows_and_refuses_traversal(server, run_out: Path) -> None:
    status, body = _request(server, "GET", "/sub-01.html")
    assert status == 200 and b"data-lesion-id" in body
    for path in (
        "/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/sub-01/..%2f..%2fetc%2fpasswd",
    ):
        status, _ = _request(server, "GET", path)
        assert status in (403, 404), path
    status, _ = _request(server, "POST", "/api/review/..%2Fetc", {"rows": []})
    assert status == 404
    row = {"lesion_id": 1, "rater": "srv", "lesion": "no", "note": "vessel"}
    status, body = _request(server, "POST", "/api/review/sub-01", {"rows": [row]})
    assert status == 200
    saved = read_review(review_path(run_out / "sub-01", "sub-01"))
    assert [(r["rater"], r["lesion"], r["note"]) for r in saved if r["rater"] == "srv"] == [
        ("srv", "no", "vessel")
    ]
    status, _ = _request(server, "POST", "/api/review/sub-01", {"rows": [{**row, "sel": "maybe"}]})
    assert status == 400


def test_review_server_binds_loopback_only_unless_asked(run_out: Path) -> None:
    with pytest.raises(InputError, match="allow-remote"):
        make_server(run_out.parent, "0.0.0.0", 0)
    srv = make_server(run_out.parent, "0.0.0.0", 0, allow_remote=True)
    srv.server_close()


# --------------------------------------------------------------------------- real browser


def _browser(download_dir: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("Debian chromium and chromium-driver are not installed ('make browser')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1000"):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(download_dir), "download.prompt_for_download": False},
    )
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)}
    )
    return driver


def test_rater_reviews_in_a_real_browser(run_out: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    root = tmp_path / "smoulder"
    shutil.copytree(run_out, root)
    review_path(root / "sub-01", "sub-01").unlink(missing_ok=True)
    build_subject_report(root, "sub-01")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser(downloads)
    try:
        driver.get((root / "sub-01.html").as_uri())
        cards = driver.find_elements(By.CSS_SELECTOR, "article.card[data-lesion-id]")
        ids = [int(c.get_attribute("data-lesion-id")) for c in cards]
        assert sorted(ids) == sorted(_lesion_ids(root))
        for card in cards:  # every card renders its images once scrolled to
            driver.execute_script("arguments[0].scrollIntoView()", card)
            deadline = time.time() + 10
            while time.time() < deadline:
                ok = driver.execute_script(
                    "return Array.from(arguments[0].querySelectorAll('img[data-modality]'))"
                    ".every(i => i.src.startsWith('data:image/png') && i.complete"
                    " && i.naturalWidth > 0)",
                    card,
                )
                if ok:
                    break
                time.sleep(0.1)
            assert ok, card.get_attribute("data-lesion-id")
            assert len(card.find_elements(By.CSS_SELECTOR, "img[data-modality]")) == 3
        rater = driver.find_element(By.ID, "rater")
        rater.send_keys("rater-A<script>")
        first, second = cards[0], cards[1]
        # first lesion with the mouse
        driver.execute_script("arguments[0].scrollIntoView()", first)
        first.find_element(By.CSS_SELECTOR, "input[value='yes'][name^='lesion-']").click()
        first.find_element(By.CSS_SELECTOR, "input[value='probable']").click()
        note = first.find_element(By.CSS_SELECTOR, "input.note")
        note.send_keys("thin rim <b>& 'quotes'\t")
        # second lesion with the keyboard: focus it, then n (not a lesion), 3 (no rim), x (no SEL)
        driver.execute_script("arguments[0].focus()", second)
        body = driver.find_element(By.TAG_NAME, "body")
        for key in "n3x":
            body.send_keys(key)
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "report-review.png"))
        driver.find_element(By.ID, "export").click()
        target = downloads / "sub-01_desc-review_lesions.tsv"
        deadline = time.time() + 15
        while not target.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert target.exists(), list(downloads.iterdir())
    finally:
        driver.quit()
    rows = read_review(target)
    got = {(r["lesion_id"], r["rater"], r["lesion"], r["rim"], r["sel"], r["note"]) for r in rows}
    a, b = (str(int(c)) for c in (ids[0], ids[1]))
    assert got == {
        (a, "rater-A<script>", "yes", "probable", "", "thin rim <b>& 'quotes'"),
        (b, "rater-A<script>", "no", "none", "no", ""),
    }
    # smoulder reads the exported table back into the subject's review table
    merge_review(review_path(root / "sub-01", "sub-01"), rows)
    assert len(read_review(review_path(root / "sub-01", "sub-01"))) == 2
