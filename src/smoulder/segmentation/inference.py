"""Brain, tissue and lesion segmentation of one session (FLAIR, with a T1w or UNIT1 when given).

1. The FLAIR's field of view is covered by a RAS+ grid of the network's voxel size (1 mm); the
   FLAIR and, when given, the T1-weighted image (already aligned to the FLAIR in world space,
   as the session workflow's co-registration leaves it) are resampled onto it (linear) and
   normalised (:func:`smoulder.segmentation.synth.normalise`).
2. Without a T1-weighted image its channel is zero and the presence flag says so: the network
   was trained to segment from the FLAIR alone in that case (nothing is imputed).
3. Sliding-window inference (MONAI, Gaussian blending), softmax.
4. Class probabilities are resampled back onto the FLAIR grid (linear); anything outside the
   largest connected piece of tissue becomes background; they give the class map
   (argmax), the brain mask (parenchyma: GM + WM + lesion probability ≥ 0.5) and the lesion
   instances (:func:`smoulder.segmentation.lesions.lesion_instances`).
5. For the lesions' location class, the MNI152 priors (:mod:`smoulder.segmentation.atlas`) are
   registered affinely to the parenchyma: the infratentorial one is read at the lesion voxels,
   and the ventricles are the CSF inside the ventricles' envelope.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from smoulder.errors import InputError
from smoulder.segmentation.network import Bundle, load_bundle
from smoulder.segmentation.refine import (
    LESION_PRIOR_FLOOR,
    brain_masks,
    em_refine,
    largest_component,
)
from smoulder.segmentation.synth import CLASSES, LESION, T1_FLAG, normalise

#: Probability maps published (``_label-<name>_probseg``) and the classes each sums.
PROBSEG = {"CSF": ("CSF",), "GM": ("cortical_GM", "deep_GM"), "WM": ("WM",), "lesion": ("lesion",)}
PARENCHYMA = ("cortical_GM", "deep_GM", "WM", "lesion")


@dataclass
class SegmentationResult:
    """What :func:`segment` returns, every image on the FLAIR's grid."""

    dseg: nib.Nifti1Image
    brain_mask: nib.Nifti1Image
    probseg: dict[str, nib.Nifti1Image]
    instances: nib.Nifti1Image
    #: infratentorial probability (:mod:`smoulder.segmentation.atlas`) at lesion voxels, else 0;
    #: None when the template could not be fitted to this brain
    infratentorial: np.ndarray | None
    #: ventricular CSF (CSF inside the MNI ventricles' envelope); None without lesions or when
    #: the template could not be fitted (the lesion table then finds ventricles in the CSF)
    ventricles: np.ndarray | None
    used_t1: bool
    device: str
    model_version: str
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)
    #: the settings it ran with (recorded in the outputs' sidecars)
    settings: dict[str, float | bool] = field(default_factory=dict)


def network_grid(
    img: nib.Nifti1Image, spacing_mm: float
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Return shape and affine of the RAS+ grid of ``spacing_mm`` voxels covering ``img``.

    Examples:
        >>> img = nib.Nifti1Image(np.zeros((10, 20, 5), np.float32), np.diag([2.0, 1.0, 3.0, 1]))
        >>> network_grid(img, 1.0)[0]
        (20, 20, 15)
    """
    shape = np.array(img.shape[:3])
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (-0.5, shape[0] - 0.5)
            for j in (-0.5, shape[1] - 0.5)
            for k in (-0.5, shape[2] - 0.5)
        ]
    )
    world = (img.affine @ corners.T)[:3]
    lo, hi = world.min(1), world.max(1)
    n = np.maximum(np.round((hi - lo) / spacing_mm).astype(int), 1)
    affine = np.diag([spacing_mm] * 3 + [1.0])
    centre = (lo + hi) / 2
    affine[:3, 3] = centre - spacing_mm * (n - 1) / 2
    return tuple(int(v) for v in n), affine  # type: ignore[return-value]


def head_box(flair: np.ndarray, margin: int = 6) -> tuple[slice, slice, slice]:
    """Return the box around the head (normalised FLAIR above 0.1) plus ``margin`` voxels.

    The network runs inside it only: in a skull-on image with neck, about half the voxels.

    Examples:
        >>> x = np.zeros((50, 50, 50), np.float32); x[20:30, 10:40, 5:15] = 1.0
        >>> head_box(x, margin=2)
        (slice(17, 33, None), slice(7, 43, None), slice(2, 18, None))
    """
    signal = ndi.uniform_filter(flair, 3) > 0.1
    if not signal.any():
        return (slice(None),) * 3  # type: ignore[return-value]
    box = ndi.find_objects(signal.astype(np.uint8))[0]
    return tuple(  # type: ignore[return-value]
        slice(max(0, b.start - margin), min(n, b.stop + margin))
        for b, n in zip(box, flair.shape, strict=True)
    )


def _resample(
    data: np.ndarray, src_affine: np.ndarray, shape, dst_affine: np.ndarray, order: int = 1
) -> np.ndarray:
    """``data`` (on ``src_affine``) sampled at the voxels of the ``shape``/``dst_affine`` grid.

    Zero outside ``data``. Where the grids' axes are parallel (the usual case: the network's
    RAS+ grid against an image stored in RAS, LAS, LPS… order) no general interpolation is
    needed: voxels that coincide are copied (axes permuted, flipped and shifted), and scaled
    axes go through scipy's separable zoom. ``ndi.affine_transform`` with a full matrix takes
    0.5–2 s per 1 mm volume even for the identity.

    Examples:
        >>> d = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        >>> flip = np.diag([-1.0, 1, 1, 1]); flip[0, 3] = 1.0  # LAS, same voxels
        >>> bool(np.array_equal(_resample(d, flip, (2, 3, 4), np.eye(4)), d[::-1]))
        True
        >>> shifted = np.eye(4); shifted[1, 3] = 1.0  # one voxel further along the second axis
        >>> _resample(d, np.eye(4), (2, 3, 4), shifted)[0, :, 0].tolist()
        [4.0, 8.0, 0.0]
    """
    m = np.linalg.inv(src_affine) @ dst_affine
    data = np.asarray(data, np.float32)
    lin, shift = m[:3, :3], m[:3, 3]
    nonzero = np.abs(lin) > 1e-6
    if nonzero.sum() == 3 and nonzero.any(0).all() and nonzero.any(1).all():
        source = [int(np.flatnonzero(nonzero[:, j])[0]) for j in range(3)]  # per output axis
        scale = np.array([lin[source[j], j] for j in range(3)])
        offset = np.array([shift[source[j]] for j in range(3)])
        view = np.transpose(data, source)
        for j in range(3):
            if scale[j] < 0:  # flipped axis: index n − 1 − i
                view = np.flip(view, j)
                scale[j], offset[j] = -scale[j], view.shape[j] - 1 - offset[j]
        if np.allclose(scale, 1.0, atol=1e-6) and np.allclose(offset, np.round(offset), atol=1e-4):
            return _copy_shifted(view, np.round(offset).astype(int), tuple(shape))
        with warnings.catch_warnings():  # a 1-D matrix is the diagonal: SciPy notes it changed
            warnings.filterwarnings("ignore", "The behavior of affine_transform", UserWarning)
            return ndi.affine_transform(
                np.ascontiguousarray(view),
                scale,
                offset,
                output_shape=tuple(shape),
                order=order,
                mode="constant",
                cval=0.0,
            )
    return ndi.affine_transform(
        data,
        lin,
        shift,
        output_shape=tuple(shape),
        order=order,
        mode="constant",
        cval=0.0,
    )


def _copy_shifted(view: np.ndarray, offset: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Return ``out`` of ``shape`` with ``out[o] = view[o + offset]`` where that lies inside
    ``view``, else 0."""
    out = np.zeros(shape, np.float32)
    dst, src = [], []
    for n_out, n_in, t in zip(shape, view.shape, offset, strict=True):
        lo, hi = max(0, -int(t)), min(n_out, n_in - int(t))
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo + int(t), hi + int(t)))
    out[tuple(dst)] = view[tuple(src)]
    return out


def _check(img: nib.Nifti1Image, what: str) -> np.ndarray:
    data = np.asarray(img.dataobj, np.float32)
    name = img.get_filename() or what
    if data.ndim != 3:
        raise InputError(name, expected=f"a 3D {what}", found=f"{data.ndim}D {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(name, expected=f"a {what} with finite values", found="NaN or Inf voxels")
    if float(data.max()) <= float(data.min()):
        raise InputError(name, expected=f"a {what} with signal", found="a constant image")
    return data


def segment(
    flair: nib.Nifti1Image,
    t1: nib.Nifti1Image | None = None,
    *,
    device: str = "cpu",
    model: str | Path | None = None,
    bundle: Bundle | None = None,
    min_lesion_ul: float = 10.0,
    refine: bool = True,
    lesion_prior_floor: float = LESION_PRIOR_FLOOR,
) -> SegmentationResult:
    """Return the segmentation of one session (see the module docstring).

    Args:
        flair: the FLAIR (any orientation and voxel size).
        t1: a T1-weighted image (T1w or UNIT1) aligned to the FLAIR in world space, or ``None``.
        device: ``cpu`` or ``cuda``.
        model: a bundle folder or shipped bundle name (default: the shipped model).
        bundle: an already loaded bundle (overrides ``model``).
        min_lesion_ul: lesions smaller than this are dropped from the instances.
        refine: clean the brain mask and fit the subject's own intensities with the network
            as prior (:mod:`smoulder.segmentation.refine`); off gives the raw network.
        lesion_prior_floor: least lesion prior in the refinement, as a share of the
            parenchyma probability (0: the network's lesion probability alone).

    Raises:
        InputError: an image that is not 3D, has non-finite voxels or no signal; a bundle
            that is missing, corrupt or does not fit its network.
    """
    import torch
    from monai.inferers import sliding_window_inference

    from smoulder.segmentation.atlas import (
        infratentorial_prior,
        read_prior,
        template_transform,
        ventricle_mask,
    )
    from smoulder.segmentation.lesions import drop_outside_white_matter, lesion_instances

    start = time.perf_counter()
    timings: dict[str, float] = {}
    bundle = bundle or load_bundle(model, device)
    f_data = _check(flair, "FLAIR")
    shape, grid = network_grid(flair, bundle.inference.spacing_mm)
    channels = np.zeros((3, *shape), np.float32)
    channels[0] = normalise(_resample(f_data, flair.affine, shape, grid))
    if t1 is not None:
        channels[1] = normalise(_resample(_check(t1, "T1-weighted image"), t1.affine, shape, grid))
        channels[T1_FLAG] = 1.0
    timings["prepare_s"] = time.perf_counter() - start
    tic = time.perf_counter()
    x = torch.from_numpy(channels)[None].to(device)
    roi = tuple(min(r, max(16, s)) for r, s in zip(bundle.inference.roi_size, shape, strict=True))
    with torch.inference_mode():
        logits = sliding_window_inference(
            x,
            roi,
            bundle.inference.sw_batch_size,
            bundle.network,
            overlap=bundle.inference.overlap,
            mode=bundle.inference.mode,
        )
        probs = torch.softmax(logits, 1)[0].float().cpu().numpy()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    timings["network_s"] = time.perf_counter() - tic
    if refine:
        tic = time.perf_counter()
        _, intracranial = brain_masks(probs, spacing_mm=bundle.inference.spacing_mm)
        images = [channels[0]] + ([channels[1]] if t1 is not None else [])
        probs = em_refine(images, probs, intracranial, lesion_prior_floor=lesion_prior_floor)
        timings["refine_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    out_shape = flair.shape[:3]
    back = np.stack([_resample(p, grid, out_shape, flair.affine) for p in probs])
    outside = back.sum(0) < 1e-3  # beyond the network grid: background
    back[0][outside] = 1.0
    back /= back.sum(0, keepdims=True)
    stray = ~largest_component(back.argmax(0) > 0)  # specks beyond the head: background
    back[:, stray] = 0.0
    back[0, stray] = 1.0
    dseg = back.argmax(0).astype(np.uint8)
    parenchyma = sum(back[CLASSES.index(c)] for c in PARENCHYMA)
    brain = (parenchyma >= 0.5).astype(np.uint8)
    lesion_prob = drop_outside_white_matter(back[LESION], back[CLASSES.index("WM")])
    instances = lesion_instances(lesion_prob, flair.affine, min_volume_ul=min_lesion_ul)
    # the class map agrees with the reported lesions: dropped candidates get their next class
    dropped = (dseg == LESION) & (instances == 0)
    if dropped.any():
        dseg[dropped] = back[:LESION, dropped].argmax(0).astype(np.uint8)
    timings["finish_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    # where the lesions lie: the MNI priors (infratentorial, ventricles), fitted to this brain
    below: np.ndarray | None = np.zeros(instances.shape, np.float32)
    ventricles = None
    if instances.any():
        to_template = template_transform(parenchyma, flair.affine, device=device)
        below = None
        if to_template is not None:
            below = read_prior(infratentorial_prior(), to_template, flair.affine, instances > 0)
            ventricles = ventricle_mask(dseg == CLASSES.index("CSF"), flair.affine, to_template)
    timings["locations_s"] = time.perf_counter() - tic

    def image(data: np.ndarray, dtype: type) -> nib.Nifti1Image:
        img = nib.Nifti1Image(data.astype(dtype), flair.affine)
        img.set_qform(flair.affine, 1)
        img.set_sform(flair.affine, 1)
        return img

    probseg = {
        name: image(sum(back[CLASSES.index(c)] for c in parts), np.float32)
        for name, parts in PROBSEG.items()
    }
    return SegmentationResult(
        dseg=image(dseg, np.uint8),
        brain_mask=image(brain, np.uint8),
        probseg=probseg,
        instances=image(instances, np.int16),
        infratentorial=below,
        ventricles=ventricles,
        used_t1=t1 is not None,
        device=device,
        model_version=bundle.version,
        wall_s=time.perf_counter() - start,
        timings=timings,
        settings={
            "refine": refine,
            "lesion_prior_floor": lesion_prior_floor if refine else 0.0,
            "min_lesion_ul": min_lesion_ul,
        },
    )
