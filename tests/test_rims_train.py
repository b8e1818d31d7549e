"""The rim classifier: bundle, calibration, operating points, training, resume, fine-tuning.

Toy task: 4-channel 24³ patches where a rim lesion has a bright spherical shell in the
susceptibility channel around its mask and a rimless one has none, plus noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smoulder.errors import ConfigError, InputError
from smoulder.rims import calibration as cal
from smoulder.rims.network import (
    RimNetworkDef,
    check_patches,
    load_bundle,
    predict,
    predict_logits,
    save_bundle,
)
from smoulder.rims.train import (
    PatchSet,
    fine_tune,
    load_shards,
    match_ratings,
    read_ratings,
    recalibrate,
    split_by_subject,
    train,
    write_fine_tuned,
)

#: A smaller network than the default keeps the tests quick on 2 cores.
TINY = RimNetworkDef(channels=(8, 16, 32), strides=(2, 2, 2), num_res_units=1)


def toy_patches(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return float16 toy patches: mask sphere; rims get a bright shell in channel 0."""
    grid = np.indices((24, 24, 24)).astype(np.float32)
    out = np.empty((len(labels), 4, 24, 24, 24), np.float16)
    for i, label in enumerate(labels):
        centre = 11.5 + rng.uniform(-2, 2, 3)
        radius = rng.uniform(3.5, 6.0)
        dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        mask = (dist <= radius).astype(np.float32)
        chi = rng.normal(0, 1.0, (24, 24, 24))
        if label:
            chi += 1.0 * ((dist > radius) & (dist <= radius + 2.0))
        out[i, 0] = chi
        out[i, 1] = 1 + rng.normal(0, 0.1, (24, 24, 24))
        out[i, 2] = 1 + 0.8 * mask + rng.normal(0, 0.1, (24, 24, 24))
        out[i, 3] = mask
    return out


def write_shard(path: Path, subjects: list[str], per_subject: int, seed: int) -> Path:
    """Write a toy shard: ``per_subject`` lesions per subject, about a third of them rims."""
    rng = np.random.default_rng(seed)
    n = len(subjects) * per_subject
    labels = (np.arange(n) % 3 == 0).astype(np.uint8)
    np.savez(
        path,
        patches=toy_patches(labels, rng),
        labels=labels,
        input_kind=np.array(["qsm", "phase"] * (n // 2) + ["qsm"] * (n % 2)),
        lesion_id=np.tile(np.arange(1, per_subject + 1), len(subjects)),
        subject=np.repeat([f"sub-{s}" for s in subjects], per_subject),
        session=np.array(["ses-01"] * n),
    )
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shard(folder / "a.npz", ["01", "02", "03", "04"], 12, seed=1)
    write_shard(folder / "b.npz", ["05", "06", "07", "08"], 12, seed=2)
    return folder


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("run")
    metrics = train(
        run, [shards], epochs=4, batch_size=16, lr=3e-3, seed=0, threads=2, network=TINY, say=print
    )
    return run, metrics


# ----------------------------------------------------------------------------- network


def test_bundle_roundtrip_and_flip_invariance(tmp_path):
    import torch

    torch.manual_seed(0)
    net = TINY.build()
    calib = cal.Calibration("temperature", temperature=1.7)
    points = {"balanced": 0.5, "high_specificity": 0.8, "high_sensitivity": 0.2}
    save_bundle(tmp_path / "b", net, calib, points, {"version": "9.9.9"}, network_def=TINY)
    for part in (
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
        "docs/README.md",
    ):
        assert (tmp_path / "b" / part).is_file(), part
    bundle = load_bundle(tmp_path / "b")
    assert bundle.version == "9.9.9" and bundle.operating_points == points
    assert bundle.network_def == TINY and bundle.calibration.pooled == calib
    assert not bundle.calibration.strata  # a plain calibration: one map for every input
    x = toy_patches(np.array([1, 0, 1]), np.random.default_rng(0)).astype(np.float32)
    p = predict(bundle, x)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    # 8-flip TTA averages over the flip group: a flipped patch gets the same probability
    np.testing.assert_allclose(predict(bundle, np.flip(x, (2, 4)).copy()), p, rtol=1e-4, atol=1e-6)
    # the half-precision weights are the network's, to half precision
    ref = cal.sigmoid(predict_logits(net, x, tta=False) / 1.7)
    np.testing.assert_allclose(predict(bundle, x, tta=False), ref, atol=2e-2)


def test_bundle_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="metadata.json"):
        load_bundle(tmp_path)
    net = TINY.build()
    points = {"balanced": 0.5, "high_specificity": 0.8, "high_sensitivity": 0.2}
    save_bundle(tmp_path, net, cal.Calibration(), points, {}, network_def=TINY)
    meta = json.loads((tmp_path / "configs/metadata.json").read_text())
    meta["network_def"]["channels"] = [4, 8, 16]
    (tmp_path / "configs/metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not fit"):
        load_bundle(tmp_path)
    with pytest.raises(InputError, match=r"found \(2, 3, 24, 24, 24\)"):
        check_patches(np.zeros((2, 3, 24, 24, 24)))


# ----------------------------------------------------------------------------- calibration


def test_calibration_lowers_ece_on_miscalibrated_toy():
    rng = np.random.default_rng(3)
    y = rng.random(2000) < 0.15  # rims are rare
    z = 4.0 * (2 * y - 1) + rng.normal(0, 3.0, y.size) + 1.5  # overconfident, shifted logits
    fit, test = slice(0, 1000), slice(1000, None)
    calibration, cv_ece = cal.fit_calibration(z[fit], y[fit])
    before = cal.expected_calibration_error(cal.sigmoid(z[test]), y[test])
    after = cal.expected_calibration_error(calibration(z[test]), y[test])
    assert set(cv_ece) == set(cal.METHODS)
    assert after < before / 2, (before, after, calibration.method)


@pytest.mark.parametrize("method", cal.METHODS)
def test_calibration_maps_are_monotone_and_stored(method):
    rng = np.random.default_rng(4)
    y = rng.random(300) < 0.4
    z = 2 * y + rng.normal(0, 1.5, y.size)
    c = cal.fit_method(z, y, method)
    grid = np.linspace(-8, 8, 200)
    assert (np.diff(c(grid)) >= -1e-12).all()
    assert cal.Calibration.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_isotonic_is_monotone_and_keeps_the_mean():
    rng = np.random.default_rng(5)
    s = rng.integers(0, 15, 60).astype(float)  # with ties
    y = (rng.random(60) < s / 15).astype(int)
    x, p = cal.fit_isotonic(s, y)
    fitted = np.interp(s, x, p)
    assert (np.diff(p) >= 0).all()
    # pooling keeps the mean of the labels (a property of pool-adjacent-violators)
    assert abs(fitted.mean() - y.mean()) < 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_aucs_match_their_definitions(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(40) < 0.3
    y[:2] = [True, False]
    s = np.round(rng.normal(y * 1.0, 1.0), 1)  # rounded: ties
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    assert cal.roc_auc(s, y) == pytest.approx(pairs.mean())
    ap = 0.0
    for t in np.unique(s)[::-1]:
        call = s >= t
        recall_gain = (call & y).sum() / y.sum() - ((s > t) & y).sum() / y.sum()
        ap += recall_gain * (call & y).sum() / call.sum()
    assert cal.pr_auc(s, y) == pytest.approx(ap)
    low, high = cal.auc_confidence_interval(s, y)
    assert low <= cal.roc_auc(s, y) <= high


def test_auc_interval_covers_at_its_level():
    rng = np.random.default_rng(6)
    true_auc = 0.7602  # binormal, separation 1: Phi(1 / sqrt(2))
    hits = 0
    for _ in range(200):
        y = np.r_[np.ones(30, bool), np.zeros(60, bool)]
        s = rng.normal(y * 1.0, 1.0)
        low, high = cal.auc_confidence_interval(s, y)
        hits += low <= true_auc <= high
    assert 0.88 <= hits / 200 <= 0.99


@pytest.mark.parametrize("seed", range(8))
def test_operating_points_satisfy_their_definitions(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(120) < 0.2
    y[:2] = [True, False]
    p = cal.sigmoid(rng.normal(1.5 * y, 1.0))
    points = cal.operating_points(p, y)
    candidates = np.unique(p)

    def rates(t):
        return cal.sensitivity_specificity(p, y, t)

    sens, spec = rates(points["high_specificity"])
    assert spec >= cal.TARGET_RATE
    lower = candidates[candidates < points["high_specificity"]]
    assert lower.size == 0 or rates(lower.max())[1] < cal.TARGET_RATE
    sens, spec = rates(points["high_sensitivity"])
    assert sens >= cal.TARGET_RATE
    higher = candidates[candidates > points["high_sensitivity"]]
    assert higher.size == 0 or rates(higher.min())[0] < cal.TARGET_RATE
    youden = max(sum(rates(t)) - 1 for t in candidates)
    assert sum(rates(points["balanced"])) - 1 == pytest.approx(youden)


# ----------------------------------------------------------------------------- training


def test_split_keeps_subjects_whole():
    rng = np.random.default_rng(0)
    subjects = rng.choice([f"s{i}" for i in range(9)], 200)
    split = split_by_subject(subjects, seed=3)
    masks = list(split.values())
    assert np.all(sum(m.astype(int) for m in masks) == 1)
    sets = [set(subjects[m]) for m in masks]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    with pytest.raises(InputError, match="at least 3 subjects"):
        split_by_subject(np.array(["a", "b"]), seed=0)


def test_training_learns_the_toy_task(trained):
    run, metrics = trained
    val = metrics["validation"]
    assert val["roc_auc"] > 0.9, metrics
    assert metrics["epochs"] == 4 and 1 <= metrics["best_epoch"] <= 4
    bundle = load_bundle(run / "bundle")
    assert set(bundle.operating_points) == {"balanced", "high_specificity", "high_sensitivity"}
    assert bundle.metadata["training"]["validation"]["roc_auc"] == pytest.approx(val["roc_auc"])
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == metrics["best_epoch"]


class _Killed(Exception):
    pass


def test_resume_continues_and_refuses_a_changed_recipe(shards, tmp_path):
    data = load_shards([shards])
    assert len(data) == 96
    lines: list[str] = []

    def kill_after_first_epoch(line: str) -> None:
        lines.append(line)
        if line.startswith('{"epoch": 1'):
            raise _Killed

    options = dict(epochs=2, batch_size=32, lr=1e-3, seed=1, threads=2, network=TINY)
    with pytest.raises(_Killed):
        train(tmp_path, [shards], say=kill_after_first_epoch, **options)
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "bundle").exists()
    lines.clear()
    metrics = train(tmp_path, [shards], say=lines.append, **options)
    assert any(line.startswith("resuming after epoch 1") for line in lines)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and metrics["epochs"] == 2
    with pytest.raises(ConfigError, match="learning_rate"):
        train(tmp_path, [shards], say=lines.append, **{**options, "lr": 5e-4})


# ----------------------------------------------------------------------------- fine-tuning


def _ratings(path: Path, rows: list[tuple[str, str, int, str]]) -> Path:
    lines = ["participant\tsession\tlesion\trim"] + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fine_tuning_runs_and_refuses_unknown_lesions(trained, shards, tmp_path):
    run, _ = trained
    bundle = load_bundle(run / "bundle")
    patches = load_shards([shards]).by_key()
    rows = []
    for subject in ("01", "02", "05", "06"):
        for lesion in range(1, 7):
            rows.append(
                (f"sub-{subject}", "ses-01", lesion, "definite" if lesion % 3 == 1 else "none")
            )
    rows.append(("sub-01", "ses-01", 8, "probable"))
    tsv = _ratings(tmp_path / "ratings.tsv", rows)
    lines: list[str] = []
    report = fine_tune(tsv, patches, bundle, folds=2, epochs=1, batch_size=8, say=lines.append)
    assert report.lesions == 24 and report.rims == 8 and report.left_out == {"probable": 1}
    assert report.grouped_by == "participant"
    for model in (report.initial, report.fine_tuned):
        low, high = model["roc_auc_ci"]
        assert 0.0 <= low <= model["roc_auc"] <= high <= 1.0
    assert any("ROC-AUC" in line for line in report.lines())
    # a bundle is written only on request, never over the starting one
    with pytest.raises(ConfigError, match="never replaces"):
        write_fine_tuned(report, patches, bundle, run / "bundle", say=lines.append)
    out = write_fine_tuned(report, patches, bundle, tmp_path / "site", say=lines.append)
    assert load_bundle(out).version.endswith("+site")

    bad = _ratings(tmp_path / "bad.tsv", [*rows, ("sub-02", "ses-01", 99, "definite")])
    with pytest.raises(InputError, match="sub-02 ses-01 lesion 99"):
        fine_tune(bad, patches, bundle, folds=2, epochs=1)


def test_read_ratings_of_a_review_table(tmp_path):
    path = tmp_path / "sub-07_desc-review_lesions.tsv"
    path.write_text(
        "lesion_id\trater\tlesion\trim\tsel\tnote\ttime\n"
        "1\tA\tyes\tdefinite\t\t\t\n1\tB\tyes\tdefinite\t\t\t\n2\tA\tyes\tnone\t\t\t\n"
        "3\tA\tyes\tdefinite\t\t\t\n3\tB\tyes\tnone\t\t\t\n4\tA\tyes\tprobable\t\t\t\n"
        "5\tA\tyes\t\t\t\t\n"
    )
    ratings = read_ratings(path)
    assert ratings.labels == {("07", "", 1): 1, ("07", "", 2): 0}
    assert ratings.left_out == {"raters disagree": 1, "probable": 1, "unrated": 1}
    assert read_ratings(path, probable="rim").labels[("07", "", 4)] == 1
    # a review table's lesion IDs are the subject's: they match the lesion in every session
    patch = np.zeros((4, 24, 24, 24), np.float32)
    by_key = {("07", s, i): patch for s in ("01", "02") for i in (1, 2, 3)}
    keys, labels = match_ratings(ratings, by_key)
    assert keys == [("07", "01", 1), ("07", "02", 1), ("07", "01", 2), ("07", "02", 2)]
    assert labels.tolist() == [1, 1, 0, 0]


def test_patches_by_key_keep_one_patch_per_lesion():
    rng = np.random.default_rng(0)
    patches = toy_patches(np.array([0, 1, 0]), rng)
    data = PatchSet(
        patches,
        np.array([0, 0, 1], np.uint8),
        np.array(["phase", "qsm", "qsm"]),
        np.array([3, 3, 4]),
        np.array(["sub-01"] * 3),
        np.array(["ses-01"] * 3),
    )
    by_key = data.by_key()
    assert sorted(by_key) == [("01", "01", 3), ("01", "01", 4)]
    np.testing.assert_array_equal(by_key[("01", "01", 3)], patches[1])  # the QSM patch


def test_command_evaluates_without_writing(trained, shards, tmp_path, capsys):
    from smoulder.rims.command import run_train, train_parser

    run, _ = trained
    rows = [
        (f"sub-0{s}", "ses-01", i, "yes" if i % 3 == 1 else "no")
        for s in (1, 5)
        for i in (1, 2, 3, 4)
    ]
    tsv = _ratings(tmp_path / "r.tsv", rows)
    argv = [str(tmp_path / "site"), "--shards", str(shards), "--ratings", str(tsv)]
    with pytest.raises(ConfigError, match="--init"):
        run_train(train_parser().parse_args([*argv, "--device", "cpu"]))
    options = ["--init", str(run / "bundle"), "--folds", "2", "--epochs", "1", "--device", "cpu"]
    assert run_train(train_parser().parse_args([*argv, *options])) == 0
    out = capsys.readouterr().out
    assert "fine-tuned model" in out and "nothing written" in out
    assert not (tmp_path / "site").exists()


def test_rule_measures_in_the_shards_are_fused_with_the_logit(shards, tmp_path):
    """Shards with the rule-based measures give a bundle that fuses them; it refuses to
    predict without them, and a shard set where one shard lacks them trains without."""
    from smoulder.rims.rules import FEATURES

    folder = tmp_path / "measured"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for f in sorted(shards.glob("*.npz")):
        with np.load(f) as data:
            arrays = dict(data)
        informative = arrays["labels"] + rng.normal(0, 0.3, arrays["labels"].size)
        features = rng.normal(0, 1, (arrays["labels"].size, len(FEATURES)))
        features[:, 0] = informative  # the coverage carries the label
        np.savez(folder / f.name, **arrays, features=features.astype(np.float32))
    assert load_shards([folder]).features.shape[1] == len(FEATURES)
    metrics = train(tmp_path / "run", [folder], epochs=1, batch_size=16, seed=0, threads=2,
                    network=TINY, say=print)  # fmt: skip
    assert metrics["fusion"]["features"] == list(FEATURES)
    assert metrics["validation"]["roc_auc"] >= metrics["validation_network_only"]["roc_auc"]
    bundle = load_bundle(metrics["bundle"])
    data = load_shards([folder])
    with pytest.raises(ValueError, match="pass features="):
        predict(bundle, data.patches[:2].astype(np.float32))
    prob = predict(bundle, data.patches[:2].astype(np.float32), features=data.features[:2])
    assert prob.shape == (2,) and np.all((prob >= 0) & (prob <= 1))
    (folder / "a.npz").unlink()
    np.savez(folder / "a.npz", **dict(np.load(shards / "a.npz")))  # no measures
    assert load_shards([folder]).features is None


# ----------------------------------------------------------------------------- strata


def _two_strata(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Logits whose evidence differs by stratum: sharp at 7 T (under-confident logits), soft
    at 3 T (over-confident ones): one pooled map cannot fit both."""
    y = rng.random(n) < 0.3
    field = np.where(rng.random(n) < 0.5, 7.0, 3.0)
    truth = np.where(field == 7.0, 6.0, 1.0) * (2 * y - 1) + rng.normal(0, 1.0, n)
    z = np.where(field == 7.0, truth / 4, truth * 3)  # what the network says
    # the labels follow the true logit, so the right map is per stratum
    y = rng.random(n) < cal.sigmoid(truth)
    return z, y.astype(int), np.array(["qsm"] * n), field


def test_stratified_calibration_fits_each_field_and_beats_one_map():
    rng = np.random.default_rng(5)
    z, y, kinds, field = _two_strata(3000, rng)
    fit, test = slice(0, 1500), slice(1500, None)
    strat, report = cal.fit_stratified_calibration(z[fit], y[fit], kinds[fit], field[fit])
    assert {"qsm@7T", "qsm@3T"} <= set(strat.strata), report
    pooled, _ = cal.fit_calibration(z[fit], y[fit])
    zt, yt, kt, ft = z[test], y[test], kinds[test], field[test]
    for tesla in (3.0, 7.0):  # calibrated within each field, not only on average
        at = ft == tesla
        one = cal.expected_calibration_error(pooled(zt[at]), yt[at])
        each = cal.expected_calibration_error(strat(zt[at], kt[at], ft[at]), yt[at])
        assert each < one / 2, (tesla, one, each)
    # an unknown field or input falls back to the pooled map
    np.testing.assert_allclose(strat(z[test], "qsm", None), strat.pooled(z[test]))
    np.testing.assert_allclose(strat(z[:5], "swi", 7.0), strat.pooled(z[:5]))
    # a stratum with too few lesions gets no map of its own, and says why
    small, rep = cal.fit_stratified_calibration(z[:100], y[:100], kinds[:100], field[:100])
    assert not small.strata and "fewer than" in rep["qsm@7T"]["why"]


def test_stratified_bundle_roundtrip_uses_the_stratum(tmp_path):
    net = TINY.build()
    strat = cal.StratifiedCalibration(
        cal.Calibration("temperature", temperature=1.0),
        {"phase": cal.Calibration("temperature", temperature=4.0)},
    )
    points = {"balanced": 0.5, "high_specificity": 0.8, "high_sensitivity": 0.2}
    save_bundle(tmp_path / "b", net, strat, points, {}, network_def=TINY)
    bundle = load_bundle(tmp_path / "b")
    assert bundle.calibration == strat
    x = toy_patches(np.array([1, 0, 1]), np.random.default_rng(0)).astype(np.float32)
    z = predict_logits(bundle.network, x)
    np.testing.assert_allclose(predict(bundle, x, input_kind="phase"), cal.sigmoid(z / 4.0))
    np.testing.assert_allclose(predict(bundle, x, input_kind="qsm", b0_tesla=7.0), cal.sigmoid(z))
    assert "per stratum (phase)" in (tmp_path / "b" / "docs" / "README.md").read_text()


def test_recalibration_reports_out_of_fold_and_writes_only_when_asked(
    trained, shards, tmp_path, capsys
):
    """The command keeps the network, prints the out-of-fold ECE before and after per
    stratum, writes RUN/bundle only with --write, and never into the package's models."""
    from smoulder.rims.command import run_train, train_parser

    run, _ = trained
    folder = tmp_path / "fields"
    folder.mkdir()
    for f in sorted(shards.glob("*.npz")):
        with np.load(f) as data:
            arrays = dict(data)
        b0 = np.where(np.arange(arrays["labels"].size) % 4 < 2, 3.0, 7.0).astype(np.float32)
        np.savez(folder / f.name, **arrays, b0_tesla=b0)
    data = load_shards([folder])
    assert sorted(set(data.fields().tolist())) == [3.0, 7.0]
    result = recalibrate(load_bundle(run / "bundle"), data, folds=3, say=print)
    after = result["report"]["out_of_fold"]["after"]
    assert {"all", "qsm@3T", "qsm@7T", "phase@3T", "phase@7T"} == set(after)
    assert sum(after[k]["lesions"] for k in after if k != "all") == len(data)
    argv = [str(tmp_path / "re"), "--recalibrate", "--init", str(run / "bundle")]
    argv += ["--shards", str(folder), "--folds", "3", "--device", "cpu"]
    assert run_train(train_parser().parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert "recalibrated (out of fold)" in out and "nothing written" in out
    assert (tmp_path / "re" / "recalibration.json").is_file()
    assert not (tmp_path / "re" / "bundle").exists()
    thinned = [*argv, "--rim-share", "0.1", "0.2"]
    assert run_train(train_parser().parse_args(thinned)) == 0
    report = json.loads((tmp_path / "re" / "recalibration.json").read_text())
    assert report["data"]["rim_share"] == [0.1, 0.2]
    # each of the 8 subjects has 4 rims among 12 lesions; a share of at most 0.2 keeps
    # round(0.2 / 0.8 * 8) = 2 of them
    assert int(data.labels.sum()) == 32 and report["data"]["rims"] <= 2 * 8
    args = [*argv, "--write", "--bundle-version", "0.0.1-test"]
    assert run_train(train_parser().parse_args(args)) == 0
    written = load_bundle(tmp_path / "re" / "bundle")
    assert written.version == "0.0.1-test" and written.network_def == TINY
    with pytest.raises(ConfigError, match="found a bundle there"):
        run_train(train_parser().parse_args(args))
