"""Domain-randomised training images synthesised from label maps, in the manner of SynthSeg.

A training sample is drawn from one of the real whole-brain label maps (FreeSurfer labels, 1 mm):

1. a patch centre is chosen (mostly in white matter, where MS lesions are);
2. real lesion shapes (connected components of expert masks) are pasted onto white matter;
3. the labels are moved by a random affine (rotation, scaling) and a smooth random deformation;
4. each label gets its own intensity per channel, drawn around a contrast prior (FLAIR: lesions
   bright, CSF dark; T1-weighted: lesions and CSF dark) or, sometimes for the T1 channel, with
   no prior at all (any contrast, e.g. UNIT1);
5. the images are blurred to a random acquisition resolution (0.7-1.2 mm in plane, up to 3 mm
   slices along a random axis), multiplied by a smooth bias field, given noise and a random gamma;
6. they are scaled by the same whole-image normalisation the network sees at inference
   (:func:`normalise`), computed on the whole synthetic head, not on the patch.

The target is the class map of :data:`CLASSES`. Half of the samples lack the T1 channel: it is
then zero and the third input channel (:data:`T1_FLAG`) says so explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from smoulder.segmentation.classes import CLASSES, LESION

#: Input channels: FLAIR, T1-weighted (zero when absent) and a T1-present flag (0 or 1).
CHANNELS: tuple[str, ...] = ("FLAIR", "T1w", "T1w_present")
T1_FLAG = 2

#: FreeSurfer/SynthSeg label → class index. Labels not listed are background (outside the brain).
_CLASS_LABELS: dict[str, tuple[int, ...]] = {
    "CSF": (4, 5, 14, 15, 24, 31, 43, 44, 63, 72, 136, 137, 163, 164),
    "cortical_GM": (3, 8, 17, 18, 42, 47, 53, 54),
    "deep_GM": (10, 11, 12, 13, 26, 28, 49, 50, 51, 52, 58, 60),
    "WM": (2, 7, 16, 25, 30, 41, 46, 57, 62, 77, 85),
}
#: Label given to pasted lesions (outside FreeSurfer's range, so never confused).
LESION_LABEL = 999
#: Label of CSF painted FLAIR-bright (:func:`bright_csf`); its class is CSF.
CSF_ARTIFACT_LABEL = 998
_WM_LABELS = (2, 41)
_VENTRICLE_LABELS = (4, 43)
#: ventricles (lateral, temporal horns, third, fourth) and the extra-cerebral CSF (cisterns)
_CSF_SPACE_LABELS = (4, 5, 14, 15, 24, 43, 44)


def class_lookup(max_label: int = 1024) -> np.ndarray:
    """Return the lookup table label → class index (:data:`CLASSES`).

    Examples:
        >>> lut = class_lookup()
        >>> [CLASSES[lut[v]] for v in (0, 2, 3, 10, 4, 999, 998, 507)]
        ['background', 'WM', 'cortical_GM', 'deep_GM', 'CSF', 'lesion', 'CSF', 'background']
    """
    lut = np.zeros(max_label, np.int64)
    for name, labels in _CLASS_LABELS.items():
        lut[list(labels)] = CLASSES.index(name)
    lut[LESION_LABEL] = LESION
    lut[CSF_ARTIFACT_LABEL] = CLASSES.index("CSF")
    return lut


@dataclass(frozen=True)
class ContrastPrior:
    """Range of the mean intensity of each class (white matter about 1/2 of the brightest)."""

    csf: tuple[float, float]
    cortical_gm: tuple[float, float]
    deep_gm: tuple[float, float]
    wm: tuple[float, float]
    lesion_over_wm: tuple[float, float]  # lesion mean = WM mean × this


#: FLAIR: grey matter from as dark as white matter (weak contrast, as on some scanners and the
#: phantom) to much brighter; lesions at least 1.1 times white matter and 0.8-1.6 times the
#: brighter of grey matter and 1.1 x white matter (see ``_class_means``): lesion/WM 1.1-2.7
#: (median 1.6), darker than the brightest grey matter in a fifth of the samples. Why: on the
#: raw FLAIR of the open_ms longitudinal cases (not benchmark cases) the expert-marked new
#: lesions have means of 0.76-1.62 times white matter (medians 0.98 and 1.22), about as bright
#: as cortex (medians 0.79 and 0.99 of it; models/smoulder_seg/docs/flair_contrast.py); the
#: earlier prior (lesion/WM 1.5-2.7, always 1.1-1.5 times grey matter) never showed the
#: network a lesion as faint as most real ones.
FLAIR_PRIOR = ContrastPrior((0.02, 0.2), (0.4, 0.75), (0.35, 0.65), (0.3, 0.6), (1.1, 2.2))
#: a hyperintense lesion's mean as a share of max(brightest grey matter, lesion_over_wm[0] x WM)
LESION_OVER_GM = (0.8, 1.6)
#: FLAIR mean of CSF painted bright (:data:`CSF_ARTIFACT_LABEL`), as a multiple of white matter's
#: mean: incompletely nulled CSF (inflow and pulsation in the basal cisterns, third and fourth
#: ventricles, temporal horns) and the choroid plexus are as bright as lesions on real FLAIR.
CSF_ARTIFACT_OVER_WM = (0.8, 2.0)
#: spread (SD of the log intensity) of the smooth field that varies lesion brightness between
#: and within lesions: real lesions differ from each other and fade from core to edge
LESION_HETEROGENEITY = 0.12
T1_PRIOR = ContrastPrior((0.02, 0.25), (0.35, 0.55), (0.45, 0.65), (0.65, 0.9), (0.4, 0.9))


@dataclass(frozen=True)
class SynthSettings:
    """Ranges of the random generation."""

    patch: int = 64
    lesions_per_patch: tuple[int, int] = (0, 10)
    rotation_deg: float = 15.0
    scaling: tuple[float, float] = (0.85, 1.15)
    deformation_mm: float = 3.0
    inplane_mm: tuple[float, float] = (0.7, 1.3)
    slice_mm: tuple[float, float] = (1.0, 3.0)
    noise: tuple[float, float] = (0.0, 0.05)
    bias: float = 0.3
    gamma: float = 0.2
    p_t1: float = 0.5
    p_random_t1: float = 0.15
    p_stripped: float = 0.35
    p_wm_centre: float = 0.7
    p_periventricular: float = 0.0  # share of lesions centred within 5 mm of a lateral ventricle
    p_csf_artifact: float = 0.0  # share of samples with FLAIR-bright CSF (:func:`bright_csf`)
    csf_artifact_share: tuple[float, float] = (0.03, 0.3)  # of the patch's CSF, when present


def normalise(x: np.ndarray) -> np.ndarray:
    """Return ``x`` scaled so that its bright tissue is near 1 (the network's input scale).

    The scale is the 99th percentile of the foreground, the voxels above 5 % of the 99.9th
    percentile: insensitive to the field of view, to skull stripping and to a few hot voxels.

    Examples:
        >>> x = np.zeros((10, 10, 10)); x[2:8, 2:8, 2:8] = 400.0
        >>> float(normalise(x).max())
        1.0
    """
    x = np.asarray(x, np.float32)
    scale = reference_scale(x)
    return x / scale if scale > 0 else x


def reference_scale(x: np.ndarray) -> float:
    """Return the intensity :func:`normalise` divides by."""
    flat = np.asarray(x, np.float32).ravel()
    if flat.size > 2_000_000:  # a regular subsample: same figure, a tenth of the time
        flat = flat[:: flat.size // 1_000_000]
    top = float(np.percentile(flat, 99.9))
    fg = flat[flat > 0.05 * top]
    return float(np.percentile(fg, 99)) if fg.size else 0.0


@dataclass
class LabelMap:
    """A label map (RAS+, uint16, cropped to the head) with what sampling needs precomputed."""

    labels: np.ndarray
    present: np.ndarray  # labels that occur
    coarse: np.ndarray  # every second voxel: for the whole-head normalisation
    wm_centres: np.ndarray  # candidate patch centres (voxel indices) in cerebral WM
    brain_centres: np.ndarray  # candidate patch centres anywhere in the brain

    @classmethod
    def from_array(cls, labels: np.ndarray) -> LabelMap:
        """Precompute the sampling helpers of ``labels``."""
        lut = class_lookup()
        coarse = labels[::2, ::2, ::2]
        return cls(
            labels=labels,
            present=np.unique(labels),
            coarse=np.ascontiguousarray(coarse),
            wm_centres=np.argwhere(np.isin(coarse, _WM_LABELS)) * 2,
            brain_centres=np.argwhere(lut[coarse] > 0) * 2,
        )


def load_label_maps(folder: str | Path) -> list[LabelMap]:
    """Return the label maps of ``folder`` (``training_seg_*.nii.gz``), RAS+, cropped to the head.

    Raises:
        FileNotFoundError: no label map in ``folder``.
    """
    paths = sorted(Path(folder).glob("training_seg_*.nii.gz"))
    if not paths:
        raise FileNotFoundError(f"{folder}: expected training_seg_*.nii.gz label maps, found none")
    maps = []
    for path in paths:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj).astype(np.uint16)
        box = ndi.find_objects((data > 0).astype(np.uint8))[0]
        maps.append(LabelMap.from_array(np.ascontiguousarray(data[box])))
    return maps


#: Real cases the segmentation is evaluated on (benchmarks/segmentation.py): their lesion masks
#: are left out of the shape bank, so no figure on them comes from a model that saw them.
HELD_OUT_CASES: tuple[str, ...] = ("patient07", "patient19")


def load_lesion_shapes(
    folder: str | Path, *, min_voxels: int = 5, exclude: Sequence[str] = HELD_OUT_CASES
) -> list[np.ndarray]:
    """Return every lesion (26-connected component) of the masks in ``folder`` as a small box.

    Args:
        folder: lesion masks (``*.nii.gz``).
        min_voxels: smaller components are skipped.
        exclude: masks whose file name starts with one of these are skipped (held-out cases).

    Raises:
        FileNotFoundError: no ``*.nii.gz`` mask in ``folder``.
    """
    paths = sorted(
        p for p in Path(folder).glob("*.nii.gz") if not p.name.startswith(tuple(exclude))
    )
    if not paths:
        raise FileNotFoundError(f"{folder}: expected lesion masks (*.nii.gz), found none")
    shapes = []
    for path in paths:
        mask = np.asarray(nib.load(path).dataobj) > 0.5
        labels, _ = ndi.label(mask, structure=np.ones((3, 3, 3)))
        for index, box in enumerate(ndi.find_objects(labels), start=1):
            if box is None:
                continue
            shape = labels[box] == index
            if shape.sum() >= min_voxels:
                shapes.append(shape)
    return shapes


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    out = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = out @ r
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], nodes: int, sd: float):
    """Return a smooth random field of ``shape``: ``nodes``³ Gaussian values, cubic upsampling."""
    coarse = rng.normal(0.0, sd, (nodes, nodes, nodes))
    zoom = [s / nodes for s in shape]
    return ndi.zoom(coarse, zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]


def paste_lesions(
    labels: np.ndarray,
    shapes: Sequence[np.ndarray],
    rng: np.random.Generator,
    count: int,
    region: tuple[slice, slice, slice] | None = None,
    p_periventricular: float = 0.0,
) -> np.ndarray:
    """Return ``labels`` with ``count`` lesion shapes pasted on cerebral white matter.

    Each shape is randomly flipped and transposed, centred on a random white-matter voxel (of
    ``region`` when given; with probability ``p_periventricular`` one within 5 mm of a lateral
    ventricle, where MS lesions gather and become confluent), and labelled
    :data:`LESION_LABEL` where it covers white matter (lesions stay in the WM, as in MS).
    """
    out = labels.copy()
    wm = np.isin(labels, _WM_LABELS)
    centres = wm
    if region is not None:
        centres = np.zeros_like(wm)
        centres[region] = wm[region]
    where = np.argwhere(centres)
    if not len(where) or not shapes:
        return out
    near = np.zeros((0, 3), int)
    if p_periventricular > 0:
        ventricles = np.isin(labels, _VENTRICLE_LABELS)
        if ventricles.any():
            band = ndi.binary_dilation(ventricles, np.ones((3, 3, 3), bool), iterations=5)
            near = np.argwhere(band & centres)
    for _ in range(count):
        pool = near if len(near) and rng.random() < p_periventricular else where
        centre = pool[rng.integers(len(pool))]
        shape = shapes[rng.integers(len(shapes))]
        shape = np.transpose(shape, rng.permutation(3))
        for axis in range(3):
            if rng.random() < 0.5:
                shape = np.flip(shape, axis)
        lo = centre - np.array(shape.shape) // 2
        src = tuple(
            slice(max(0, -lo[a]), shape.shape[a] - max(0, lo[a] + shape.shape[a] - labels.shape[a]))
            for a in range(3)
        )
        dst = tuple(
            slice(max(0, lo[a]), min(labels.shape[a], lo[a] + shape.shape[a])) for a in range(3)
        )
        piece = shape[src] & wm[dst]
        out[dst][piece] = LESION_LABEL
    return out


def bright_csf(
    labels: np.ndarray, rng: np.random.Generator, share: tuple[float, float] = (0.03, 0.3)
) -> np.ndarray:
    """Return ``labels`` with patches of ventricular and cisternal CSF relabelled
    :data:`CSF_ARTIFACT_LABEL` (painted FLAIR-bright, class CSF).

    On real FLAIR, CSF is not always nulled: inflow and pulsation leave bright CSF in the basal
    cisterns, the third and fourth ventricles and the temporal horns, and the choroid plexus in
    the lateral ventricles is bright too. Their T1 stays dark, like CSF. A network that has only
    seen dark CSF calls them lesions (most false positives on the open_ms cases). The patches
    are the top ``share`` (drawn from the range) of a smooth random field (4-8 mm features)
    within the CSF spaces.

    Examples:
        >>> lab = np.full((24, 24, 24), 2, np.uint16); lab[6:18, 6:18, 6:18] = 4
        >>> out = bright_csf(lab, np.random.default_rng(0), (0.2, 0.2))
        >>> round(float((out == CSF_ARTIFACT_LABEL).sum() / (lab == 4).sum()), 2)
        0.2
        >>> bool(((out == CSF_ARTIFACT_LABEL) <= (lab == 4)).all())
        True
    """
    csf = np.isin(labels, _CSF_SPACE_LABELS)
    if csf.sum() < 20:
        return labels
    nodes = max(2, int(round(max(labels.shape) / rng.uniform(4.0, 8.0))))
    field = _smooth_field(rng, labels.shape, nodes, 1.0)
    threshold = np.quantile(field[csf], 1.0 - rng.uniform(*share))
    out = labels.copy()
    out[csf & (field > threshold)] = CSF_ARTIFACT_LABEL
    return out


def _class_means(
    rng: np.random.Generator, labels: np.ndarray, prior: ContrastPrior | None, lut: np.ndarray
) -> dict[int, float]:
    """Mean intensity of each label: the class's prior range, jittered per label."""
    means: dict[int, float] = {}
    if prior is None:
        for label in labels:
            means[int(label)] = float(rng.uniform(0.0, 1.0))
        return means
    ranges = {
        1: prior.csf,
        2: prior.cortical_gm,
        3: prior.deep_gm,
        4: prior.wm,
    }
    centre = {c: rng.uniform(*r) for c, r in ranges.items()}
    centre[LESION] = centre[4] * rng.uniform(*prior.lesion_over_wm)
    if prior.lesion_over_wm[0] > 1.0:  # hyperintense: set against the brightest parenchyma
        least = prior.lesion_over_wm[0] * centre[4]
        ref = max(centre[2], centre[3], least)
        centre[LESION] = max(least, ref * rng.uniform(*LESION_OVER_GM))
    for label in labels:
        c = int(lut[label])
        if label == CSF_ARTIFACT_LABEL and prior.lesion_over_wm[0] > 1.0:  # FLAIR: bright
            means[int(label)] = float(centre[4] * rng.uniform(*CSF_ARTIFACT_OVER_WM))
        elif c == 0:
            means[int(label)] = float(rng.uniform(0.0, 0.8))
        else:
            means[int(label)] = float(max(0.0, centre[c] * rng.uniform(0.93, 1.07)))
    return means


def _paint(
    rng: np.random.Generator,
    labels: np.ndarray,
    full: LabelMap,
    prior: ContrastPrior | None,
    lut: np.ndarray,
    stripped: bool,
    s: SynthSettings,
) -> np.ndarray:
    """Return one synthetic channel on ``labels``, normalised as the whole head would be."""
    present = np.union1d(np.unique(labels), full.present)
    means = _class_means(rng, present, prior, lut)
    if stripped:
        for label in present:
            if lut[label] == 0:
                means[int(label)] = 0.0
    stds = {k: rng.uniform(0.0, 0.07) for k in means}
    mean_lut = np.zeros(int(present.max()) + 1, np.float32)
    std_lut = np.zeros_like(mean_lut)
    for k, v in means.items():
        mean_lut[k], std_lut[k] = v, stds[k]
    img = mean_lut[labels] + std_lut[labels] * rng.standard_normal(labels.shape).astype(np.float32)
    lesion = labels == LESION_LABEL
    if lesion.any():  # each lesion its own brightness, varying within it (~8 mm scale)
        nodes = max(2, labels.shape[0] // 8)
        vary = np.exp(_smooth_field(rng, labels.shape, nodes, LESION_HETEROGENEITY))
        img[lesion] *= vary[lesion].astype(np.float32)
    # acquisition resolution: Gaussian blur with the FWHM of the voxel (labels are 1 mm)
    res = np.array([rng.uniform(*s.inplane_mm) for _ in range(3)])
    if rng.random() < 0.5:
        res[rng.integers(3)] = rng.uniform(*s.slice_mm)
    img = ndi.gaussian_filter(img, 0.4 * res)
    bias = np.exp(_smooth_field(rng, img.shape, 4, s.bias)).astype(np.float32)
    img = img * bias
    img = img + rng.uniform(*s.noise) * rng.standard_normal(img.shape).astype(np.float32)
    img = np.clip(img, 0.0, None)
    # scale as normalise() would on the whole head (label means only; jittered for the rest)
    head = mean_lut[full.coarse]
    scale = reference_scale(head) * rng.uniform(0.9, 1.1)
    img = img / max(scale, 1e-6)
    img = np.clip(img, 0.0, None) ** np.exp(rng.normal(0.0, s.gamma))
    return img.astype(np.float32)


def synth_sample(
    rng: np.random.Generator,
    label_maps: Sequence[LabelMap],
    lesion_shapes: Sequence[np.ndarray],
    settings: SynthSettings = SynthSettings(),
) -> tuple[np.ndarray, np.ndarray]:
    """Return one training pair: inputs ``(3, P, P, P)`` float32 and target ``(P, P, P)`` int64.

    ``P`` is ``settings.patch`` (1 mm voxels). See the module docstring for the steps.
    """
    s = settings
    lut = class_lookup()
    full = label_maps[rng.integers(len(label_maps))]
    # 1. centre and a crop large enough for rotation and scaling
    half = int(np.ceil(s.patch * 0.9))
    where = full.wm_centres if rng.random() < s.p_wm_centre else full.brain_centres
    centre = where[rng.integers(len(where))]
    shape = full.labels.shape
    lo = centre - half
    pad = [(max(0, -lo[a]), max(0, lo[a] + 2 * half - shape[a])) for a in range(3)]
    box = tuple(slice(max(0, lo[a]), min(shape[a], lo[a] + 2 * half)) for a in range(3))
    crop = np.pad(full.labels[box], pad)
    # 2. lesions
    count = int(rng.integers(s.lesions_per_patch[0], s.lesions_per_patch[1] + 1))
    inner = tuple(slice(half - s.patch // 2, half + s.patch // 2) for _ in range(3))
    crop = paste_lesions(crop, lesion_shapes, rng, count, inner, s.p_periventricular)
    # 3. spatial transform: output voxel u → crop voxel c + A (u - P/2) + smooth displacement
    a = _rotation(rng, s.rotation_deg) * rng.uniform(*s.scaling, size=3)[None, :]
    p = s.patch
    grid = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2] * 3, indexing="ij"), 0)
    coords = np.tensordot(a, grid, axes=1) + half
    sd = rng.uniform(0.0, s.deformation_mm) / 2.0
    for axis in range(3):
        coords[axis] += _smooth_field(rng, (p, p, p), 5, sd)
    labels = ndi.map_coordinates(crop, coords, order=0, mode="constant", cval=0)
    labels = labels.astype(np.int64)
    if s.p_csf_artifact > 0 and rng.random() < s.p_csf_artifact:
        labels = bright_csf(labels, rng, s.csf_artifact_share)
    # 4-6. channels
    stripped = rng.random() < s.p_stripped
    flair = _paint(rng, labels, full, FLAIR_PRIOR, lut, stripped, s)
    has_t1 = rng.random() < s.p_t1
    if has_t1:
        prior = None if rng.random() < s.p_random_t1 else T1_PRIOR
        t1 = _paint(rng, labels, full, prior, lut, stripped, s)
    else:
        t1 = np.zeros_like(flair)
    flag = np.full_like(flair, 1.0 if has_t1 else 0.0)
    return np.stack([flair, t1, flag]), lut[labels]
