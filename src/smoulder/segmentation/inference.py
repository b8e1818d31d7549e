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
   and the ventricles are the CSF inside the ventricles' envelope. With them the lesion table
   is made (:func:`smoulder.segmentation.lesions.lesion_table`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from smoulder.errors import InputError
from smoulder.grids import covering_grid, resample_to_grid
from smoulder.segmentation.atlas import (
    infratentorial_prior,
    read_prior,
    template_transform,
    ventricle_mask,
)
from smoulder.segmentation.candidates import (
    CandidateClassifier,
    candidate_features,
    keep_candidates,
)
from smoulder.segmentation.classes import CLASSES, LESION, class_indices
from smoulder.segmentation.lesions import (
    drop_outside_white_matter,
    lesion_instances,
    lesion_table,
)
from smoulder.segmentation.network import Bundle, load_bundle
from smoulder.segmentation.refine import (
    LESION_PRIOR_FLOOR,
    brain_masks,
    em_refine,
    largest_component,
)
from smoulder.segmentation.synth import T1_FLAG, normalise

#: Tissues whose probability is published (``_label-<name>_probseg``), in this order: each
#: the sum of the classes :data:`~smoulder.segmentation.classes.TISSUES` lists for it (``WM``
#: excludes the lesions).
PROBSEG: tuple[str, ...] = ("CSF", "GM", "WM", "lesion")


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
    #: one row per lesion (:func:`smoulder.segmentation.lesions.lesion_table`), located with
    #: the two maps above
    lesion_rows: list[dict[str, Any]]
    used_t1: bool
    device: str
    model_version: str
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)
    #: the settings it ran with (recorded in the outputs' sidecars)
    settings: dict[str, float | bool] = field(default_factory=dict)
    #: every lesion candidate before the candidate classifier: its measures
    #: (:func:`smoulder.segmentation.candidates.candidate_features`), its probability of being
    #: a lesion (nan without a classifier), and whether it was kept
    candidates: dict[str, np.ndarray] = field(default_factory=dict)


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


def _check(img: nib.Nifti1Image, what: str) -> np.ndarray:
    """Return the voxels of ``img`` as float32 after checking the network can use them."""
    data = np.asarray(img.dataobj, np.float32)
    name = img.get_filename() or what
    if data.ndim != 3:
        raise InputError(name, expected=f"a 3D {what}", found=f"{data.ndim}D {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(name, expected=f"a {what} with finite values", found="NaN or Inf voxels")
    if float(data.max()) <= float(data.min()):
        raise InputError(name, expected=f"a {what} with signal", found="a constant image")
    return data


def _checked_images(
    flair: nib.Nifti1Image, t1: nib.Nifti1Image | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return ``(voxels, affine)`` of the FLAIR and, when given, of the T1-weighted image."""
    images = [(_check(flair, "FLAIR"), flair.affine)]
    if t1 is not None:
        images.append((_check(t1, "T1-weighted image"), t1.affine))
    return images


def network_channels(
    images: Sequence[tuple[np.ndarray, np.ndarray]], shape: Sequence[int], grid: np.ndarray
) -> np.ndarray:
    """Return the network's input ``(3, *shape)`` float32 on the ``shape``/``grid`` grid.

    Channels: the FLAIR and the T1-weighted image, each resampled (linear) and normalised
    (:func:`~smoulder.segmentation.synth.normalise`), then the T1-present flag; without a
    T1-weighted image its channel and the flag are 0.

    Args:
        images: ``(data, affine)`` of the FLAIR, then of the T1-weighted image when there is one.
        shape: the network grid's shape.
        grid: its voxel-to-world matrix.

    Examples:
        >>> flair = (np.ones((4, 4, 4), np.float32), np.eye(4))
        >>> x = network_channels([flair], (4, 4, 4), np.eye(4))
        >>> x.shape, float(x[0].max()), float(x[1:].max())
        ((3, 4, 4, 4), 1.0, 0.0)
    """
    channels = np.zeros((3, *shape), np.float32)
    for c, (data, affine) in enumerate(images):
        channels[c] = normalise(resample_to_grid(data, affine, shape, grid))
    if len(images) > 1:
        channels[T1_FLAG] = 1.0
    return channels


def run_network(bundle: Bundle, channels: np.ndarray, device: str) -> np.ndarray:
    """Return the network's class probabilities ``(C, *grid)`` (float32) for ``channels``.

    Sliding-window inference (the bundle's window, overlap and blending), then softmax.
    """
    import torch  # deferred: torch and MONAI take seconds to import
    from monai.inferers import sliding_window_inference

    settings = bundle.inference
    x = torch.from_numpy(channels)[None].to(device)
    shape = channels.shape[1:]
    roi = tuple(min(r, max(16, s)) for r, s in zip(settings.roi_size, shape, strict=True))
    with torch.inference_mode():
        logits = sliding_window_inference(
            x,
            roi,
            settings.sw_batch_size,
            bundle.network,
            overlap=settings.overlap,
            mode=settings.mode,
        )
        probs = torch.softmax(logits, 1)[0].float().cpu().numpy()
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # so that the timings measure the network, not the queue
    return probs


def _refined(
    probs: np.ndarray, channels: np.ndarray, used_t1: bool, spacing_mm: float, floor: float
) -> np.ndarray:
    """Return ``probs`` refined on the subject's own intensities inside its intracranial mask."""
    _, intracranial = brain_masks(probs, spacing_mm=spacing_mm)
    images = [channels[0]] + ([channels[1]] if used_t1 else [])
    return em_refine(images, probs, intracranial, lesion_prior_floor=floor)


def _on_image_grid(probs: np.ndarray, grid: np.ndarray, img: nib.Nifti1Image) -> np.ndarray:
    """Return class probabilities moved from the network ``grid`` onto ``img``'s grid.

    Beyond the network grid, and outside the largest connected piece of tissue (specks beyond
    the head), a voxel is background.
    """
    back = np.stack([resample_to_grid(p, grid, img.shape[:3], img.affine) for p in probs])
    outside = back.sum(0) < 1e-3
    back[0][outside] = 1.0
    back /= back.sum(0, keepdims=True)
    stray = ~largest_component(back.argmax(0) > 0)
    back[:, stray] = 0.0
    back[0, stray] = 1.0
    return back


@contextmanager
def _timed(timings: dict[str, float], key: str, since: float | None = None) -> Iterator[None]:
    """Record in ``timings[key]`` the seconds the block took (from ``since``, when given)."""
    tic = time.perf_counter() if since is None else since
    yield
    timings[key] = time.perf_counter() - tic


def _tissue(probs: np.ndarray, name: str) -> np.ndarray:
    """Return the probability of tissue ``name`` (a key of ``TISSUES``): its classes summed."""
    return sum(probs[i] for i in class_indices(name))  # type: ignore[return-value]


def _classes_and_lesions(
    probs: np.ndarray, affine: np.ndarray, min_lesion_ul: float, min_lesion_voxels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Return the class map (uint8) and the lesion instances of class probabilities.

    Lesion candidates enclosed by cortex or CSF are dropped first; the class map agrees with
    the reported lesions: a dropped candidate's voxels get their next most likely class.
    """
    dseg = probs.argmax(0).astype(np.uint8)
    lesion_prob = drop_outside_white_matter(probs[LESION], probs[CLASSES.index("WM")])
    instances = lesion_instances(
        lesion_prob, affine, min_volume_ul=min_lesion_ul, min_voxels=min_lesion_voxels
    )
    dropped = (dseg == LESION) & (instances == 0)
    if dropped.any():
        dseg[dropped] = probs[:LESION, dropped].argmax(0).astype(np.uint8)
    return dseg, instances


def _screened(
    probs: np.ndarray,
    dseg: np.ndarray,
    instances: np.ndarray,
    flair: nib.Nifti1Image,
    t1: nib.Nifti1Image | None,
    classifier: CandidateClassifier | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Return the class map and instances without the candidates ``classifier`` rejects.

    Also returns every candidate's measures, probability (nan without a classifier) and
    whether it was kept. A dropped candidate's voxels get their next most likely class.
    """
    flair_data = np.asarray(flair.dataobj, dtype=np.float32)
    t1_data = None
    if t1 is not None:
        t1_data = resample_to_grid(
            np.asarray(t1.dataobj, dtype=np.float32), t1.affine, flair.shape[:3], flair.affine
        )
    zooms = tuple(float(z) for z in flair.header.get_zooms()[:3])
    table = candidate_features(instances, probs, flair_data, t1_data, zooms)  # type: ignore[arg-type]
    probability = np.full(len(table), np.nan)
    kept = np.ones(len(table), dtype=bool)
    if classifier is not None and len(table):
        model = classifier.model(t1 is not None)
        probability = model.probability(table)
        kept = probability >= model.threshold
        screened = keep_candidates(instances, probability, model.threshold)
        dropped = (instances > 0) & (screened == 0)
        if dropped.any():
            dseg = dseg.copy()
            dseg[dropped] = probs[:LESION, dropped].argmax(0).astype(np.uint8)
        instances = screened
    return dseg, instances, {"features": table, "probability": probability, "kept": kept}


def _lesion_surroundings(
    instances: np.ndarray,
    parenchyma: np.ndarray,
    dseg: np.ndarray,
    affine: np.ndarray,
    device: str,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Return the infratentorial probability at lesion voxels and the ventricular CSF.

    Both come from the MNI priors fitted to this brain (see ``SegmentationResult``); without
    lesions the probability is 0 and no template is fitted.
    """
    below: np.ndarray | None = np.zeros(instances.shape, np.float32)
    ventricles = None
    if instances.any():
        to_template = template_transform(parenchyma, affine, device=device)
        below = None
        if to_template is not None:
            below = read_prior(infratentorial_prior(), to_template, affine, instances > 0)
            ventricles = ventricle_mask(dseg == CLASSES.index("CSF"), affine, to_template)
    return below, ventricles


def _result_images(
    probs: np.ndarray,
    parenchyma: np.ndarray,
    dseg: np.ndarray,
    instances: np.ndarray,
    affine: np.ndarray,
) -> dict[str, Any]:
    """Return the images of a :class:`SegmentationResult`, by field name, on the ``affine`` grid.

    The brain mask is the parenchyma at probability >= 0.5; each map of :data:`PROBSEG` sums
    its tissue's classes.
    """
    return {
        "dseg": _image(dseg, np.uint8, affine),
        "brain_mask": _image((parenchyma >= 0.5).astype(np.uint8), np.uint8, affine),
        "probseg": {name: _image(_tissue(probs, name), np.float32, affine) for name in PROBSEG},
        "instances": _image(instances, np.int16, affine),
    }


def _image(data: np.ndarray, dtype: type, affine: np.ndarray) -> nib.Nifti1Image:
    """Return ``data`` as ``dtype`` in an image with ``affine`` as its qform and sform."""
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    return img


def _lesion_rows(
    images: dict[str, Any], infratentorial: np.ndarray | None, ventricles: np.ndarray | None
) -> list[dict[str, Any]]:
    """Return the lesion table of a segmentation's ``images`` (:func:`_result_images`).

    Read from the images (not the arrays they were made from): the table describes the files.
    """
    instances = images["instances"]
    return lesion_table(
        np.asarray(instances.dataobj),
        instances.affine,
        np.asarray(images["probseg"]["lesion"].dataobj),
        np.asarray(images["dseg"].dataobj),
        infratentorial_mask=None if infratentorial is None else infratentorial >= 0.5,
        ventricle_mask=ventricles,
    )


def segment(
    flair: nib.Nifti1Image,
    t1: nib.Nifti1Image | None = None,
    *,
    device: str = "cpu",
    model: str | Path | None = None,
    bundle: Bundle | None = None,
    min_lesion_ul: float = 10.0,
    min_lesion_voxels: int = 3,
    refine: bool = True,
    lesion_prior_floor: float = LESION_PRIOR_FLOOR,
    screen_candidates: bool = True,
) -> SegmentationResult:
    """Return the segmentation of one session (see the module docstring).

    Args:
        flair: the FLAIR (any orientation and voxel size).
        t1: a T1-weighted image (T1w or UNIT1) aligned to the FLAIR in world space, or ``None``.
        device: ``cpu`` or ``cuda``.
        model: a bundle folder or shipped bundle name (default: the shipped model).
        bundle: an already loaded bundle (overrides ``model``).
        min_lesion_ul: lesions smaller than this (µl) are dropped from the instances.
        min_lesion_voxels: ... and lesions of fewer voxels than this (on the FLAIR grid).
        refine: clean the brain mask and fit the subject's own intensities with the network
            as prior (:mod:`smoulder.segmentation.refine`); off gives the raw network.
        lesion_prior_floor: least lesion prior in the refinement, as a share of the
            parenchyma probability (0: the network's lesion probability alone).
        screen_candidates: drop the lesion candidates the bundle's candidate classifier
            (:mod:`smoulder.segmentation.candidates`) calls no lesion; without a classifier
            in the bundle nothing is dropped.

    Raises:
        InputError: an image that is not 3D, has non-finite voxels or no signal; a bundle
            that is missing, corrupt or does not fit its network.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    with _timed(timings, "prepare_s", since=start):
        bundle = bundle or load_bundle(model, device)
        shape, grid = covering_grid(flair, bundle.inference.spacing_mm)
        channels = network_channels(_checked_images(flair, t1), shape, grid)
    with _timed(timings, "network_s"):
        probs = run_network(bundle, channels, device)
    if refine:
        with _timed(timings, "refine_s"):
            spacing_mm = bundle.inference.spacing_mm
            probs = _refined(probs, channels, t1 is not None, spacing_mm, lesion_prior_floor)
    with _timed(timings, "finish_s"):
        back = _on_image_grid(probs, grid, flair)
        parenchyma = _tissue(back, "brain")
        dseg, instances = _classes_and_lesions(back, flair.affine, min_lesion_ul, min_lesion_voxels)
    with _timed(timings, "candidates_s"):
        classifier = bundle.candidates if screen_candidates else None
        dseg, instances, candidates = _screened(back, dseg, instances, flair, t1, classifier)
    with _timed(timings, "locations_s"):
        below, ventricles = _lesion_surroundings(instances, parenchyma, dseg, flair.affine, device)
        out = _result_images(back, parenchyma, dseg, instances, flair.affine)
        rows = _lesion_rows(out, below, ventricles)
    return SegmentationResult(
        **out,
        infratentorial=below,
        ventricles=ventricles,
        lesion_rows=rows,
        used_t1=t1 is not None,
        device=device,
        model_version=bundle.version,
        wall_s=time.perf_counter() - start,
        timings=timings,
        settings={
            "refine": refine,
            "lesion_prior_floor": lesion_prior_floor if refine else 0.0,
            "min_lesion_ul": min_lesion_ul,
            "min_lesion_voxels": min_lesion_voxels,
            "screen_candidates": classifier is not None,
        },
        candidates=candidates,
    )
