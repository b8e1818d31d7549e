"""Train the lesion-candidate classifier (:mod:`smoulder.segmentation.candidates`) on phantoms.

``smoulder train candidates RUN`` generates the phantoms of :data:`TRAINING_PHANTOMS` (whole
heads at 1–3 mm, thick-slice FLAIR, low and high SNR, CSF not nulled on the FLAIR where it
flows in (``flair_inflow``); seeds that no benchmark or test uses),
segments every session with the shipped network and refinement but no screening, labels each
candidate by the phantom's truth (a candidate that touches a true lesion is a lesion), and
fits the two logistic models (with the T1 measures, and FLAIR only: the FLAIR-only sessions
are segmented again without their T1). Each phantom's table is kept in
``RUN/tables/<name>.npz``, so a rerun resumes where it stopped; ``RUN/candidates.json`` is
the classifier and ``RUN/summary.json`` its training figures. ``--install BUNDLE`` copies it
into a bundle's ``configs/``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from smoulder.segmentation.candidates import (
    FEATURES,
    T1_FEATURES,
    CandidateClassifier,
    LogisticModel,
    fit_logistic,
)


@dataclass(frozen=True)
class TrainingPhantom:
    """One phantom dataset of the training set."""

    name: str
    seed: int
    resolution_mm: float
    flair_slice_mm: float | None = None
    snr: float = 30.0
    subjects: int = 2
    flair_inflow: float = 0.0


#: The training phantoms: seeds 101+ (benchmarks use 0–3, tests small ones).
TRAINING_PHANTOMS: tuple[TrainingPhantom, ...] = (
    TrainingPhantom("r1.0", 101, 1.0),
    TrainingPhantom("r1.5-snr20", 102, 1.5, snr=20.0),
    TrainingPhantom("r2.0", 103, 2.0),
    TrainingPhantom("r1.0-flair3", 104, 1.0, flair_slice_mm=3.0),
    TrainingPhantom("r3.0", 105, 3.0),
    TrainingPhantom("r3.0-snr40", 106, 3.0, snr=40.0),
    TrainingPhantom("r2.5-snr20", 107, 2.5, snr=20.0),
    TrainingPhantom("r1.0-inflow", 108, 1.0, flair_inflow=0.3),
    TrainingPhantom("r1.5-inflow", 109, 1.5, flair_inflow=0.5),
    TrainingPhantom("r2.0-inflow", 110, 2.0, flair_inflow=0.3),
)


def _truth_on(flair: nib.Nifti1Image, truth: nib.Nifti1Image) -> np.ndarray:
    """Return the true lesion mask on the FLAIR's grid (nearest neighbour where grids differ)."""
    from smoulder.grids import resample_to_grid

    data = (np.asarray(truth.dataobj) > 0).astype(np.float32)
    if data.shape == flair.shape[:3] and np.allclose(truth.affine, flair.affine, atol=1e-4):
        return data > 0
    return resample_to_grid(data, truth.affine, flair.shape[:3], flair.affine, order=0) > 0.5


def _labels(instances: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Return, per candidate 1..n, whether it touches the true lesion mask."""
    n = int(instances.max())
    return np.bincount(instances[truth], minlength=n + 1)[1:] > 0


def phantom_table(spec: TrainingPhantom, work: Path) -> dict[str, np.ndarray]:
    """Return the candidates of one training phantom: measures, labels, and T1 use per row."""
    from smoulder.phantom.dataset import generate_dataset
    from smoulder.phantom.generate import PhantomConfig
    from smoulder.segmentation.inference import segment
    from smoulder.segmentation.network import load_bundle

    config = PhantomConfig(
        subjects=spec.subjects,
        sessions=1,
        seed=spec.seed,
        resolution_mm=spec.resolution_mm,
        flair_slice_mm=spec.flair_slice_mm,
        snr=spec.snr,
        lesions=16,
        flair_inflow=spec.flair_inflow,
    )
    root = generate_dataset(work / spec.name, config)
    bundle = load_bundle(None, "cpu")
    tables, labels, with_t1 = [], [], []
    for anat in sorted(root.glob("sub-*/ses-*/anat")):
        prefix = f"{anat.parent.parent.name}_{anat.parent.name}"
        flair = nib.load(anat / f"{prefix}_FLAIR.nii.gz")
        t1 = nib.load(anat / f"{prefix}_T1w.nii.gz")
        truth_dir = root / "derivatives" / "truth" / anat.relative_to(root)
        truth = _truth_on(
            flair, nib.load(truth_dir / f"{prefix}_space-T1w_desc-lesions_dseg.nii.gz")
        )
        for t1_or_none in (t1, None):
            result = segment(flair, t1_or_none, bundle=bundle, screen_candidates=False)
            found = _labels(np.asarray(result.instances.dataobj), truth)
            tables.append(result.candidates["features"])
            labels.append(found)
            with_t1.append(np.full(len(found), t1_or_none is not None))
    return {
        "features": np.concatenate(tables) if tables else np.zeros((0, len(FEATURES))),
        "labels": np.concatenate(labels) if labels else np.zeros(0, bool),
        "with_t1": np.concatenate(with_t1) if with_t1 else np.zeros(0, bool),
    }


def _scores(model: LogisticModel, table: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    keep = model.probability(table) >= model.threshold
    tp = int((keep & labels).sum())
    return {
        "candidates": int(len(labels)),
        "lesions": int(labels.sum()),
        "kept": int(keep.sum()),
        "lesions_kept": tp,
        "precision_before": round(float(labels.mean()), 4) if len(labels) else float("nan"),
        "precision_after": round(tp / max(int(keep.sum()), 1), 4),
        "recall_after": round(tp / max(int(labels.sum()), 1), 4),
    }


def train(run: Path, phantoms: tuple[TrainingPhantom, ...] = TRAINING_PHANTOMS) -> Path:
    """Build (or resume) the candidate tables in ``run`` and fit the classifier; return its file."""
    tables = run / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    parts = []
    for spec in phantoms:
        path = tables / f"{spec.name}.npz"
        if not path.is_file():
            with tempfile.TemporaryDirectory(dir=run) as work:
                table = phantom_table(spec, Path(work))
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, **table)
            tmp.replace(path)
            print(
                f"{spec.name}: {len(table['labels'])} candidates, "
                f"{int(table['labels'].sum())} lesions",
                flush=True,
            )
        parts.append(dict(np.load(path)))
    table = np.concatenate([p["features"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts]).astype(bool)
    with_t1 = np.concatenate([p["with_t1"] for p in parts]).astype(bool)
    flair_features = tuple(f for f in FEATURES if f not in T1_FEATURES)
    models = {
        "with_t1": fit_logistic(table[with_t1], labels[with_t1], FEATURES),
        "flair_only": fit_logistic(table[~with_t1], labels[~with_t1], flair_features),
    }
    classifier = CandidateClassifier(models["with_t1"], models["flair_only"])
    out = run / "candidates.json"
    classifier.save(out)
    summary = {
        "phantoms": [spec.__dict__ for spec in phantoms],
        "with_t1": _scores(models["with_t1"], table[with_t1], labels[with_t1]),
        "flair_only": _scores(models["flair_only"], table[~with_t1], labels[~with_t1]),
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return out


def install(classifier: Path, bundle: Path) -> Path:
    """Copy a trained classifier into ``bundle/configs/candidates.json``; return the copy."""
    CandidateClassifier.load(classifier)  # refuse a file that does not read
    target = bundle / "configs" / "candidates.json"
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(classifier, tmp)
    tmp.replace(target)
    return target
