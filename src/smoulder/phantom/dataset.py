"""Render phantom sessions into a BIDS dataset, with the truth in ``derivatives/truth``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np

from smoulder import __version__
from smoulder.images import save_json, save_nifti, save_text, save_tsv
from smoulder.phantom import physics
from smoulder.phantom.anatomy import Anatomy, load_anatomy, resample_box
from smoulder.phantom.generate import (
    PhantomConfig,
    SessionTruth,
    Subject,
    chi_map_ppm,
    make_subject,
    mix,
    session_truth,
    solve_atrophy,
)
from smoulder.registration.itk import save_displacement_field

BIDS_VERSION = "1.10.0"
BASELINE_DATE = datetime(2020, 1, 6, 9, 0, 0)
FLAIR_PARAMS = {"tr_ms": 9000.0, "ti_ms": 2500.0, "te_ms": 90.0}
GRE_PARAMS = {"tr_ms": 30.0, "flip_deg": 15.0}
MP2RAGE = physics.MP2RAGEParams()
#: Columns of the per-session volume truth, with units, for the JSON data dictionary.
ATROPHY_COLUMNS: dict[str, str] = {
    "session": "session label",
    "years_from_baseline": "years",
    "brain_volume_ml": "parenchyma (GM + WM + lesions, incl. intraparenchymal vessels), ml",
    "gm_volume_ml": "cortical + deep grey matter, ml",
    "wm_volume_ml": "normal-appearing white matter (lesions excluded), ml",
    "lesion_volume_ml": "all lesions (partial volume), ml",
    "csf_volume_ml": "CSF incl. spinal canal, ml",
    "pbvc_from_baseline_pct": "percentage brain volume change since baseline, %",
    "pbvc_interval_pct": "percentage brain volume change since the previous session, %",
    "pbvc_per_year_pct": "PBVC since baseline divided by years, %/year",
    "gm_change_from_baseline_pct": "grey matter volume change since baseline, %",
    "cord_csa_mm2": "true spinal cord cross-sectional area (exact, pi*a*b), mm^2",
    "cord_csa_change_from_baseline_pct": "cord CSA change since baseline, %",
}
LESION_COLUMNS: dict[str, str] = {
    "lesion_id": "index in the desc-lesions dseg maps",
    "location": "periventricular | juxtacortical | deep | infratentorial",
    "shape_source": "synthetic | confluent | <real mask file>#<component>",
    "first_session": "label of the first session where the lesion exists",
    "kind": "stable | sel | shrinking | new",
    "sel": "yes when the lesion is slowly expanding",
    "radial_rate_mm_per_year": "true speed of the lesion boundary (concentric), mm/year",
    "volume_rate_ml_per_year": "volume change from first to last session (maps), ml/year",
    "rim": "yes (paramagnetic rim on >= 2/3 of the edge) | partial | no",
    "rim_coverage": "fraction of the lesion edge carrying the rim",
    "rim_width_mm": "rim shell thickness, mm",
    "rim_chi_ppm": "rim susceptibility above lesion tissue, ppm",
    "mimic": "none | vein_adjacent | central_vein | iso_rim",
    "center_x_mm": "template-space centre, mm",
    "center_y_mm": "template-space centre, mm",
    "center_z_mm": "template-space centre, mm",
}


class _BackgroundWriter:
    """Compress and write NIfTI files on worker threads (zlib releases the GIL).

    Writing gzip-compressed float images is the phantom's largest cost at 1 mm; overlapping it
    with the rendering of the next session uses the second core.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1))
        self.pending: list[Future[Path]] = []

    def nifti(self, data: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> None:
        self.pending.append(self.pool.submit(save_nifti, data, affine, path, dtype=dtype))

    def call(self, fn: Callable[..., Path], *args: object) -> None:
        self.pending.append(self.pool.submit(fn, *args))

    def wait(self) -> None:
        """Block until every file is written; re-raise the first failure."""
        for future in self.pending:
            future.result()
        self.pending.clear()

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()


def generate_dataset(
    out_dir: str | Path,
    config: PhantomConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return the root of a BIDS dataset of ``config.subjects`` synthetic subjects, written there.

    Raw images go to ``sub-*/ses-*/anat``; the truth (instance maps, tissue maps, χ, true
    deformations, per-lesion and per-session tables) to ``derivatives/truth``. Each file is
    written atomically; the dataset description is written last, so a dataset that has one is
    complete.
    """
    out = Path(out_dir)
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    nib.openers.Opener.default_compresslevel = 1  # fast gzip: phantom files are rewritten often
    label_maps = _label_maps(config.anatomy)
    participants = []
    writer = _BackgroundWriter()
    anatomy: Anatomy | None = None
    try:
        for index in range(config.subjects):
            # with label maps, subjects take them in turn; the template is loaded once
            label_map = label_maps[index % len(label_maps)] if label_maps else None
            if anatomy is None or (label_maps and len(label_maps) > 1):
                anatomy = load_anatomy(config.resolution_mm, label_map=label_map)
                say(
                    f"anatomy {anatomy.shape} at {config.resolution_mm} mm from {anatomy.source} "
                    f"({time.perf_counter() - start:.1f} s)"
                )
            subject = make_subject(anatomy, config, index)
            subject.atrophy_coefficients = solve_atrophy(anatomy, subject, config)
            write_subject(out, anatomy, subject, config, say, writer)
            participants.append(subject.label)
            say(f"sub-{subject.label} done ({time.perf_counter() - start:.1f} s)")
    finally:
        writer.close()
    assert anatomy is not None
    write_dataset_files(out, config, participants, anatomy)
    return out


def _label_maps(anatomy: str | None) -> list[Path]:
    """Return the label maps named by ``--anatomy`` (a file or a directory of them)."""
    if anatomy is None:
        return []
    path = Path(anatomy)
    maps = sorted(path.glob("*.nii*")) if path.is_dir() else [path]
    if not maps or not maps[0].exists():
        from smoulder.errors import InputError

        raise InputError(
            path,
            expected="a label map or a directory of them (*.nii.gz)",
            found="no such file" if not path.exists() else "no NIfTI files",
        )
    return maps


def write_subject(
    out: Path,
    anatomy: Anatomy,
    subject: Subject,
    config: PhantomConfig,
    say: Callable[[str], None],
    writer: _BackgroundWriter,
) -> None:
    """Render and write every session of ``subject`` with its truth."""
    sub = f"sub-{subject.label}"
    truth_dir = out / "derivatives" / "truth" / sub
    volumes: list[dict[str, object]] = []
    per_lesion: dict[int, dict[str, float]] = {}
    sessions_rows = []
    baseline_rigid = subject.rigid[0]
    for k in range(config.sessions):
        ses = f"ses-{k + 1:02d}"
        t0 = time.perf_counter()
        truth = session_truth(anatomy, subject, k)
        rng = np.random.default_rng((config.seed, int(subject.label), k, 7))
        chi = chi_map_ppm(truth, subject.tissues)
        images = render_session(truth, chi, anatomy, subject, config, rng)
        anat = out / sub / ses / "anat"
        for suffix, (data, affine, sidecar) in images.items():
            writer.nifti(data, affine, anat / f"{sub}_{ses}_{suffix}.nii.gz", np.float32)
            save_json(sidecar, anat / f"{sub}_{ses}_{suffix}.json")
        write_session_truth(
            truth_dir / ses / "anat",
            f"{sub}_{ses}",
            truth,
            chi,
            anatomy,
            subject,
            baseline_rigid,
            k,
            writer,
        )
        voxel_ml = float(np.prod(anatomy.spacing_mm)) / 1000
        row = session_volumes(truth, voxel_ml)
        row.update(session=ses, years_from_baseline=round(subject.years[k], 6))
        volumes.append(row)
        for lid, (_, f) in truth.lesion_fractions.items():
            per_lesion.setdefault(lid, {})[ses] = float(f.sum() * voxel_ml)
        when = BASELINE_DATE + timedelta(days=365.25 * subject.years[k])
        sessions_rows.append({"session_id": ses, "acq_time": when.isoformat(timespec="seconds")})
        say(
            f"{sub} {ses}: {len(images)} images, {len(truth.lesion_fractions)} lesions "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    save_tsv(sessions_rows, out / sub / f"{sub}_sessions.tsv")
    _finish_atrophy_table(volumes, config)
    save_tsv(volumes, truth_dir / f"{sub}_desc-atrophy_truth.tsv")
    save_json(
        {c: {"Description": d} for c, d in ATROPHY_COLUMNS.items()},
        truth_dir / f"{sub}_desc-atrophy_truth.json",
    )
    _write_lesion_tables(truth_dir, sub, subject, per_lesion, config)
    params = {
        "seed": list(subject.rng_seed),
        "config": asdict(config),
        "tissues_3T": {k: asdict(v) for k, v in subject.tissues.items()},
        "head_positions": [
            {
                "session": f"ses-{k + 1:02d}",
                "rotation": r.round(6).tolist(),
                "translation_mm": t.round(4).tolist(),
            }
            for k, (r, t) in enumerate(subject.rigid)
        ],
        "atrophy_coefficients": subject.atrophy_coefficients,
        "cord_axes_mm": list(subject.cord_axes_mm),
        "anatomy": anatomy.source,
        "lesions": [les.truth_record() for les in subject.lesions],
    }
    save_json(params, truth_dir / f"{sub}_phantom.json")


def render_session(
    truth: SessionTruth,
    chi: np.ndarray,
    anatomy: Anatomy,
    subject: Subject,
    config: PhantomConfig,
    rng: np.random.Generator,
) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, object]]]:
    """Return ``{BIDS suffix: (data, affine, sidecar)}`` for every contrast of a session."""
    tis = subject.tissues
    aff, shape, sp = anatomy.affine, anatomy.shape, anatomy.spacing_mm
    wm_mask = truth.channel("wm") > 0.9
    common = {
        "MagneticFieldStrength": config.b0_tesla,
        "Manufacturer": "smoulder phantom",
        "ManufacturersModelName": f"smoulder {__version__}",
    }
    out: dict[str, tuple[np.ndarray, np.ndarray, dict[str, object]]] = {}

    def grid(voxel: tuple[float, float, float]) -> tuple[np.ndarray, tuple[int, ...]]:
        if np.allclose(voxel, sp):
            return aff, shape
        extent = np.array(shape) * np.array(sp)
        new_shape = tuple(int(round(e / v)) for e, v in zip(extent, voxel, strict=True))
        new_aff = np.diag([*voxel, 1.0])
        # same field of view: the first voxel's corner coincides with the truth grid's
        new_aff[:3, 3] = aff[:3, 3] - np.array(sp) / 2 + np.array(voxel) / 2
        return new_aff, new_shape

    def acquire(
        signal: np.ndarray, voxel: tuple[float, float, float], snr: float, bias: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        sigma = float(np.abs(signal[wm_mask]).mean()) / snr
        g_aff, g_shape = grid(voxel)
        data = resample_box(signal * bias, aff, g_aff, g_shape)
        return physics.add_rician_noise(data, sigma, rng).astype(np.float32), g_aff

    def per_class(fn: Callable[[physics.Tissue], object]) -> dict[str, object]:
        return {name: fn(t) for name, t in tis.items()}

    flair_vox = (sp[0], sp[1], config.flair_slice_mm or sp[2])
    flair = mix(
        truth, per_class(lambda t: physics.flair_signal(t.pd, t.t1_ms, t.t2_ms, **FLAIR_PARAMS))
    )
    bias = physics.smooth_bias_field(shape, rng, strength=config.bias_strength)
    data, g_aff = acquire(flair, flair_vox, config.snr, bias)
    out["FLAIR"] = (
        data,
        g_aff,
        {
            **common,
            "RepetitionTime": FLAIR_PARAMS["tr_ms"] / 1000,
            "InversionTime": FLAIR_PARAMS["ti_ms"] / 1000,
            "EchoTime": FLAIR_PARAMS["te_ms"] / 1000,
            "PulseSequenceType": "IR-TSE",
        },
    )

    t1p = physics.T1W_DEFAULTS
    t1w = mix(truth, per_class(lambda t: physics.spgr_signal(t.pd, t.t1_ms, t.t2star_ms, **t1p)))
    bias = physics.smooth_bias_field(shape, rng, strength=config.bias_strength)
    data, g_aff = acquire(t1w, sp, config.snr, bias)
    out["T1w"] = (
        data,
        g_aff,
        {
            **common,
            "RepetitionTime": t1p["tr_ms"] / 1000,
            "EchoTime": t1p["te_ms"] / 1000,
            "FlipAngle": t1p["flip_deg"],
            "PulseSequenceType": "SPGR",
        },
    )

    inv = per_class(lambda t: physics.mp2rage_signals(t.pd, t.t1_ms, t.t2star_ms, params=MP2RAGE))
    bias = physics.smooth_bias_field(shape, rng, strength=config.bias_strength)
    inv1 = mix(truth, {k: v[0] for k, v in inv.items()}) * bias  # type: ignore[index]
    inv2 = mix(truth, {k: v[1] for k, v in inv.items()}) * bias  # type: ignore[index]
    sigma = float(np.abs(inv2[wm_mask]).mean()) / config.snr
    inv1 = physics.add_complex_noise(inv1, sigma, rng)
    inv2 = physics.add_complex_noise(inv2, sigma, rng)
    mp = {
        **common,
        "RepetitionTimePreparation": MP2RAGE.tr_mp2rage_ms / 1000,
        "RepetitionTimeExcitation": MP2RAGE.tr_gre_ms / 1000,
        "EchoTime": 0.003,
        "NumberShots": MP2RAGE.n_readouts,
        "InversionEfficiency": MP2RAGE.inversion_efficiency,
    }
    out["inv-1_part-mag_MP2RAGE"] = (
        np.abs(inv1).astype(np.float32),
        aff,
        {**mp, "InversionTime": MP2RAGE.ti1_ms / 1000, "FlipAngle": MP2RAGE.flip1_deg},
    )
    out["inv-2_part-mag_MP2RAGE"] = (
        np.abs(inv2).astype(np.float32),
        aff,
        {**mp, "InversionTime": MP2RAGE.ti2_ms / 1000, "FlipAngle": MP2RAGE.flip2_deg},
    )
    out["UNIT1"] = (
        physics.mp2rage_unit1(inv1, inv2).astype(np.float32),
        aff,
        {**common, "BasedOn": ["inv-1_part-mag_MP2RAGE", "inv-2_part-mag_MP2RAGE"]},
    )
    del inv1, inv2

    field_ppm = physics.field_from_chi(chi, sp).astype(np.float32)
    tes = np.asarray(config.echo_times_ms, np.float32)
    mags = mix(
        truth,
        per_class(
            lambda t: np.real(
                physics.gre_signal(
                    t.pd,
                    t.t1_ms,
                    t.t2star_ms,
                    0.0,
                    echo_times_ms=config.echo_times_ms,
                    b0_tesla=config.b0_tesla,
                    **GRE_PARAMS,
                )
            )
        ),
    )
    offset = physics.smooth_phase_offset(shape, rng)
    bias = physics.smooth_bias_field(shape, rng, strength=config.bias_strength)
    omega = 2 * np.pi * physics.GAMMA_BAR_MHZ_PER_T * config.b0_tesla * 1e-3  # rad per ppm per ms
    gre_vox = (config.gre_voxel_mm,) * 3 if config.gre_voxel_mm else sp
    sigma = float(mags[0][wm_mask].mean()) / config.snr
    for e, te in enumerate(tes):
        signal = (mags[e] * bias) * np.exp(1j * (offset + omega * field_ppm * te)).astype(
            np.complex64
        )
        g_aff, g_shape = grid(gre_vox)  # type: ignore[arg-type]
        signal = physics.add_complex_noise(resample_box(signal, aff, g_aff, g_shape), sigma, rng)
        side = {
            **common,
            "EchoTime": float(te) / 1000,
            "RepetitionTime": GRE_PARAMS["tr_ms"] / 1000,
            "FlipAngle": GRE_PARAMS["flip_deg"],
            "EchoNumber": e + 1,
        }
        out[f"echo-{e + 1}_part-mag_MEGRE"] = (np.abs(signal).astype(np.float32), g_aff, side)
        out[f"echo-{e + 1}_part-phase_MEGRE"] = (
            physics.wrap_phase(np.angle(signal)).astype(np.float32),
            g_aff,
            {**side, "Units": "rad"},
        )
    return out


def write_session_truth(
    folder: Path,
    prefix: str,
    truth: SessionTruth,
    chi: np.ndarray,
    anatomy: Anatomy,
    subject: Subject,
    baseline_rigid: tuple[np.ndarray, np.ndarray],
    session: int,
    writer: _BackgroundWriter,
) -> None:
    """Write a session's truth maps and true deformations (all on the session's T1w grid)."""
    aff = anatomy.affine
    p = f"{prefix}_space-T1w"
    sub, ses = prefix.split("_")[:2]
    side = {"SpatialReference": f"bids:raw:{sub}/{ses}/anat/{prefix}_T1w.nii.gz"}
    writer.nifti(truth.lesion_ids, aff, folder / f"{p}_desc-lesions_dseg.nii.gz", np.int16)
    ids = sorted(int(i) for i in np.unique(truth.lesion_ids) if i > 0)
    save_tsv(
        [{"index": i, "name": f"lesion-{i}"} for i in ids], folder / f"{p}_desc-lesions_dseg.tsv"
    )
    f = truth.channel
    lesion = f("lesion") + f("rim")
    maps = {
        "label-lesion_probseg": lesion,
        "label-rim_probseg": f("rim"),
        "label-CSF_probseg": f("csf"),
        "label-GM_probseg": f("gm") + f("deep_gm"),
        "label-WM_probseg": f("wm"),
        "label-cord_probseg": f("cord"),
        "label-brain_probseg": f("gm") + f("deep_gm") + f("wm") + lesion,
    }
    for name, data in maps.items():
        writer.nifti(data, aff, folder / f"{p}_{name}.nii.gz", np.float32)
        save_json(
            {**side, "Description": f"true partial-volume fraction ({name})"},
            folder / f"{p}_{name}.json",
        )
    writer.nifti(
        (maps["label-brain_probseg"] >= 0.5).astype(np.uint8),
        aff,
        folder / f"{p}_desc-brain_mask.nii.gz",
        np.uint8,
    )
    tissue = np.argmax(
        np.stack(
            [
                np.full(lesion.shape, 0.25, np.float32),
                f("csf"),
                maps["label-GM_probseg"],
                f("wm"),
                lesion,
                f("vein"),
                f("cord"),
            ]
        ),
        0,
    )
    writer.nifti(tissue.astype(np.uint8), aff, folder / f"{p}_desc-tissue_dseg.nii.gz", np.uint8)
    tissue_names = ["background", "CSF", "GM", "WM", "lesion", "vein", "cord"]
    save_tsv(
        [{"index": i, "name": n} for i, n in enumerate(tissue_names)],
        folder / f"{p}_desc-tissue_dseg.tsv",
    )
    writer.nifti(chi, aff, folder / f"{p}_Chimap.nii.gz", np.float32)
    save_json(
        {**side, "Units": "ppm", "Description": "true susceptibility relative to CSF"},
        folder / f"{p}_Chimap.json",
    )
    # true deformations: each voxel's position in the phantom template, and at baseline
    tmpl_mm = np.tensordot(aff[:3, :3].astype(np.float32), truth.template_points_vox, axes=1)
    tmpl_mm += aff[:3, 3, None, None, None].astype(np.float32)
    writer.call(
        save_displacement_field,
        tmpl_mm,
        aff,
        folder / f"{prefix}_from-template_to-T1w_mode-image_xfm.nii.gz",
    )
    if session > 0:
        rot, trans = baseline_rigid
        center = (aff @ np.r_[(np.array(anatomy.shape) - 1) / 2, 1.0])[:3].astype(np.float32)
        rel = truth.baseline_points_mm - center[:, None, None, None]
        base_mm = (
            np.tensordot(rot.astype(np.float32), rel, axes=1)
            + (center + trans).astype(np.float32)[:, None, None, None]
        )
        writer.call(
            save_displacement_field,
            base_mm,
            aff,
            folder / f"{prefix}_from-baseline_to-T1w_mode-image_xfm.nii.gz",
        )


def session_volumes(truth: SessionTruth, voxel_ml: float) -> dict[str, object]:
    """Return a session's true compartment volumes (ml) and cord CSA (mm²)."""
    f = truth.channel
    lesion = f("lesion") + f("rim")
    return {
        "brain_volume_ml": float((f("gm") + f("deep_gm") + f("wm") + lesion).sum() * voxel_ml),
        "gm_volume_ml": float((f("gm") + f("deep_gm")).sum() * voxel_ml),
        "wm_volume_ml": float(f("wm").sum() * voxel_ml),
        "lesion_volume_ml": float(lesion.sum() * voxel_ml),
        "csf_volume_ml": float(f("csf").sum() * voxel_ml),
        "cord_csa_mm2": truth.cord_csa_mm2,
    }


def _finish_atrophy_table(rows: list[dict[str, object]], config: PhantomConfig) -> None:
    base = rows[0]
    for i, row in enumerate(rows):
        prev = rows[max(i - 1, 0)]
        years = float(row["years_from_baseline"])  # type: ignore[arg-type]
        pbvc = 100 * (float(row["brain_volume_ml"]) / float(base["brain_volume_ml"]) - 1)  # type: ignore[arg-type]
        row["pbvc_from_baseline_pct"] = round(pbvc, 5)
        row["pbvc_interval_pct"] = round(
            100 * (float(row["brain_volume_ml"]) / float(prev["brain_volume_ml"]) - 1), 5
        )  # type: ignore[arg-type]
        row["pbvc_per_year_pct"] = round(pbvc / years, 5) if years > 0 else "n/a"
        row["gm_change_from_baseline_pct"] = round(
            100 * (float(row["gm_volume_ml"]) / float(base["gm_volume_ml"]) - 1), 5
        )  # type: ignore[arg-type]
        row["cord_csa_change_from_baseline_pct"] = round(
            100 * (float(row["cord_csa_mm2"]) / float(base["cord_csa_mm2"]) - 1), 5
        )  # type: ignore[arg-type]
        row["requested_pbvc_per_year_pct"] = config.pbvc_per_year
    for row in rows:
        for key, value in list(row.items()):
            if isinstance(value, float):
                row[key] = round(value, 6)
    order = [
        "session",
        "years_from_baseline",
        *[c for c in ATROPHY_COLUMNS if c not in ("session", "years_from_baseline")],
        "requested_pbvc_per_year_pct",
    ]
    rows[:] = [{k: r[k] for k in order} for r in rows]


def _write_lesion_tables(
    truth_dir: Path,
    sub: str,
    subject: Subject,
    per_lesion: dict[int, dict[str, float]],
    config: PhantomConfig,
) -> None:
    sessions = [f"ses-{k + 1:02d}" for k in range(config.sessions)]
    rows, long_rows = [], []
    for les in subject.lesions:
        vols = per_lesion.get(les.lesion_id, {})
        present = [s for s in sessions if s in vols]
        rate: object = "n/a"
        if len(present) >= 2:
            k0, k1 = sessions.index(present[0]), sessions.index(present[-1])
            rate = round(
                (vols[present[-1]] - vols[present[0]]) / (subject.years[k1] - subject.years[k0]), 6
            )
        rows.append(
            {
                "lesion_id": les.lesion_id,
                "location": les.location,
                "shape_source": les.shape_source,
                "first_session": sessions[les.first_session],
                "kind": les.kind,
                "sel": "yes" if les.kind == "sel" else "no",
                "radial_rate_mm_per_year": round(les.radial_rate_mm_per_year, 4),
                "volume_rate_ml_per_year": rate,
                "rim": les.rim,
                "rim_coverage": round(les.rim_coverage, 3),
                "rim_width_mm": round(les.rim_width_mm, 3),
                "rim_chi_ppm": round(les.rim_chi_ppm, 4),
                "mimic": les.mimic,
                "center_x_mm": round(float(les.center_mm[0]), 2),
                "center_y_mm": round(float(les.center_mm[1]), 2),
                "center_z_mm": round(float(les.center_mm[2]), 2),
            }
        )
        for s in present:
            long_rows.append(
                {"lesion_id": les.lesion_id, "session": s, "volume_ml": round(vols[s], 6)}
            )
    save_tsv(rows, truth_dir / f"{sub}_desc-lesions_truth.tsv")
    save_json(
        {c: {"Description": d} for c, d in LESION_COLUMNS.items()},
        truth_dir / f"{sub}_desc-lesions_truth.json",
    )
    save_tsv(long_rows, truth_dir / f"{sub}_desc-lesionvolumes_truth.tsv")
    save_json(
        {
            "lesion_id": {"Description": "lesion index"},
            "session": {"Description": "session label"},
            "volume_ml": {"Description": "partial-volume lesion volume from the probseg maps, ml"},
        },
        truth_dir / f"{sub}_desc-lesionvolumes_truth.json",
    )


def write_dataset_files(
    out: Path, config: PhantomConfig, participants: list[str], anatomy: Anatomy
) -> None:
    """Write README, participants and the dataset descriptions (raw last: it marks completion)."""
    generated = [{"Name": "smoulder", "Version": __version__, "Description": "smoulder phantom"}]
    save_text(
        "# smoulder phantom\n\nSynthetic multiple-sclerosis MRI made by `smoulder phantom` from "
        f"{anatomy.source}. Images come from MR signal equations (FLAIR, SPGR T1w, MP2RAGE, "
        "multi-echo GRE with a dipole field model); the exact truth is in derivatives/truth.\n\n"
        f"Configuration: {asdict(config)}\n",
        out / "README",
    )
    save_text(
        f"{__version__} {datetime.now().date()}\n  - generated by smoulder phantom\n",
        out / "CHANGES",
    )
    rng = np.random.default_rng(config.seed)
    save_tsv(
        [
            {
                "participant_id": f"sub-{p}",
                "age": int(rng.integers(25, 60)),
                "sex": str(rng.choice(["F", "M"])),
            }
            for p in participants
        ],
        out / "participants.tsv",
    )
    save_json(
        {
            "age": {"Description": "age at baseline", "Units": "year"},
            "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
        },
        out / "participants.json",
    )
    save_json(
        {
            "Name": "smoulder phantom truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": generated,
        },
        out / "derivatives" / "truth" / "dataset_description.json",
    )
    save_json(
        {
            "Name": "smoulder phantom",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["smoulder phantom generator"],
            "GeneratedBy": generated,
        },
        out / "dataset_description.json",
    )
