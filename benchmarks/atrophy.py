"""Benchmark: whole-brain, grey-matter and cord volume loss within the subject.

    python benchmarks/atrophy.py --out DIR [--quick] [--methods m1,m2] [--cases c1,c2]
                                 [--cache DIR] [--threads 2] [--append]

Writes ``DIR/atrophy.json`` (a list of records) and ``DIR/atrophy.md`` (the table, with the
targets of the issue).

Cases
-----
``atrophy-<x>`` — smoulder's phantom (``generate_dataset``), one subject, two sessions a year
    apart, whole-brain volume change ``-x`` %/year (x = 0.2, 0.5, 1.0, 1.5), grey matter 0.3
    %/year faster, cord area -1.8 %/year; the usual lesions (new, expanding, shrinking), head
    repositioning, a new bias field and noise per session. Truth: the phantom's
    ``desc-atrophy_truth.tsv`` (exact partial-volume volumes; the cord's π·a·b).
``rescan-position`` — the same with no change at all: new noise, bias field and head position.
``rescan-voxel`` — a rescan with a changed voxel size: the first session of the rescan subject
    (1 mm) against the second session of the same subject generated at 1.25 mm (same seed). The
    true change is the ratio of the two truth tables' volumes (a hair from 0).
``spinal_cord-t1``, ``spinal_cord-t2`` — real cervical-cord crops with manual masks
    (``../shared/data/spinal_cord``; Spinal Cord Toolbox test data): the CSA of smoulder's cord
    against the manual mask's on the same slices, and Dice (``benchmarks/cord_real.py``).

Methods
-------
``smoulder-jacobian`` / ``smoulder-boundary-shift`` — one run: smoulder's segmentation of each
    session (``smoulder.segmentation.inference.segment``, FLAIR + T1w), the within-subject space
    (``smoulder.atrophy.subject.atrophy_space``: the FLAIRs coarsened to the configuration's
    ``atrophy.registration_mm``, 1.5 mm, registered half way by greedy on the CPU) and
    ``smoulder.atrophy.subject.subject_atrophy``: PBVC by Jacobian integration and by boundary
    shift, grey-matter change (Jacobian integration over the joint grey-matter map), the cord
    area of each session at the subject's common level. ``wall_s``: space and atrophy (the
    segmentation, which the pipeline needs anyway, excluded).
``ants-jacobian`` — ANTsPy SyN (``ants.registration(type_of_transform="SyN")``, rigid + affine +
    SyN, its defaults) of the second session's T1w onto the first's, PBVC the mean over the
    first session's brain (smoulder's segmentation, the same as smoulder's) of the Jacobian
    determinant of the whole map (SyN field × affine), grey matter likewise.
``samseg-difference`` — SAMSEG (PyPI ``samseg``, ``benchmarks/peers/samseg_env.sh``) run on each
    session independently (T1w + FLAIR, lesion model); PBVC and grey-matter change the
    difference of the two sessions' volumes (brain: grey + white matter + lesions). What many
    users do today.

Measured
--------
``pbvc_abs_error_pp`` (atrophy cases), ``scan_rescan_abs_pbvc_pct`` (rescan cases: |measured −
true| of the PBVC), ``gm_change_error_pp`` (|measured − true| grey-matter change),
``csa_error_pct`` (mean over sessions of |CSA − true CSA| / true, %), ``csa_cov_pct`` (rescan
cases: the coefficient of variation of the two sessions' measured/true CSA ratios, %: the
phantom made at 1.25 mm draws its cord anew, 78.8 against 86.6 mm²), ``wall_s``,
``peak_rss_mb`` (the method's child process). ``--quick`` (< 10 min on 2 cores): phantom at
2 mm, ``atrophy-1.0`` and ``rescan-position``, smoulder and ANTs, and the real cord crops.
Full: 1 mm, every case, every method (SAMSEG: about 17 min per 1-mm session on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchenv  # noqa: E402

NAME = "atrophy"
ATROPHY_RATES = (0.2, 0.5, 1.0, 1.5)
CASES = (
    *(f"atrophy-{x}" for x in ATROPHY_RATES),
    "rescan-position",
    "rescan-voxel",
    "spinal_cord-t1",
    "spinal_cord-t2",
)
QUICK_CASES = ("atrophy-1.0", "rescan-position", "spinal_cord-t1", "spinal_cord-t2")
METHODS = ("smoulder", "ants-jacobian", "samseg-difference")
QUICK_METHODS = ("smoulder", "ants-jacobian")
RESCAN_VOXEL_MM = 1.25
TARGETS = {
    "pbvc_abs_error_pp": 0.1,
    "scan_rescan_abs_pbvc_pct": 0.1,
    "gm_change_error_pp": 0.3,
    "csa_error_pct": 5.0,
    "csa_cov_pct": 1.5,
}
KEYS = (
    "pbvc_true_pct", "pbvc_pct", "pbvc_abs_error_pp", "scan_rescan_abs_pbvc_pct",
    "gm_change_true_pct", "gm_change_pct", "gm_change_error_pp", "csa_error_pct", "csa_cov_pct",
    "dice", "wall_s", "peak_rss_mb",
)  # fmt: skip


# ============================================================================== phantom cases


def phantom_config(case: str, res_mm: float, seed: int) -> Any:
    """Return the ``PhantomConfig`` of a phantom case."""
    from smoulder.phantom.generate import PhantomConfig

    common = {"subjects": 1, "sessions": 2, "resolution_mm": res_mm, "lesions": 10}
    if case.startswith("atrophy-"):
        return PhantomConfig(
            seed=seed + int(float(case.split("-")[1]) * 10),
            pbvc_per_year=-float(case.split("-")[1]),
            gm_extra_change_per_year=-0.3,
            cord_loss_per_year_pct=-1.8,
            **common,
        )
    return PhantomConfig(
        seed=seed + 99,
        pbvc_per_year=0.0,
        gm_extra_change_per_year=0.0,
        cord_loss_per_year_pct=0.0,
        new_lesions_per_session=0,
        sel_fraction=0.0,
        shrinking_fraction=0.0,
        **common,
    )


def phantom(case: str, res_mm: float, args: argparse.Namespace) -> Path:
    """Return the cached phantom dataset of a case at ``res_mm`` (generated when missing)."""
    from smoulder.phantom.dataset import generate_dataset

    version = benchenv.source_fingerprint(*benchenv.PHANTOM_MODULES)
    name = "rescan" if case.startswith("rescan") else case
    root = args.cache / f"atrophy-{name}-{res_mm:g}mm-s{args.seed}-{version}"
    if not (root / "participants.tsv").is_file():
        print(f"  generating {root.name} ...", flush=True)
        generate_dataset(root, phantom_config(case, res_mm, args.seed))
    return root


def session_files(root: Path, session: str) -> dict[str, Any]:
    """Return one phantom session's images and its truth row."""
    anat = root / "sub-01" / f"ses-{session}" / "anat"
    truth = root / "derivatives" / "truth" / "sub-01" / "sub-01_desc-atrophy_truth.tsv"
    from smoulder.images import read_tsv

    row = next(r for r in read_tsv(truth) if r["session"] == f"ses-{session}")
    return {
        "label": session,
        "flair": str(anat / f"sub-01_ses-{session}_FLAIR.nii.gz"),
        "t1": str(anat / f"sub-01_ses-{session}_T1w.nii.gz"),
        "brain_ml": float(row["brain_volume_ml"]),
        "gm_ml": float(row["gm_volume_ml"]),
        "csa_mm2": float(row["cord_csa_mm2"]),
    }


def case_pair(case: str, res_mm: float, args: argparse.Namespace) -> dict[str, Any]:
    """Return a phantom case's two sessions, their truth and the true changes."""
    root = phantom(case, res_mm, args)
    first = session_files(root, "01")
    if case == "rescan-voxel":
        other = phantom(case + "-b", res_mm * RESCAN_VOXEL_MM, args)
        second = session_files(other, "02")
    else:
        second = session_files(root, "02")
    return {
        "case": case,
        "sessions": [first, second],
        "pbvc_true_pct": 100 * (second["brain_ml"] / first["brain_ml"] - 1),
        "gm_change_true_pct": 100 * (second["gm_ml"] / first["gm_ml"] - 1),
    }


# ================================================================================ segmentation


def segmentation(session: dict[str, Any], args: argparse.Namespace) -> dict[str, str]:
    """Return smoulder's cached segmentation of a session: probability maps, mask, class map."""
    import hashlib

    key = hashlib.sha256(f"{session['flair']}|{session['t1']}".encode()).hexdigest()[:12]
    folder = args.cache / f"atrophy-seg-{benchenv.source_fingerprint('smoulder.segmentation')}"
    folder = folder / key
    files = {k: str(folder / f"{k}.nii.gz") for k in ("gm", "wm", "lesion", "csf", "brain")}
    if not (folder / "done").is_file():
        from smoulder.devices import torch_threads
        from smoulder.segmentation.inference import segment

        folder.mkdir(parents=True, exist_ok=True)
        with torch_threads(args.threads):
            result = segment(nib.load(session["flair"]), nib.load(session["t1"]), device="cpu")
        for k in ("gm", "wm", "lesion", "csf"):
            nib.save(result.probseg[k.upper() if k != "lesion" else "lesion"], files[k])
        nib.save(result.brain_mask, files["brain"])
        (folder / "done").write_text("ok\n")
    return files


# ===================================================================================== methods


def run_smoulder(pair: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Child process: smoulder's space and atrophy on a pair (segmentations given)."""
    from smoulder.atrophy.subject import AtrophySession, atrophy_space, subject_atrophy
    from smoulder.config import resolve

    sessions = []
    for s in pair["sessions"]:
        seg = s["seg"]
        gm = nib.load(seg["gm"])
        parts = [np.asarray(nib.load(seg[k]).dataobj, np.float32) for k in ("gm", "wm", "lesion")]
        brain = nib.Nifti1Image(np.clip(sum(parts), 0, 1).astype(np.float32), gm.affine)
        t1 = nib.load(s["t1"])
        flair = nib.load(s["flair"])
        sessions.append(
            AtrophySession(s["label"], flair, brain, gm, t1, cord_image=t1, cord_image_name="T1w")
        )
    start = time.perf_counter()
    registration_mm = resolve().atrophy.registration_mm
    refs = {s.label: s.reference for s in sessions}
    space = atrophy_space(refs, registration_mm, threads=args.threads, seed=args.seed)
    mid = time.perf_counter()
    rows, cords = subject_atrophy(space, sessions, [0.0, 1.0], boundary_shift=True)
    end = time.perf_counter()
    later = rows[1]
    return {
        "pbvc_jacobian": later["pbvc_jacobian_interval_pct"],
        "pbvc_boundary_shift": later["pbvc_boundary_shift_interval_pct"],
        "gm_change": later["gm_change_interval_pct"],
        "csa": [None if c is None else c.csa_mm2 for c in cords],
        "cord_reason": [None if c is None else c.reason for c in cords],
        "space_s": mid - start,
        "atrophy_s": end - mid,
        "wall_s": end - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_ants(pair: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Child process: ANTs SyN of session 2's T1w onto session 1's, Jacobian integration."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import ants

    first, second = pair["sessions"]
    start = time.perf_counter()
    fixed, moving = ants.image_read(first["t1"]), ants.image_read(second["t1"])
    reg = ants.registration(fixed, moving, type_of_transform="SyN", random_seed=args.seed)
    warp = next(t for t in reg["fwdtransforms"] if t.endswith(".nii.gz"))
    affine = next(t for t in reg["fwdtransforms"] if t.endswith(".mat"))
    jac = ants.create_jacobian_determinant_image(fixed, warp).numpy()
    matrix = np.asarray(ants.read_transform(affine).parameters[:9]).reshape(3, 3)
    jac = jac * abs(float(np.linalg.det(matrix)))  # the whole map: field after the affine
    seg = first["seg"]
    # ANTs' arrays are in its own (LPS-indexed but same voxel order) layout: same voxels
    brain = sum(np.asarray(nib.load(seg[k]).dataobj, np.float32) for k in ("gm", "wm", "lesion"))
    gm = np.asarray(nib.load(seg["gm"]).dataobj, np.float32)
    end = time.perf_counter()
    return {
        "pbvc": 100 * (float((brain * jac).sum()) / float(brain.sum()) - 1),
        "gm_change": 100 * (float((gm * jac).sum()) / float(gm.sum()) - 1),
        "wall_s": end - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_samseg(pair: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """SAMSEG on each session (cached by ``benchmarks/segmentation.py``'s runner); the
    difference of the volumes."""
    import segmentation as seg_bench

    if not seg_bench.RUN_SAMSEG.is_file():
        raise RuntimeError(f"{seg_bench.RUN_SAMSEG} is absent: run benchmarks/peers/samseg_env.sh")
    gm_labels, wm_labels = seg_bench.samseg_classes()
    volumes, wall, peak = [], 0.0, 0.0
    for s in pair["sessions"]:
        key = f"atrophy-{Path(s['flair']).parents[3].name}-{s['label']}"
        case = seg_bench.Case(key, Path(s["flair"]), Path(s["t1"]), Path(s["flair"]), 0.0)
        result = seg_bench.run_samseg(case, args)
        wall += float(result.get("wall_s", 0.0))
        peak = max(peak, float(result.get("peak_rss_mb", 0.0)))
        img = nib.load(result["seg"])
        labels = np.asarray(img.dataobj)
        voxel = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000
        gm = float(np.isin(labels, gm_labels).sum()) * voxel
        brain = gm + float(np.isin(labels, (*wm_labels, 99)).sum()) * voxel
        volumes.append((brain, gm))
    (b1, g1), (b2, g2) = volumes
    return {
        "pbvc": 100 * (b2 / b1 - 1),
        "gm_change": 100 * (g2 / g1 - 1),
        "wall_s": wall,
        "peak_rss_mb": peak,
    }


def in_child(function: Any, *params: Any) -> dict[str, Any]:
    """Return ``function(*params)`` run in a fresh process (its own peak memory)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *params).result()  # type: ignore[no-any-return]


# ===================================================================================== records


def phantom_records(case: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Return the records of every selected method on a phantom case."""
    pair = case_pair(case, args.res_mm, args)
    for s in pair["sessions"]:
        s["seg"] = segmentation(s, args)
    rescan = case.startswith("rescan")
    records = []

    def record(method: str, pbvc: float, gm: float, extra: dict[str, Any]) -> dict[str, Any]:
        error = abs(pbvc - pair["pbvc_true_pct"])
        rec = {
            "method": method,
            "case": case,
            "device": "cpu",
            "resolution_mm": args.res_mm,
            "pbvc_true_pct": round(pair["pbvc_true_pct"], 4),
            "pbvc_pct": round(pbvc, 4),
            "gm_change_true_pct": round(pair["gm_change_true_pct"], 4),
            "gm_change_pct": round(gm, 4),
            "gm_change_error_pp": round(abs(gm - pair["gm_change_true_pct"]), 4),
            ("scan_rescan_abs_pbvc_pct" if rescan else "pbvc_abs_error_pp"): round(error, 4),
        }
        rec.update(extra)
        return rec

    if "smoulder" in args.methods:
        print(f"  smoulder on {case} ...", flush=True)
        out = in_child(run_smoulder, pair, args)
        cost = {"wall_s": round(out["wall_s"], 1), "peak_rss_mb": round(out["peak_rss_mb"])}
        cord = {}
        csa = out["csa"]
        if all(c is not None for c in csa):
            truth = [s["csa_mm2"] for s in pair["sessions"]]
            errs = [abs(c / t - 1) * 100 for c, t in zip(csa, truth, strict=True)]
            cord["csa_error_pct"] = round(float(np.mean(errs)), 3)
            cord["csa_mm2"] = [round(c, 3) for c in csa]
            if rescan:  # of the measured/true ratios: the voxel pair's phantoms differ in cord
                ratio = np.array(csa) / np.array(truth)
                cord["csa_cov_pct"] = round(float(np.std(ratio, ddof=1) / ratio.mean() * 100), 3)
        else:
            cord["note"] = f"cord not measured: {out['cord_reason']}"
        for name, key in (("smoulder-jacobian", "pbvc_jacobian"),
                          ("smoulder-boundary-shift", "pbvc_boundary_shift")):  # fmt: skip
            extra = {**cost, **cord, "space_s": round(out["space_s"], 1),
                     "atrophy_s": round(out["atrophy_s"], 1)}  # fmt: skip
            records.append(record(name, float(out[key]), float(out["gm_change"]), extra))
    for method, function in (("ants-jacobian", run_ants), ("samseg-difference", run_samseg)):
        if method not in args.methods:
            continue
        print(f"  {method} on {case} ...", flush=True)
        try:
            child = method == "ants-jacobian"
            out = in_child(function, pair, args) if child else function(pair, args)
        except Exception as err:  # a peer that cannot run is a note, not a crash
            records.append({"method": method, "case": case, "device": "cpu",
                            "note": f"not run: {err}"})  # fmt: skip
            continue
        cost = {"wall_s": round(out["wall_s"], 1), "peak_rss_mb": round(out["peak_rss_mb"])}
        records.append(record(method, out["pbvc"], out["gm_change"], cost))
    return records


def cord_records(cases: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Return smoulder's records on the real cord crops."""
    import cord_real

    out = []
    for rec in cord_real.real_cord_cases(args.shared):
        if rec["case"] not in cases:
            continue
        out.append({
            "method": "smoulder-cord", "case": rec["case"], "device": "cpu",
            "csa_error_pct": round(abs(rec["csa_error_pct"]), 3),
            "csa_signed_error_pct": round(rec["csa_error_pct"], 3),
            "csa_mm2": round(rec["csa_mm2"], 3), "manual_csa_mm2": round(rec["manual_csa_mm2"], 3),
            "dice": round(rec["dice"], 4), "wall_s": round(rec["wall_s"], 2),
        })  # fmt: skip
    return out


def run_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Return the records of every selected case, writing the outputs after each case (a long
    run that stops keeps what it measured)."""
    records = cord_records([c for c in args.cases if c.startswith("spinal_cord")], args)
    for case in args.cases:
        if case.startswith("spinal_cord"):
            continue
        print(f"{case}:", flush=True)
        records += phantom_records(case, args)
        write_outputs(args, records)
    return records


# ===================================================================================== outputs


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def summary(records: list[dict[str, Any]]) -> list[str]:
    """Return the target lines: per method, the mean of each target metric over cases."""
    lines = ["| method | " + " | ".join(TARGETS) + " |", "|---" * (len(TARGETS) + 1) + "|"]
    methods = sorted({r["method"] for r in records})
    for m in methods:
        cells = []
        for key, target in TARGETS.items():
            values = [r[key] for r in records if r["method"] == m and isinstance(r.get(key), float)]
            if not values:
                cells.append("")
                continue
            mean = float(np.mean(values))
            cells.append(f"{mean:.3f} ({'met' if mean <= target else 'missed'} ≤ {target})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    """Write ``atrophy.json`` and ``atrophy.md`` to ``--out`` (merged with ``--append``)."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{NAME}.json"
    if args.append and path.is_file():
        keep = [
            r for r in json.loads(path.read_text())
            if (r["method"], r["case"]) not in {(x["method"], x["case"]) for x in records}
        ]  # fmt: skip
        records = keep + records
    args.append = args.append or bool(records)  # later writes of this run merge too
    path.write_text(json.dumps(records, indent=1) + "\n")
    lines = [
        "# Atrophy benchmark",
        "",
        f"Machine: {benchenv.machine()}. Date: {time.strftime('%Y-%m-%d')}. "
        f"Command: `python benchmarks/atrophy.py {' '.join(sys.argv[1:])}`.",
        f"Versions: {benchenv.versions(('smoulder', 'antspyx', 'nibabel', 'torch'))}.",
        "",
        "Means over cases (targets: PBVC error ≤ 0.1 pp, scan-rescan |PBVC| ≤ 0.1 %, GM change "
        "error ≤ 0.3 pp, CSA error ≤ 5 %, cord CoV ≤ 1.5 %):",
        "",
        *summary(records),
        "",
        "| method | case | " + " | ".join(KEYS) + " | note |",
        "|---" * (len(KEYS) + 3) + "|",
    ]
    for r in records:
        cells = [_fmt(r.get(k)) for k in KEYS]
        lines.append(f"| {r['method']} | {r['case']} | " + " | ".join(cells)
                     + f" | {r.get('note', '')} |")  # fmt: skip
    lines += ["", (__doc__ or "").split("Cases\n-----\n", 1)[-1]]
    (args.out / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", help=f"comma-separated of {', '.join(METHODS)}")
    parser.add_argument("--cases", help=f"comma-separated of {', '.join(CASES)}")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "smoulder-bench")
    parser.add_argument("--shared", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=3600, help="SAMSEG run limit (s)")
    parser.add_argument("--append", action="store_true", help="merge into an existing json")
    args = parser.parse_args(argv)
    args.res_mm = 2.0 if args.quick else 1.0
    args.methods = (
        args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else METHODS)
    )
    args.cases = args.cases.split(",") if args.cases else list(QUICK_CASES if args.quick else CASES)
    unknown = set(args.cases) - set(CASES) or set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    args.cache.mkdir(parents=True, exist_ok=True)
    write_outputs(args, run_benchmark(args))
    print(f"wrote {args.out / (NAME + '.json')} and {args.out / (NAME + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
