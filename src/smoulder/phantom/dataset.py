"""Render phantom sessions into a BIDS dataset, with the truth in ``derivatives/truth``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

from smoulder import __version__
from smoulder.derivatives import BIDS_VERSION, bids_name
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
LESION_VOLUME_COLUMNS: dict[str, str] = {
    "lesion_id": "lesion index",
    "session": "session label",
    "volume_ml": "partial-volume lesion volume from the probseg maps, ml",
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
        entities = {"sub": subject.label, "ses": f"{k + 1:02d}"}
        t0 = time.perf_counter()
        truth = session_truth(anatomy, subject, k)
        rng = np.random.default_rng((config.seed, int(subject.label), k, 7))
        chi = chi_map_ppm(truth, subject.tissues)
        images = render_session(truth, chi, anatomy, subject, config, rng)
        anat = out / sub / ses / "anat"
        for image in images:
            names = {**entities, **image.entities}
            writer.nifti(image.data, image.affine, _path(anat, names, image.suffix), np.float32)
            save_json(image.sidecar, _path(anat, names, image.suffix, ".json"))
        write_session_truth(
            truth_dir / ses / "anat",
            entities,
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
    subject_only = {"sub": subject.label}
    save_tsv(sessions_rows, _path(out / sub, subject_only, "sessions", ".tsv"))
    _finish_atrophy_table(volumes, config)
    atrophy = {**subject_only, "desc": "atrophy"}
    save_tsv(volumes, _path(truth_dir, atrophy, "truth", ".tsv"))
    save_json(_data_dictionary(ATROPHY_COLUMNS), _path(truth_dir, atrophy, "truth", ".json"))
    _write_lesion_tables(truth_dir, subject, per_lesion, config)
    params = _phantom_record(anatomy, subject, config)
    save_json(params, _path(truth_dir, subject_only, "phantom", ".json"))


def _path(
    folder: Path, entities: Mapping[str, str | int], suffix: str, extension: str = ".nii.gz"
) -> Path:
    """Return the path in ``folder`` of the BIDS file of ``entities`` and ``suffix``.

    Examples:
        >>> _path(Path("anat"), {"sub": "01", "desc": "lesions"}, "dseg").as_posix()
        'anat/sub-01_desc-lesions_dseg.nii.gz'
    """
    return folder / bids_name(entities, suffix=suffix, extension=extension)


def _data_dictionary(columns: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Return the JSON data dictionary of a table: ``{column: {"Description": text}}``."""
    return {c: {"Description": d} for c, d in columns.items()}


def _phantom_record(anatomy: Anatomy, subject: Subject, config: PhantomConfig) -> dict[str, object]:
    """Return what made ``subject``: seed, configuration, tissues, head positions, lesions."""
    return {
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


class RawImage(NamedTuple):
    """One image of a session's raw data: its BIDS entities and suffix, voxels, grid, sidecar."""

    entities: dict[str, str | int]
    suffix: str
    data: np.ndarray
    affine: np.ndarray
    sidecar: dict[str, object]


@dataclass
class _Scanner:
    """What every contrast of one session is acquired with: the truth, its grid and the noise.

    All contrasts draw their bias fields and noise from the one ``rng``, in the order they are
    acquired, so a seed gives the same images.
    """

    truth: SessionTruth
    anatomy: Anatomy
    tissues: dict[str, physics.Tissue]
    config: PhantomConfig
    rng: np.random.Generator

    def __post_init__(self) -> None:
        # noise levels are set against the signal of (nearly) pure white matter
        self.wm_mask = self.truth.channel("wm") > 0.9
        self.common: dict[str, object] = {
            "MagneticFieldStrength": self.config.b0_tesla,
            "Manufacturer": "smoulder phantom",
            "ManufacturersModelName": f"smoulder {__version__}",
        }

    def grid(self, voxel: tuple[float, float, float]) -> tuple[np.ndarray, tuple[int, ...]]:
        """Return ``(affine, shape)`` of the acquisition grid of ``voxel`` (mm) voxels.

        It has the truth grid's field of view: the first voxel's corner coincides with the
        truth grid's.
        """
        aff, shape, sp = self.anatomy.affine, self.anatomy.shape, self.anatomy.spacing_mm
        if np.allclose(voxel, sp):
            return aff, shape
        extent = np.array(shape) * np.array(sp)
        new_shape = tuple(int(round(e / v)) for e, v in zip(extent, voxel, strict=True))
        new_aff = np.diag([*voxel, 1.0])
        new_aff[:3, 3] = aff[:3, 3] - np.array(sp) / 2 + np.array(voxel) / 2
        return new_aff, new_shape

    def gre_grid(self, voxel: tuple[float, float, float]) -> tuple[np.ndarray, tuple[int, ...]]:
        """Return ``(affine, shape)`` of the GRE's grid: :meth:`grid`'s, or an oblique slab.

        With ``gre_tilt_deg`` the grid turns about the left-right axis through the field of
        view's centre (B0 stays along the scanner's z, so in the slab's voxel axes it is
        oblique); with ``gre_slab_mm`` it keeps that many millimetres across its slices,
        centred there. In-plane it keeps the field of view's extent.
        """
        aff, shape = self.grid(voxel)
        tilt, slab = self.config.gre_tilt_deg, self.config.gre_slab_mm
        if not tilt and slab is None:
            return aff, shape
        centre = aff @ np.array([*((np.array(shape) - 1) / 2), 1.0])
        n_slices = shape[2] if slab is None else max(int(round(slab / voxel[2])), 1)
        new_shape = (shape[0], shape[1], n_slices)
        turn = Rotation.from_euler("x", tilt, degrees=True).as_matrix()
        new_aff = np.eye(4)
        new_aff[:3, :3] = turn @ aff[:3, :3]
        new_aff[:3, 3] = centre[:3] - new_aff[:3, :3] @ ((np.array(new_shape) - 1) / 2)
        return new_aff, new_shape

    def per_class(self, fn: Callable[[physics.Tissue], object]) -> dict[str, object]:
        """Return ``{tissue name: fn(tissue)}`` over the subject's tissues."""
        return {name: fn(t) for name, t in self.tissues.items()}

    def signal(self, fn: Callable[[physics.Tissue], object]) -> np.ndarray:
        """Return the noise-free image of the per-tissue signal ``fn`` (partial volumes mixed)."""
        return mix(self.truth, self.per_class(fn))

    def bias_field(self) -> np.ndarray:
        """Return a new receive bias field on the truth grid."""
        return physics.smooth_bias_field(
            self.anatomy.shape, self.rng, strength=self.config.bias_strength
        )

    def acquire(
        self, signal: np.ndarray, voxel: tuple[float, float, float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(magnitude image, affine)`` of ``signal`` seen with a new bias field,
        averaged into ``voxel`` (mm) voxels and with Rician noise (float32)."""
        bias = self.bias_field()
        sigma = float(np.abs(signal[self.wm_mask]).mean()) / self.config.snr
        g_aff, g_shape = self.grid(voxel)
        data = resample_box(signal * bias, self.anatomy.affine, g_aff, g_shape)
        return physics.add_rician_noise(data, sigma, self.rng).astype(np.float32), g_aff


def render_session(
    truth: SessionTruth,
    chi: np.ndarray,
    anatomy: Anatomy,
    subject: Subject,
    config: PhantomConfig,
    rng: np.random.Generator,
) -> list[RawImage]:
    """Return every raw image of a session: FLAIR, T1w, MP2RAGE and multi-echo GRE.

    The contrasts are acquired in that order from ``rng`` (see :class:`_Scanner`).
    """
    scan = _Scanner(truth, anatomy, subject.tissues, config, rng)
    return [*_flair(scan), *_t1w(scan), *_mp2rage(scan), *_megre(scan, chi)]


def _flair(scan: _Scanner) -> list[RawImage]:
    """Return the FLAIR (inversion-recovery TSE), with ``flair_slice_mm`` slices."""
    sp = scan.anatomy.spacing_mm
    voxel = (sp[0], sp[1], scan.config.flair_slice_mm or sp[2])
    flair = scan.signal(lambda t: physics.flair_signal(t.pd, t.t1_ms, t.t2_ms, **FLAIR_PARAMS))
    if scan.config.flair_inflow > 0:
        flair = flair + _inflow_signal(scan, flair)
    data, affine = scan.acquire(flair, voxel)
    sidecar = {
        **scan.common,
        "RepetitionTime": FLAIR_PARAMS["tr_ms"] / 1000,
        "InversionTime": FLAIR_PARAMS["ti_ms"] / 1000,
        "EchoTime": FLAIR_PARAMS["te_ms"] / 1000,
        "PulseSequenceType": "IR-TSE",
    }
    return [RawImage({}, "FLAIR", data, affine, sidecar)]


def _inflow_signal(scan: _Scanner, flair: np.ndarray) -> np.ndarray:
    """Return the FLAIR signal of CSF that escaped the inversion (``flair_inflow``).

    Smooth patches (~6 mm) covering ``flair_inflow`` of the CSF volume, each carrying 0.6–1.6
    times the white matter's FLAIR signal in proportion to the voxel's CSF fraction: as bright
    as lesions on the FLAIR while the T1w and every other contrast keep them CSF. Drawn from
    the scanner's ``rng`` only when enabled, so a phantom without inflow is unchanged.
    """
    csf = scan.truth.channel("csf")
    spacing = float(np.mean(scan.anatomy.spacing_mm))
    field = physics.smooth_bias_field(
        csf.shape, scan.rng, strength=1.0, scale_voxels=max(6.0 / spacing, 1.0)
    )
    inside = csf > 0.5
    if not inside.any():
        return np.zeros_like(flair)
    cut = float(np.quantile(field[inside], 1.0 - scan.config.flair_inflow))
    patches = np.clip((field - cut) / max(float(field[inside].max()) - cut, 1e-6), 0.0, 1.0)
    wm_signal = float(flair[scan.wm_mask].mean())
    gain = scan.rng.uniform(0.6, 1.6)
    return (csf * np.sqrt(patches) * gain * wm_signal).astype(flair.dtype)


def _t1w(scan: _Scanner) -> list[RawImage]:
    """Return the T1-weighted spoiled gradient echo, on the truth grid."""
    t1p = physics.T1W_DEFAULTS
    t1w = scan.signal(lambda t: physics.spgr_signal(t.pd, t.t1_ms, t.t2star_ms, **t1p))
    data, affine = scan.acquire(t1w, scan.anatomy.spacing_mm)
    sidecar = {
        **scan.common,
        "RepetitionTime": t1p["tr_ms"] / 1000,
        "EchoTime": t1p["te_ms"] / 1000,
        "FlipAngle": t1p["flip_deg"],
        "PulseSequenceType": "SPGR",
    }
    return [RawImage({}, "T1w", data, affine, sidecar)]


def _mp2rage(scan: _Scanner) -> list[RawImage]:
    """Return the MP2RAGE's two inversion magnitudes and its UNIT1, on the truth grid.

    Both inversions share one bias field and one noise level (set on the second, brighter).
    """
    aff, rng = scan.anatomy.affine, scan.rng
    inv = scan.per_class(
        lambda t: physics.mp2rage_signals(t.pd, t.t1_ms, t.t2star_ms, params=MP2RAGE)
    )
    bias = scan.bias_field()
    inv1 = mix(scan.truth, {k: v[0] for k, v in inv.items()}) * bias  # type: ignore[index]
    inv2 = mix(scan.truth, {k: v[1] for k, v in inv.items()}) * bias  # type: ignore[index]
    sigma = float(np.abs(inv2[scan.wm_mask]).mean()) / scan.config.snr
    inv1 = physics.add_complex_noise(inv1, sigma, rng)
    inv2 = physics.add_complex_noise(inv2, sigma, rng)
    mp = {
        **scan.common,
        "RepetitionTimePreparation": MP2RAGE.tr_mp2rage_ms / 1000,
        "RepetitionTimeExcitation": MP2RAGE.tr_gre_ms / 1000,
        "EchoTime": 0.003,
        "NumberShots": MP2RAGE.n_readouts,
        "InversionEfficiency": MP2RAGE.inversion_efficiency,
    }
    first = {**mp, "InversionTime": MP2RAGE.ti1_ms / 1000, "FlipAngle": MP2RAGE.flip1_deg}
    second = {**mp, "InversionTime": MP2RAGE.ti2_ms / 1000, "FlipAngle": MP2RAGE.flip2_deg}
    unit1 = {**scan.common, "BasedOn": ["inv-1_part-mag_MP2RAGE", "inv-2_part-mag_MP2RAGE"]}
    mag = {"part": "mag"}
    return [
        RawImage({"inv": 1, **mag}, "MP2RAGE", np.abs(inv1).astype(np.float32), aff, first),
        RawImage({"inv": 2, **mag}, "MP2RAGE", np.abs(inv2).astype(np.float32), aff, second),
        RawImage({}, "UNIT1", physics.mp2rage_unit1(inv1, inv2).astype(np.float32), aff, unit1),
    ]


def _megre(scan: _Scanner, chi: np.ndarray) -> list[RawImage]:
    """Return magnitude and phase of every echo of the multi-echo GRE, with ``gre_voxel_mm``
    voxels: the field of the true susceptibility ``chi`` (ppm) sets the phase."""
    config, rng = scan.config, scan.rng
    aff, shape, sp = scan.anatomy.affine, scan.anatomy.shape, scan.anatomy.spacing_mm
    field_ppm = physics.field_from_chi(chi, sp).astype(np.float32)
    tes = np.asarray(config.echo_times_ms, np.float32)
    mags = scan.signal(
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
    )
    offset = physics.smooth_phase_offset(shape, rng)
    bias = scan.bias_field()
    omega = 2 * np.pi * physics.GAMMA_BAR_MHZ_PER_T * config.b0_tesla * 1e-3  # rad per ppm per ms
    gre_vox = (config.gre_voxel_mm,) * 3 if config.gre_voxel_mm else sp
    sigma = float(mags[0][scan.wm_mask].mean()) / config.snr
    images = []
    for e, te in enumerate(tes):
        signal = (mags[e] * bias) * np.exp(1j * (offset + omega * field_ppm * te)).astype(
            np.complex64
        )
        g_aff, g_shape = scan.gre_grid(gre_vox)  # type: ignore[arg-type]
        signal = physics.add_complex_noise(resample_box(signal, aff, g_aff, g_shape), sigma, rng)
        side = {
            **scan.common,
            "EchoTime": float(te) / 1000,
            "RepetitionTime": GRE_PARAMS["tr_ms"] / 1000,
            "FlipAngle": GRE_PARAMS["flip_deg"],
            "EchoNumber": e + 1,
        }
        mag = np.abs(signal).astype(np.float32)
        phase = physics.wrap_phase(np.angle(signal)).astype(np.float32)
        echo = {"echo": e + 1}
        images.append(RawImage({**echo, "part": "mag"}, "MEGRE", mag, g_aff, side))
        images.append(
            RawImage({**echo, "part": "phase"}, "MEGRE", phase, g_aff, {**side, "Units": "rad"})
        )
    return images


def write_session_truth(
    folder: Path,
    entities: Mapping[str, str],
    truth: SessionTruth,
    chi: np.ndarray,
    anatomy: Anatomy,
    subject: Subject,
    baseline_rigid: tuple[np.ndarray, np.ndarray],
    session: int,
    writer: _BackgroundWriter,
) -> None:
    """Write a session's truth maps and true deformations (all on the session's T1w grid).

    ``entities`` are the session's (``sub``, ``ses``); the maps add ``space-T1w``.
    """
    aff = anatomy.affine
    space = {**entities, "space": "T1w"}
    raw_t1w = _path(
        Path(f"sub-{entities['sub']}", f"ses-{entities['ses']}", "anat"), entities, "T1w"
    )
    side = {"SpatialReference": f"bids:raw:{raw_t1w.as_posix()}"}
    lesions = {**space, "desc": "lesions"}
    writer.nifti(truth.lesion_ids, aff, _path(folder, lesions, "dseg"), np.int16)
    ids = sorted(int(i) for i in np.unique(truth.lesion_ids) if i > 0)
    save_tsv(
        [{"index": i, "name": f"lesion-{i}"} for i in ids], _path(folder, lesions, "dseg", ".tsv")
    )
    maps = _probseg_maps(truth)
    for label, data in maps.items():
        probseg = {**space, "label": label}
        writer.nifti(data, aff, _path(folder, probseg, "probseg"), np.float32)
        save_json(
            {**side, "Description": f"true partial-volume fraction (label-{label}_probseg)"},
            _path(folder, probseg, "probseg", ".json"),
        )
    writer.nifti(
        (maps["brain"] >= 0.5).astype(np.uint8),
        aff,
        _path(folder, {**space, "desc": "brain"}, "mask"),
        np.uint8,
    )
    _write_tissue_dseg(folder, space, truth, maps, aff, writer)
    writer.nifti(chi, aff, _path(folder, space, "Chimap"), np.float32)
    save_json(
        {**side, "Units": "ppm", "Description": "true susceptibility relative to CSF"},
        _path(folder, space, "Chimap", ".json"),
    )
    _write_true_deformations(folder, entities, truth, anatomy, baseline_rigid, session, writer)


def _probseg_maps(truth: SessionTruth) -> dict[str, np.ndarray]:
    """Return the true partial-volume map of each ``label-<label>_probseg`` of the truth."""
    f = truth.channel
    lesion = f("lesion") + f("rim")
    return {
        "lesion": lesion,
        "rim": f("rim"),
        "CSF": f("csf"),
        "GM": f("gm") + f("deep_gm"),
        "WM": f("wm"),
        "cord": f("cord"),
        "brain": f("gm") + f("deep_gm") + f("wm") + lesion,
    }


def _write_tissue_dseg(
    folder: Path,
    space: Mapping[str, str],
    truth: SessionTruth,
    maps: Mapping[str, np.ndarray],
    aff: np.ndarray,
    writer: _BackgroundWriter,
) -> None:
    """Write the hard tissue segmentation (the most abundant class per voxel) and its labels."""
    f = truth.channel
    tissue = np.argmax(
        np.stack(
            [
                np.full(maps["lesion"].shape, 0.25, np.float32),
                f("csf"),
                maps["GM"],
                f("wm"),
                maps["lesion"],
                f("vein"),
                f("cord"),
            ]
        ),
        0,
    )
    dseg = {**space, "desc": "tissue"}
    writer.nifti(tissue.astype(np.uint8), aff, _path(folder, dseg, "dseg"), np.uint8)
    tissue_names = ["background", "CSF", "GM", "WM", "lesion", "vein", "cord"]
    save_tsv(
        [{"index": i, "name": n} for i, n in enumerate(tissue_names)],
        _path(folder, dseg, "dseg", ".tsv"),
    )


def _write_true_deformations(
    folder: Path,
    entities: Mapping[str, str],
    truth: SessionTruth,
    anatomy: Anatomy,
    baseline_rigid: tuple[np.ndarray, np.ndarray],
    session: int,
    writer: _BackgroundWriter,
) -> None:
    """Write each voxel's position in the phantom template and, after baseline, at baseline
    (ITK displacement fields on the session's T1w grid)."""
    aff = anatomy.affine
    tmpl_mm = np.tensordot(aff[:3, :3].astype(np.float32), truth.template_points_vox, axes=1)
    tmpl_mm += aff[:3, 3, None, None, None].astype(np.float32)
    xfm = {**entities, "to": "T1w", "mode": "image"}
    writer.call(
        save_displacement_field, tmpl_mm, aff, _path(folder, {**xfm, "from": "template"}, "xfm")
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
            save_displacement_field, base_mm, aff, _path(folder, {**xfm, "from": "baseline"}, "xfm")
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
    """Add the volume-change columns to the per-session rows and order them, in place."""
    base = rows[0]
    for i, row in enumerate(rows):
        prev = rows[max(i - 1, 0)]
        years = float(row["years_from_baseline"])  # type: ignore[arg-type]
        pbvc = _change_pct(row, base, "brain_volume_ml")
        row["pbvc_from_baseline_pct"] = round(pbvc, 5)
        row["pbvc_interval_pct"] = round(_change_pct(row, prev, "brain_volume_ml"), 5)
        row["pbvc_per_year_pct"] = round(pbvc / years, 5) if years > 0 else "n/a"
        row["gm_change_from_baseline_pct"] = round(_change_pct(row, base, "gm_volume_ml"), 5)
        row["cord_csa_change_from_baseline_pct"] = round(_change_pct(row, base, "cord_csa_mm2"), 5)
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


def _change_pct(row: Mapping[str, object], ref: Mapping[str, object], column: str) -> float:
    """Return the change (%) of ``column`` from the row ``ref`` to ``row``.

    Examples:
        >>> base = {"volume_ml": 100.0}
        >>> _change_pct({"volume_ml": 150.0}, base, "volume_ml")
        50.0
    """
    return 100 * (float(row[column]) / float(ref[column]) - 1)  # type: ignore[arg-type]


def _write_lesion_tables(
    truth_dir: Path,
    subject: Subject,
    per_lesion: dict[int, dict[str, float]],
    config: PhantomConfig,
) -> None:
    """Write the per-lesion truth table and the long table of lesion volumes per session."""
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
    lesions = {"sub": subject.label, "desc": "lesions"}
    save_tsv(rows, _path(truth_dir, lesions, "truth", ".tsv"))
    save_json(_data_dictionary(LESION_COLUMNS), _path(truth_dir, lesions, "truth", ".json"))
    volumes = {"sub": subject.label, "desc": "lesionvolumes"}
    save_tsv(long_rows, _path(truth_dir, volumes, "truth", ".tsv"))
    save_json(_data_dictionary(LESION_VOLUME_COLUMNS), _path(truth_dir, volumes, "truth", ".json"))


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
