"""Multi-echo GRE phantoms on the QSM challenge 2.0 head model, with rim and non-rim lesions.

The head model (``../shared/data/qsm_head_model``: 16 tissue labels with susceptibility
values, Marques et al., MRM 2021) is a real head segmented at 0.64 mm. Here its label grid is
taken as the acquisition grid at ``voxel_mm`` (0.7 mm by default: the head comes out 9 %
larger, within the range of adult heads), so the true χ is exact on the grid the
reconstruction sees, with no interpolation in the truth.

Lesions are ellipsoids placed deep in white matter. A *rim* lesion has a paramagnetic shell of
``rim_mm`` inside its edge (iron-laden microglia: χ above white matter, short T2*) around a
core that is slightly paramagnetic (demyelination); a *plain* lesion has the core only.

The field comes from :func:`smoulder.phantom.physics.field_from_chi` (padded FFT, the air
outside the head as background), with B0 tilted by ``tilt_deg`` about the first voxel axis
for oblique acquisitions: the affine then carries the same rotation, so a reader finds B0 along
world z. Magnitude is proton density × exp(−TE/T2*) per label; a smooth transceive phase and
complex Gaussian noise (σ = white-matter magnitude of echo 1 / ``snr``) are added and the phase
is wrapped. The forward model evaluates the dipole kernel on the acquisition grid itself, so
figures on these phantoms do not include the error of partial volumes finer than a voxel.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from smoulder.phantom import physics

#: Label → (proton density, T2* ms at 3 T) of the head model's 16 labels.
TISSUE = {
    1: (0.80, 40.0),  # caudate
    2: (0.75, 20.0),  # globus pallidus
    3: (0.80, 35.0),  # putamen
    4: (0.78, 25.0),  # red nucleus
    5: (0.78, 22.0),  # dentate nucleus
    6: (0.78, 22.0),  # substantia nigra and STN
    7: (0.78, 45.0),  # thalamus
    8: (0.70, 45.0),  # white matter
    9: (0.82, 55.0),  # grey matter
    10: (1.00, 200.0),  # CSF
    11: (0.85, 15.0),  # blood
    12: (0.90, 40.0),  # fat
    13: (0.05, 1.5),  # bone
    14: (0.00, 1.0),  # air
    15: (0.70, 30.0),  # muscle and other soft tissue
    16: (0.05, 1.0),  # calcification
}
WHITE_MATTER, AIR = 8, 14
LESION_CORE = (0.02, 0.80, 70.0)  # χ above white matter (ppm), PD, T2* ms
LESION_RIM = (0.06, 0.72, 25.0)


@dataclass(frozen=True)
class HeadGreConfig:
    """What one head-model GRE looks like.

    Attributes:
        voxel_mm: isotropic voxel the head model's label grid is taken to have.
        echoes: number of echoes, at ``first_te_ms + k * echo_spacing_ms``.
        first_te_ms: first echo time.
        echo_spacing_ms: time between echoes.
        b0_tesla: field strength.
        snr: white-matter magnitude of the first echo over the noise sd.
        tilt_deg: rotation of B0 about the first voxel axis (oblique acquisition).
        rim_lesions: lesions with a paramagnetic rim.
        plain_lesions: lesions without one.
        radius_mm: range of the ellipsoids' semi-axes, drawn uniformly.
        rim_mm: thickness of the rim shell inside the lesion edge.
        seed: random seed: lesion positions, phase offset and noise.
    """

    voxel_mm: float = 0.7
    echoes: int = 5
    first_te_ms: float = 4.0
    echo_spacing_ms: float = 5.0
    b0_tesla: float = 3.0
    snr: float = 100.0
    tilt_deg: float = 0.0
    rim_lesions: int = 6
    plain_lesions: int = 6
    radius_mm: tuple[float, float] = (3.0, 5.5)
    rim_mm: float = 1.5
    seed: int = 0

    @property
    def echo_times_ms(self) -> list[float]:
        """The echo times."""
        return [self.first_te_ms + i * self.echo_spacing_ms for i in range(self.echoes)]


def load_model(folder: str | Path) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """Return ``(labels, brain mask, χ per label in ppm)`` of the head model in ``folder``."""
    from scipy.io import loadmat

    folder = Path(folder)
    labels = np.asarray(nib.load(folder / "masks" / "SegmentedModel.nii.gz").dataobj)
    brain = np.asarray(nib.load(folder / "masks" / "BrainMask.nii.gz").dataobj) > 0.5
    table = loadmat(folder / "chimodel" / "SusceptibilityValues.mat")["label"][0]
    chi = {i: float(entry["chiref"][0][0]) for i, entry in enumerate(table, start=1)}
    return labels.astype(np.int16), brain, chi


def place_lesions(
    white_matter: np.ndarray, config: HeadGreConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(lesion fraction, rim fraction)`` maps of ellipsoids placed deep in WM.

    Each lesion lies wholly inside white matter with a 1 mm margin; lesions do not touch.
    Fractions come from 3× supersampling of each voxel (partial volume at the edges).
    """
    v = config.voxel_mm
    lesion = np.zeros(white_matter.shape, np.float32)
    rim = np.zeros(white_matter.shape, np.float32)
    depth = ndi.distance_transform_edt(white_matter) * v
    taken = np.zeros(white_matter.shape, bool)
    kinds = [True] * config.rim_lesions + [False] * config.plain_lesions
    sub = (np.arange(3) - 1) / 3.0
    for has_rim in kinds:
        radii = rng.uniform(*config.radius_mm, size=3)
        room = (depth > radii.max() + 1.0) & ~taken
        where = np.flatnonzero(room)
        if where.size == 0:
            raise ValueError("no room left in white matter for another lesion")
        centre = np.array(np.unravel_index(where[rng.integers(where.size)], white_matter.shape))
        reach = int(math.ceil(radii.max() / v)) + 1
        box = tuple(slice(c - reach, c + reach + 1) for c in centre)
        grid = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * 3, indexing="ij"), -1)
        frac_lesion = np.zeros(grid.shape[:3], np.float32)
        frac_core = np.zeros(grid.shape[:3], np.float32)
        inner = np.maximum(radii - config.rim_mm, 0.5)
        for dx in sub:
            for dy in sub:
                for dz in sub:
                    p = (grid + np.array([dx, dy, dz])) * v
                    frac_lesion += ((p / radii) ** 2).sum(-1) <= 1.0
                    frac_core += ((p / inner) ** 2).sum(-1) <= 1.0
        frac_lesion /= 27.0
        frac_core /= 27.0
        lesion[box] = np.maximum(lesion[box], frac_lesion)
        if has_rim:
            rim[box] = np.maximum(rim[box], frac_lesion - frac_core)
        taken[box] |= ndi.binary_dilation(frac_lesion > 0, iterations=int(round(2.0 / v)))
    return lesion, rim


def simulate(folder: str | Path, config: HeadGreConfig = HeadGreConfig()) -> dict:
    """Return the phantom of the head model in ``folder`` (see :func:`simulate_labels`)."""
    labels, brain, chi_of = load_model(folder)
    return simulate_labels(labels, brain, chi_of, config)


def simulate_labels(
    labels: np.ndarray,
    brain: np.ndarray,
    chi_of: dict[int, float],
    config: HeadGreConfig = HeadGreConfig(),
) -> dict:
    """Return the phantom of a label map: complex echoes (E, X, Y, Z), affine, true χ (ppm),
    true total field (ppm), brain, lesion and rim maps, and ``config``.

    χ is on the head model's scale (not referenced to anything in the brain): compare maps
    after removing each one's mean inside the brain, as QSM is relative.
    """
    rng = np.random.default_rng(config.seed)
    lesion, rim = place_lesions(labels == WHITE_MATTER, config, rng)
    size = max(int(labels.max()), *chi_of) + 1
    lut_chi = np.zeros(size, np.float32)
    lut_pd = np.zeros(size, np.float32)
    lut_r2s = np.zeros(size, np.float32)
    for lab, value in chi_of.items():
        lut_chi[lab] = value
        pd, t2s = TISSUE[lab]
        lut_pd[lab], lut_r2s[lab] = pd, 1.0 / t2s
    chi = lut_chi[labels]
    pd, r2s = lut_pd[labels], lut_r2s[labels]
    core = np.clip(lesion - rim, 0.0, 1.0)
    base_chi = chi_of[WHITE_MATTER]
    for frac, (dchi, l_pd, l_t2s) in ((core, LESION_CORE), (rim, LESION_RIM)):
        chi = chi * (1 - frac) + frac * (base_chi + dchi)
        pd = pd * (1 - frac) + frac * l_pd
        r2s = r2s * (1 - frac) + frac * (1.0 / l_t2s)
    tilt = math.radians(config.tilt_deg)
    rot = np.array(
        [
            [1.0, 0.0, 0.0],
            [0.0, math.cos(tilt), -math.sin(tilt)],
            [0.0, math.sin(tilt), math.cos(tilt)],
        ]
    )
    b0_vox = rot.T @ np.array([0.0, 0.0, 1.0])  # world z seen from the tilted voxel axes
    v = config.voxel_mm
    field = physics.field_from_chi(chi, (v, v, v), b0_dir=b0_vox, background_ppm=chi_of[AIR])
    affine = np.eye(4)
    affine[:3, :3] = rot * v
    affine[:3, 3] = -affine[:3, :3] @ (np.array(labels.shape) / 2.0)
    offset = physics.smooth_phase_offset(labels.shape, rng)
    omega = 2 * math.pi * physics.GAMMA_BAR_MHZ_PER_T * config.b0_tesla * 1e-3
    wm = labels == WHITE_MATTER
    sigma = float(pd[wm].mean() * math.exp(-config.first_te_ms / 45.0)) / config.snr
    echoes = np.empty((config.echoes, *labels.shape), np.complex64)
    for e, te in enumerate(config.echo_times_ms):
        mag = pd * np.exp(-te * r2s)
        signal = mag * np.exp(1j * (offset + omega * te * field)).astype(np.complex64)
        echoes[e] = physics.add_complex_noise(signal, sigma, rng)
    return {
        "echoes": echoes,
        "affine": affine,
        "chi_ppm": chi.astype(np.float32),
        "field_ppm": field,
        "brain": brain,
        "lesion": lesion,
        "rim": rim,
        "config": config,
    }


def write_bids(phantom: dict, root: str | Path, subject: str = "01") -> Path:
    """Write the phantom as a BIDS MEGRE session plus truth under ``derivatives/truth``.

    Files (session ``ses-01``): ``anat/sub-X_ses-01_echo-N_part-{mag,phase}_MEGRE.nii.gz`` with
    sidecars; truth ``Chimap``, ``desc-brain_mask``, ``label-lesion_probseg``,
    ``label-rim_probseg`` and ``desc-field_fieldmap`` (ppm), all on the GRE grid.
    """
    config: HeadGreConfig = phantom["config"]
    root = Path(root)
    pre = f"sub-{subject}_ses-01"
    anat = root / f"sub-{subject}" / "ses-01" / "anat"
    truth = root / "derivatives" / "truth" / f"sub-{subject}" / "ses-01" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    affine = phantom["affine"]

    def save(data: np.ndarray, path: Path, side: dict | None = None) -> None:
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, 1)
        img.set_sform(affine, 1)
        tmp = path.with_name(f".{path.name}")
        nib.save(img, tmp)
        tmp.replace(path)
        if side is not None:
            path.with_name(path.name.replace(".nii.gz", ".json")).write_text(
                json.dumps(side, indent=1)
            )

    for e, te in enumerate(config.echo_times_ms):
        side = {
            "EchoTime": te / 1000.0,
            "MagneticFieldStrength": config.b0_tesla,
            "EchoNumber": e + 1,
        }
        z = phantom["echoes"][e]
        save(np.abs(z).astype(np.float32), anat / f"{pre}_echo-{e + 1}_part-mag_MEGRE.nii.gz", side)
        save(
            np.angle(z).astype(np.float32),
            anat / f"{pre}_echo-{e + 1}_part-phase_MEGRE.nii.gz",
            {**side, "Units": "rad"},
        )
    save(phantom["chi_ppm"], truth / f"{pre}_Chimap.nii.gz")
    save(phantom["brain"].astype(np.uint8), truth / f"{pre}_desc-brain_mask.nii.gz")
    save(phantom["lesion"], truth / f"{pre}_label-lesion_probseg.nii.gz")
    save(phantom["rim"], truth / f"{pre}_label-rim_probseg.nii.gz")
    save(phantom["field_ppm"], truth / f"{pre}_desc-field_fieldmap.nii.gz")
    (root / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "smoulder QSM head-model phantom",
                "BIDSVersion": "1.9.0",
                "GeneratedBy": [{"Name": "smoulder.phantom.qsm_head", "Config": asdict(config)}],
            },
            indent=1,
        )
    )
    return root
