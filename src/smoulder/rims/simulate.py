"""Training lesions for the rim classifier: phantom sessions over randomised acquisitions.

There is no open susceptibility data of MS patients with expert rim labels, so the classifier
learns from the phantom (:mod:`smoulder.phantom`), whose rims are real susceptibility sources
seen through the dipole forward model, noise and the QSM reconstruction the pipeline runs.
Each draw (:func:`draw_acquisition`) is one single-session subject of its own seed with a new
acquisition: field strength (3 T or 7 T), 1–5 echoes, echo spacing, GRE voxel (1, 0.8 or 0.5
mm), SNR, and for some an oblique slab (:func:`draw_geometry`); and more
of the lesions raters find hard than a default phantom has (partial rims, veins beside lesions,
central veins, iso-rims).

For every truth lesion of the session two patches are cut (:func:`smoulder.rims.patches.
extract_patch`), one from the QSM (reconstructed as the pipeline does, total variation,
referenced to the ventricles' CSF) and one from the homodyne-filtered phase of the last echo,
both in the GRE's own grid, with the truth lesion mask. The label is the phantom's truth: 1
for a rim around at least two thirds of the edge (``rim == "yes"``), 0 for partial rims, no
rim, and every mimic. Shards are ``.npz`` files (:func:`smoulder.rims.train.write_shard`) that
:mod:`smoulder.rims.train` reads. :func:`load_session` gives the loaded session itself
(:class:`PhantomSession`: the arrays on the GRE grid, each lesion's patch and rule-based
measures), which ``benchmarks/rims.py`` scores on held-out seeds.

Run (one shard per seed; seeds never reused by the benchmark, which starts at 10 000)::

    python -m smoulder.rims.simulate OUT_DIR --first-seed 0 --count 40
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from smoulder.rims.rules import FEATURES
from smoulder.rims.train import PatchSet, write_shard

if TYPE_CHECKING:
    from smoulder.phantom.generate import PhantomConfig
    from smoulder.registration.transforms import AffineTransform
    from smoulder.rims.assess import GreLesions
    from smoulder.rims.rules import InputKind, RimMeasures

#: The phantom's lesion mix for training: more rims and hard negatives than the default.
TRAINING_MIX = {
    "lesions": 36,
    "prl_fraction": 0.35,
    "partial_rim_fraction": 0.15,
    "vein_adjacent": 5,
    "central_veins": 5,
    "iso_rims": 4,
}
#: Latest echo time drawn (ms): before the phantom GRE's repetition time of 30 ms.
LAST_ECHO_MAX_MS = 28.0
#: Seeds from which the benchmark's held-out phantoms are drawn; training seeds stay below.
FIRST_HELD_OUT_SEED = 10_000


@dataclass(frozen=True)
class Acquisition:
    """One simulated GRE acquisition (and the phantom grid it is simulated on).

    ``gre_voxel_mm`` (None: the phantom grid's), ``tilt_deg`` and ``slab_mm`` (None: the whole
    field of view) make the GRE an oblique slab of its own voxel
    (:meth:`smoulder.phantom.dataset._Scanner.gre_grid`).
    """

    b0_tesla: float
    echo_times_ms: tuple[float, ...]
    resolution_mm: float
    snr: float
    gre_voxel_mm: float | None = None
    tilt_deg: float = 0.0
    slab_mm: float | None = None


def draw_acquisition(rng: np.random.Generator) -> Acquisition:
    """Return a random acquisition: 3 T (70 %) or 7 T, 1–5 echoes, 0.8 or 1 mm, SNR 15–50.

    Echo times shrink with the field (T2* is shorter at 7 T): first echo 4–8 ms at 3 T and
    3–5 ms at 7 T, spacing in the same ranges.

    Examples:
        >>> acq = draw_acquisition(np.random.default_rng(0))
        >>> acq.b0_tesla in (3.0, 7.0), 1 <= len(acq.echo_times_ms) <= 5
        (True, True)
    """
    b0 = 3.0 if rng.random() < 0.7 else 7.0
    lo, hi = (4.0, 8.0) if b0 == 3.0 else (3.0, 5.0)
    n_echoes = int(rng.integers(1, 6))
    first, spacing = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    # the phantom's GRE repeats every 30 ms: the last echo must come before it
    spacing = min(spacing, (LAST_ECHO_MAX_MS - first) / max(n_echoes - 1, 1))
    tes = tuple(round(first + k * spacing, 2) for k in range(n_echoes))
    resolution = 1.0 if rng.random() < 0.7 else 0.8
    return Acquisition(b0, tes, resolution, float(rng.uniform(15.0, 50.0)))


def draw_tilt(rng: np.random.Generator) -> float:
    """Return a slab tilt about the left-right axis: 5–25° either way (degrees).

    Examples:
        >>> 5.0 <= abs(draw_tilt(np.random.default_rng(0))) <= 25.0
        True
    """
    return float(rng.uniform(5.0, 25.0) * rng.choice([-1.0, 1.0]))


def draw_geometry(acquisition: Acquisition, rng: np.random.Generator) -> Acquisition:
    """Return ``acquisition`` with a slab geometry drawn: at 7 T, 40 % of sessions get 0.5 mm
    GRE voxels in an oblique slab 48–80 mm thick (over a 0.8 mm phantom grid: a whole brain at
    0.5 mm costs too much to simulate by the thousand); of the rest, 30 % an oblique slab of
    their own voxel, 64–100 mm thick. Tilts are 5–25° either way about the left-right axis.

    Drawn from a stream of its own (the caller's ``rng``), so the acquisitions of
    :func:`draw_acquisition` stay what they were for a seed.

    Examples:
        >>> base = Acquisition(7.0, (4.0,), 0.8, 30.0)
        >>> draws = [draw_geometry(base, np.random.default_rng(s)) for s in range(50)]
        >>> {d.gre_voxel_mm for d in draws} == {None, 0.5}
        True
        >>> all(5 <= abs(d.tilt_deg) <= 25 for d in draws if d.slab_mm is not None)
        True
    """
    tilt = draw_tilt(rng)
    if acquisition.b0_tesla == 7.0 and rng.random() < 0.4:
        slab = float(rng.uniform(48.0, 80.0))
        return replace(
            acquisition, resolution_mm=0.8, gre_voxel_mm=0.5, tilt_deg=tilt, slab_mm=slab
        )
    if rng.random() < 0.3:
        return replace(acquisition, tilt_deg=tilt, slab_mm=float(rng.uniform(64.0, 100.0)))
    return acquisition


def session_config(seed: int, acquisition: Acquisition) -> PhantomConfig:
    """Return the phantom settings of a one-session subject of ``seed`` seen through
    ``acquisition``, with the lesion mix of :data:`TRAINING_MIX`."""
    from smoulder.phantom.generate import PhantomConfig

    return replace(
        PhantomConfig(),
        subjects=1,
        sessions=1,
        seed=seed,
        new_lesions_per_session=0,
        resolution_mm=acquisition.resolution_mm,
        b0_tesla=acquisition.b0_tesla,
        echo_times_ms=acquisition.echo_times_ms,
        snr=acquisition.snr,
        gre_voxel_mm=acquisition.gre_voxel_mm,
        gre_tilt_deg=acquisition.tilt_deg,
        gre_slab_mm=acquisition.slab_mm,
        **TRAINING_MIX,
    )


def simulate_session(seed: int, work_dir: str | Path) -> PatchSet:
    """Return the patches of every lesion of one phantom session drawn with ``seed``.

    Args:
        seed: the phantom's seed and the acquisition draw's.
        work_dir: a folder for the phantom dataset (kept: it holds the truth behind the shard).
    """
    from smoulder.phantom.dataset import generate_dataset

    acquisition = draw_acquisition(np.random.default_rng([seed, 1]))
    config = session_config(seed, draw_geometry(acquisition, np.random.default_rng([seed, 3])))
    root = generate_dataset(Path(work_dir) / f"seed-{seed}", config)
    return session_patches(root, subject=f"seed{seed}")


def session_patches(root: Path, *, subject: str) -> PatchSet:
    """Return the QSM and filtered-phase patches of every truth lesion of a phantom's first
    session (``sub-01``, ``ses-01``), labelled from its truth table."""
    session = load_session(root)
    rows: list[tuple[np.ndarray, int, str, int, np.ndarray]] = []
    for lesion in session.lesions():
        for kind in ("qsm", "phase"):
            patch = session.patch(lesion, kind)
            if patch is not None:
                features = session.measure(lesion, kind).features()
                rows.append((patch, session.rims[lesion], kind, lesion, features))
    n = len(rows)
    return PatchSet(
        patches=np.stack([r[0] for r in rows]).astype(np.float16)
        if rows
        else np.zeros((0, 4, 24, 24, 24), np.float16),
        labels=np.array([r[1] for r in rows], np.uint8),
        input_kind=np.array([r[2] for r in rows], "<U5"),
        lesion_id=np.array([r[3] for r in rows], np.int32),
        subject=np.array([subject] * n, "<U16"),
        session=np.array(["01"] * n, "<U8"),
        features=np.stack([r[4] for r in rows])
        if rows
        else np.zeros((0, len(FEATURES)), np.float32),
        b0_tesla=np.full(n, session.b0_tesla, np.float32),
    )


def load_session(root: Path) -> PhantomSession:
    """Return a phantom's first session (``sub-01``, ``ses-01``) on its GRE grid: the QSM
    (reconstructed as the pipeline does) and filtered phase, the truth lesions and their labels.
    """
    from smoulder.qsm.masks import session_masks
    from smoulder.qsm.reconstruct import filtered_phase, load_echoes, reconstruct
    from smoulder.registration.transforms import AffineTransform
    from smoulder.rims.patches import lesion_labels_in_gre

    anat = root / "sub-01" / "ses-01" / "anat"
    truth = root / "derivatives" / "truth" / "sub-01"
    t_anat = truth / "ses-01" / "anat"
    mags = sorted(anat.glob("*_part-mag_MEGRE.nii.gz"))
    echoes = load_echoes(mags, [Path(str(m).replace("part-mag", "part-phase")) for m in mags])
    gre = nib.load(mags[0])
    same_space = AffineTransform.identity()  # one session: every image in scanner coordinates
    mask, reference = session_masks(
        echoes.magnitude,
        gre,
        nib.load(t_anat / "sub-01_ses-01_space-T1w_desc-brain_mask.nii.gz"),
        same_space,
        csf_probseg=nib.load(t_anat / "sub-01_ses-01_space-T1w_label-CSF_probseg.nii.gz"),
    )
    instances = nib.load(t_anat / "sub-01_ses-01_space-T1w_desc-lesions_dseg.nii.gz")
    return PhantomSession(
        affine=gre.affine,
        magnitude=echoes.magnitude[0],
        qsm_mask=mask,
        wm=_on_grid(nib.load(t_anat / "sub-01_ses-01_space-T1w_label-WM_probseg.nii.gz"), gre),
        labels=lesion_labels_in_gre(instances, gre, same_space),
        flair=nib.load(anat / "sub-01_ses-01_FLAIR.nii.gz"),
        flair_to_gre=same_space,
        chi_ppm=reconstruct(echoes, mask, method="tv", reference_mask=reference).chi_ppm,
        phase_rad=filtered_phase(echoes),
        rims=_truth_labels(truth / "sub-01_desc-lesions_truth.tsv"),
        b0_tesla=echoes.b0_tesla,
    )


@dataclass
class PhantomSession:
    """One phantom session on its GRE grid: what every lesion's patch and measures read.

    Attributes:
        affine: the GRE grid's voxel-to-world matrix.
        magnitude: the first echo's magnitude.
        qsm_mask: where the QSM is defined.
        wm: white-matter probability.
        labels: lesion instances (0 outside lesions).
        flair: the FLAIR image (the patch's FLAIR channel).
        flair_to_gre: the FLAIR → GRE transform (identity: one session, scanner coordinates).
        chi_ppm: the QSM (ppm).
        phase_rad: the homodyne-filtered phase of the last echo (rad).
        rims: ``{lesion id: 1 for a complete rim, else 0}`` (the truth).
        b0_tesla: the acquisition's field (NaN: unknown), the calibration's stratum.
    """

    affine: np.ndarray
    magnitude: np.ndarray
    qsm_mask: np.ndarray
    wm: np.ndarray
    labels: np.ndarray
    flair: nib.Nifti1Image
    flair_to_gre: AffineTransform
    chi_ppm: np.ndarray
    phase_rad: np.ndarray
    rims: dict[int, int]
    b0_tesla: float = float("nan")

    def lesions(self) -> list[int]:
        """Return the ids of the lesions on the GRE grid that have a label, ascending."""
        return sorted(int(i) for i in np.unique(self.labels) if i > 0 and int(i) in self.rims)

    def susceptibility(self, kind: InputKind) -> np.ndarray:
        """Return the QSM (``"qsm"``) or the filtered phase (``"phase"``)."""
        return self.chi_ppm if kind == "qsm" else self.phase_rad

    @functools.cached_property
    def grid(self) -> GreLesions:
        """Return the session's lesions on its GRE grid, as the pipeline's rim step sees them
        (built once: its FLAIR in memory and its lesion boxes serve every lesion)."""
        from smoulder.rims.assess import GreLesions

        return GreLesions(
            self.affine, self.magnitude, self.qsm_mask, self.wm, self.labels, self.flair,
            self.flair_to_gre,
        )  # fmt: skip

    def patch(self, lesion: int, kind: InputKind) -> np.ndarray | None:
        """Return the lesion's patch from the QSM or phase, or None when it is too small to
        have a voxel of fraction ≥ 0.5 in the GRE grid."""
        return self.grid.patch(lesion, self.susceptibility(kind), kind)

    def measure(self, lesion: int, kind: InputKind) -> RimMeasures:
        """Return the rule-based measures of the lesion on the QSM or phase."""
        return self.grid.measure(lesion, self.susceptibility(kind), kind)


def _on_grid(img: nib.Nifti1Image, grid: nib.Nifti1Image) -> np.ndarray:
    """Return ``img`` on the grid of ``grid`` (same world space; linear)."""
    from smoulder.grids import resample_to_grid

    return resample_to_grid(np.asarray(img.dataobj), img.affine, grid.shape[:3], grid.affine)


def _truth_labels(table: Path) -> dict[int, int]:
    """Return ``{lesion id: 1 if its rim is complete (rim == "yes") else 0}``."""
    from smoulder.images import read_tsv

    return {int(r["lesion_id"]): int(r["rim"] == "yes") for r in read_tsv(table)}


def simulate_shard(seed: int, out_dir: str | Path, *, keep_phantoms: bool = False) -> Path:
    """Return the shard of ``seed`` in ``out_dir``, simulating it unless it exists (resumable).

    Raises:
        ValueError: a seed of the benchmark's held-out range.
    """
    if seed >= FIRST_HELD_OUT_SEED:
        raise ValueError(f"training seeds must stay below {FIRST_HELD_OUT_SEED} (the benchmark's)")
    out_dir = Path(out_dir)
    path = out_dir / f"shard-{seed:05d}.npz"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smoulder-rims-", dir=out_dir) as tmp:
        work = out_dir / "phantoms" if keep_phantoms else Path(tmp)
        shard = simulate_session(seed, work)
    write_shard(shard, path)
    print(
        f"seed {seed}: {len(shard.labels)} patches, {int(shard.labels.sum())} rim, "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return path


def simulate_shards(
    out_dir: str | Path, seeds: Sequence[int], *, jobs: int = 1, keep_phantoms: bool = False
) -> list[Path]:
    """Return the shards of ``seeds`` in ``out_dir``, simulating the missing ones in ``jobs``
    processes (each a whole session: its phantom, QSM and patches)."""
    from concurrent.futures import ProcessPoolExecutor

    one = functools.partial(simulate_shard, out_dir=out_dir, keep_phantoms=keep_phantoms)
    if jobs <= 1:
        return [one(seed) for seed in seeds]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, seeds))


def main(argv: Sequence[str] | None = None) -> int:
    """Write one shard per seed into ``OUT_DIR``; skip seeds whose shard exists (resumable)."""
    p = argparse.ArgumentParser(prog="python -m smoulder.rims.simulate", description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--jobs", type=int, default=1, help="sessions simulated at once")
    p.add_argument("--keep-phantoms", action="store_true", help="keep each session's phantom")
    args = p.parse_args(argv)
    if args.first_seed + args.count > FIRST_HELD_OUT_SEED:
        p.error(f"training seeds must stay below {FIRST_HELD_OUT_SEED} (the benchmark's)")
    seeds = range(args.first_seed, args.first_seed + args.count)
    simulate_shards(args.out_dir, seeds, jobs=args.jobs, keep_phantoms=args.keep_phantoms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
