"""The lesion-candidate classifier: measures, model, shipped weights, training on phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smoulder.errors import InputError
from smoulder.segmentation.candidates import (
    FEATURES,
    CandidateClassifier,
    candidate_features,
    fit_logistic,
    keep_candidates,
)
from smoulder.segmentation.classes import CLASSES, LESION
from smoulder.segmentation.network import bundle_dir, load_bundle

CSF, CGM, WM = CLASSES.index("CSF"), CLASSES.index("cortical_GM"), CLASSES.index("WM")


def brain_with_two_candidates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return instances, class probabilities, FLAIR and T1 of a 1-mm block of brain.

    White matter fills the block; a cortical ribbon and CSF lie along one face. Candidate 1 is
    a clear lesion (sphere of 4 mm radius deep in the white matter: FLAIR 1.7× WM, T1 0.8×,
    probability 0.98); candidate 2 a one-voxel speck on the cortex next to CSF (FLAIR 1.3× WM,
    T1 CSF-dark, probability 0.6).
    """
    shape = (40, 40, 40)
    probs = np.zeros((len(CLASSES), *shape), np.float32)
    flair = np.full(shape, 100.0, np.float32)
    t1 = np.full(shape, 100.0, np.float32)
    probs[WM] = 1.0
    cortex, csf = np.zeros(shape, bool), np.zeros(shape, bool)
    cortex[:, :, 33:36], csf[:, :, 36:] = True, True
    for mask, cls, fl, t in ((cortex, CGM, 125.0, 75.0), (csf, CSF, 20.0, 30.0)):
        probs[:, mask] = 0.0
        probs[cls][mask] = 1.0
        flair[mask], t1[mask] = fl, t
    z, y, x = np.ogrid[:40, :40, :40]
    lesion = (z - 15) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= 16
    inst = np.zeros(shape, np.int32)
    inst[lesion] = 1
    inst[20, 20, 35] = 2
    for index, (p, fl, t) in ((1, (0.98, 170.0, 80.0)), (2, (0.6, 130.0, 45.0))):
        m = inst == index
        probs[:, m] = (1 - p) / (len(CLASSES) - 1)
        probs[LESION][m] = p
        flair[m], t1[m] = fl, t
    return inst, probs, flair, t1


def test_measures_of_a_clear_lesion_and_a_speck() -> None:
    inst, probs, flair, t1 = brain_with_two_candidates()
    table = candidate_features(inst, probs, flair, t1, (1.0, 1.0, 1.0))
    col = {name: table[:, i] for i, name in enumerate(FEATURES)}
    assert table.shape == (2, len(FEATURES))
    assert col["log_ul"][0] == pytest.approx(np.log10(inst[inst == 1].size))
    assert col["log_ul"][1] == pytest.approx(0.0)
    assert col["flair_wm"] == pytest.approx([1.7, 1.3])
    assert col["t1_wm"] == pytest.approx([0.8, 0.45])
    assert col["csf_mm"][0] == pytest.approx(5.0)  # capped: far from CSF
    assert col["csf_mm"][1] == pytest.approx(1.0)
    assert col["gm_ring"][1] > 0.3 > col["gm_ring"][0]
    # without a T1 its measures say "like white matter"
    no_t1 = candidate_features(inst, probs, flair, None, (1.0, 1.0, 1.0))
    assert no_t1[:, FEATURES.index("t1_wm")] == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("has_t1", [True, False])
def test_shipped_classifier_keeps_a_clear_lesion_and_drops_a_speck(has_t1: bool) -> None:
    classifier = load_bundle(None, "cpu").candidates
    assert classifier is not None, "the shipped segmentation bundle has no candidate classifier"
    inst, probs, flair, t1 = brain_with_two_candidates()
    table = candidate_features(inst, probs, flair, t1 if has_t1 else None, (1.0, 1.0, 1.0))
    model = classifier.model(has_t1)
    p = model.probability(table)
    assert p[0] >= model.threshold > p[1]
    kept = keep_candidates(inst, p, model.threshold)
    assert (kept == 1).sum() == (inst == 1).sum() and not (kept == 2).any()


def test_fit_needs_both_kinds_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, len(FEATURES)))
    y = x[:, 3] + 0.3 * rng.normal(size=300) > 0.5
    with pytest.raises(ValueError, match="both lesions and non-lesions"):
        fit_logistic(x, np.zeros(300))
    model = fit_logistic(x, y)
    p = model.probability(x)
    assert ((p >= model.threshold) == y).mean() > 0.85
    path = tmp_path / "candidates.json"
    CandidateClassifier(model, model).save(path)
    again = CandidateClassifier.load(path)
    assert again is not None
    np.testing.assert_allclose(again.with_t1.probability(x), p)
    assert CandidateClassifier.load(tmp_path / "absent.json") is None


def test_a_corrupt_classifier_file_is_named(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    source = bundle_dir()
    for part in ("configs", "models"):
        (bundle / part).mkdir(parents=True)
        for f in (source / part).iterdir():
            (bundle / part / f.name).write_bytes(f.read_bytes())
    (bundle / "configs" / "candidates.json").write_text(json.dumps({"with_t1": {}}))
    with pytest.raises(InputError, match="candidates.json"):
        load_bundle(bundle, "cpu")


@pytest.mark.slow
def test_training_on_a_phantom_resumes_from_its_tables(tmp_path: Path) -> None:
    from smoulder.segmentation.train_candidates import TrainingPhantom, install, train

    phantoms = (TrainingPhantom("tiny", 105, 3.0),)  # as the r3.0 training phantom
    run = tmp_path / "run"
    out = train(run, phantoms)
    table = run / "tables" / "tiny.npz"
    data = np.load(table)
    assert data["features"].shape[1] == len(FEATURES) and data["labels"].any()
    assert data["with_t1"].any() and not data["with_t1"].all()  # FLAIR-only rows too
    summary = json.loads((run / "summary.json").read_text())
    assert summary["with_t1"]["candidates"] == int(data["with_t1"].sum())
    before = table.stat().st_mtime_ns
    train(run, phantoms)  # resumes: the phantom is not segmented again
    assert table.stat().st_mtime_ns == before
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    assert CandidateClassifier.load(install(out, bundle)) is not None
