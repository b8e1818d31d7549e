"""Subject-specific refinement of the network's class probabilities (on the network's grid).

The network has seen only synthetic contrasts. Each subject's own intensities say more about
where its grey/white boundary and its lesions are, so the network's softmax is used as a
spatial prior in a Gaussian mixture fitted to that subject's images, as SAMSEG and FAST do
with an atlas:

1. :func:`brain_masks` cleans the brain mask: parenchyma (GM + WM + lesion ≥ 0.5) is opened
   so that thin bridges to scalp that the network mistook for cortex break, the largest piece
   is kept and what the opening shaved off the brain is grown back; the intracranial mask adds
   the CSF next to it (ventricles, sulci). Everything outside becomes background.
2. :func:`em_refine` fits one Gaussian per class (full covariance over FLAIR and, when present,
   T1) inside the intracranial mask with EM, the posterior being the network's probability
   times the likelihood. A lesion must be FLAIR-hyperintense: voxels darker than the white
   matter's mean plus :data:`LESION_MIN_SD_ABOVE_WM` of its SDs, or than the cortical grey
   matter's mean plus :data:`LESION_MIN_SD_ABOVE_GM` of its SDs, cannot be lesion.
3. The network misses lesions it has not learnt to see (on real FLAIR, confluent
   periventricular lesions come out as grey matter), so the lesion prior is at least
   :data:`LESION_PRIOR_FLOOR` of the parenchyma's probability everywhere: the subject's own
   hyperintensity, not the network alone, decides. The grey-matter condition in 2. keeps the
   lesion class from taking over the cortex (FLAIR-bright too) when the floor is high; with a
   floor of 0.2 and no such condition, the lesion class swallowed 120–370 ml of cortex on
   two of four tuning cases.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from smoulder.segmentation.classes import CLASSES, LESION, class_indices

CSF, WM = CLASSES.index("CSF"), CLASSES.index("WM")
CORTICAL_GM = CLASSES.index("cortical_GM")
PARENCHYMA_IDX = class_indices("brain")
# rows of the mixture's arrays: the classes but background
_LESION_ROW, _WM_ROW, _GM_ROW = LESION - 1, WM - 1, CORTICAL_GM - 1
#: A lesion voxel's FLAIR is at least this many white-matter SDs above the white-matter mean
LESION_MIN_SD_ABOVE_WM = 1.0
#: ... and this many cortical grey-matter SDs above the cortical grey matter's mean.
LESION_MIN_SD_ABOVE_GM = 1.0
#: Least lesion prior, as a share of the network's parenchyma probability (GM + WM + lesion).
LESION_PRIOR_FLOOR = 0.1
#: Smallest prior a tissue class keeps anywhere inside the intracranial mask (lets the
#: subject's intensities overrule a confident but wrong network).
PRIOR_FLOOR = 0.02


def ball(radius_vox: float) -> np.ndarray:
    """Return a spherical structuring element of ``radius_vox`` voxels.

    Examples:
        >>> int(ball(1).sum()), ball(2).shape
        (7, (5, 5, 5))
    """
    r = int(np.floor(radius_vox))
    z, y, x = np.ogrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (x * x + y * y + z * z) <= radius_vox * radius_vox


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Return the largest 6-connected component of ``mask`` (all False when it is empty).

    Examples:
        >>> m = np.zeros((8, 8, 8), bool); m[1:4, 1:4, 1:4] = True; m[6, 6, 6] = True
        >>> int(largest_component(m).sum())
        27
    """
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def brain_masks(
    probs: np.ndarray, *, opening_mm: float = 3.0, spacing_mm: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(brain, intracranial)`` boolean masks from class probabilities ``(C, X, Y, Z)``.

    Args:
        probs: softmax over :data:`CLASSES` on an isotropic grid.
        opening_mm: radius of the opening that cuts brain from scalp.
        spacing_mm: the grid's voxel size.

    Examples:
        >>> p = np.zeros((6, 34, 30, 30), np.float32); p[0] = 1.0
        >>> p[:, 5:25, 5:25, 5:25] = 0.0; p[WM, 5:25, 5:25, 5:25] = 1.0  # a brain
        >>> p[:, 25:31, 14:16, 14:16] = 0.0; p[2, 25:31, 14:16, 14:16] = 1.0  # a bridge
        >>> p[:, 31, :, :] = 0.0; p[2, 31, :, :] = 1.0  # "scalp" the network called cortex
        >>> brain, icv = brain_masks(p)
        >>> int(brain[:25].sum()), bool(brain[31].any())
        (8000, False)
    """
    parenchyma = probs[list(PARENCHYMA_IDX)].sum(0) >= 0.5
    r = opening_mm / spacing_mm
    core = largest_component(ndi.binary_opening(parenchyma, ball(r)))
    # grow back what the opening shaved off, but no further than the opening's radius
    brain = ndi.binary_dilation(core, ball(1), iterations=int(np.ceil(r)) + 1, mask=parenchyma)
    brain = ndi.binary_fill_holes(brain)
    near = ndi.binary_dilation(brain, ball(2.0 / spacing_mm))
    intracranial = brain | (near & (probs[CSF] >= 0.5))
    intracranial = ndi.binary_fill_holes(intracranial)
    return brain, intracranial


def _gaussian_loglik(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Return log N(x | mean, cov) for ``x`` of shape (D, N).

    Examples:
        >>> x = np.array([[0.0, 1.0]], np.float32)  # one channel, two voxels
        >>> [round(float(v), 4) for v in _gaussian_loglik(x, np.zeros(1), np.eye(1))]
        [-0.9189, -1.4189]
    """
    d = x - mean.astype(x.dtype)[:, None]
    cov = cov + 1e-6 * np.eye(len(mean))
    inv = np.linalg.inv(cov)
    _, logdet = np.linalg.slogdet(cov)
    maha = ((inv.astype(x.dtype) @ d) * d).sum(0)
    return -0.5 * (maha + np.float32(logdet + len(mean) * np.log(2 * np.pi)))


def em_refine(
    channels: list[np.ndarray],
    probs: np.ndarray,
    mask: np.ndarray,
    *,
    iterations: int = 8,
    flair_index: int = 0,
    mrf_weight: float = 3.0,
    bias_sigma_vox: float = 15.0,
    tied: bool = True,
    prior_power: float = 0.25,
    lesion_prior_floor: float = LESION_PRIOR_FLOOR,
) -> np.ndarray:
    """Return class probabilities refined by a Gaussian mixture on the subject's intensities.

    Args:
        channels: the images (same grid as ``probs``), FLAIR first.
        probs: the network's softmax ``(C, X, Y, Z)`` over :data:`CLASSES`, used as the prior.
        mask: voxels to refine (intracranial); outside, the result is background.
        iterations: EM iterations.
        flair_index: which channel is the FLAIR (for the lesion hyperintensity constraint).
        mrf_weight: strength of the neighbourhood term (a voxel leans to the classes of its
            26 neighbours, mean-field): it removes the single-voxel speckle noise causes.
        bias_sigma_vox: smoothness (Gaussian SD, voxels) of the multiplicative bias field
            estimated per channel in every iteration (Wells-style, from the residual of the
            log intensity against its class mean; CSF and lesions do not vote); 0 turns it off.
        lesion_prior_floor: least lesion prior, as a share of the network's parenchyma
            probability (0: the network's lesion probability as it is).

    Returns:
        ``(C, X, Y, Z)`` float32 posteriors summing to 1.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> truth = np.zeros((20, 20, 20), int) + WM; truth[:10] = 2  # GM | WM
        >>> flair = np.where(truth == 2, 0.6, 0.5) + 0.02 * rng.standard_normal(truth.shape)
        >>> p = np.full((6, 20, 20, 20), 0.01); p[WM] = 0.95  # the network says WM everywhere
        >>> p[2, :12] = 0.5; p[WM, :12] = 0.45  # ... and is unsure near the boundary
        >>> post = em_refine([flair], p / p.sum(0), np.ones(truth.shape, bool))
        >>> float(((post.argmax(0) == 2) == (truth == 2)).mean()) > 0.95
        True
    """
    out = np.zeros_like(probs, dtype=np.float32)
    out[0] = 1.0
    if not mask.any():
        return out
    box = tuple(
        slice(max(0, b.start - 1), b.stop + 1) for b in ndi.find_objects(mask.astype(np.uint8))[0]
    )
    mask_box = mask[box]
    # (classes or channels, voxels): sums over classes add contiguous rows, not strided columns
    x = np.stack([c[box][mask_box] for c in channels]).astype(np.float32)  # (D, N)
    # rows: the classes but background (there is none inside the mask)
    prior = probs[(slice(1, None), *box)][:, mask_box].astype(np.float32)  # (C-1, N)
    post, floor_lesion = _initial_priors(prior, lesion_prior_floor, prior_power)
    log_x = np.log(np.maximum(x, 1e-3))
    params: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for it in range(iterations):
        if floor_lesion is not None and it == iterations // 2:
            # the lesion floor once the tissues and the bias field have settled: earlier, a
            # biased bright end of the cortex could pass for lesion
            prior[_LESION_ROW] = np.maximum(prior[_LESION_ROW], floor_lesion)
            prior /= prior.sum(0)
        if bias_sigma_vox > 0 and it > 0:
            x = np.exp(log_x - _log_bias(log_x, post, params, mask_box, bias_sigma_vox))
        params = _class_gaussians(x, post, tied)
        loglik = _log_likelihoods(x, params, post, flair_index)
        post = _posterior(prior, loglik, list(params), mrf_weight, mask_box)
    view = out[(slice(None), *box)]
    view[0, mask_box] = 0.0
    view[1:, mask_box] = post
    return out


def _initial_priors(
    prior: np.ndarray, lesion_prior_floor: float, prior_power: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the first posterior and the lesion floor; make ``prior`` (rows: classes but
    background) the prior of the mixture, in place.

    Every tissue keeps at least :data:`PRIOR_FLOOR`; the tissue priors are flattened by
    ``prior_power`` (the subject's intensities count for more), the lesion prior is kept as it
    is. The floor is ``lesion_prior_floor`` times the parenchyma probability (``None`` at 0).
    """
    tissue = [k for k in range(prior.shape[0]) if k != _LESION_ROW]
    parenchyma = prior[[k - 1 for k in PARENCHYMA_IDX]].sum(0)
    floor_lesion = lesion_prior_floor * parenchyma if lesion_prior_floor > 0 else None
    prior[tissue] = np.maximum(prior[tissue], PRIOR_FLOOR)
    prior /= prior.sum(0)
    post = prior.copy()
    if prior_power != 1.0:
        share = prior[tissue].sum(0)  # the lesion prior is kept as it is
        flat = prior[tissue] ** prior_power
        prior[tissue] = flat / flat.sum(0) * share
    return post, floor_lesion


def _class_gaussians(
    x: np.ndarray, post: np.ndarray, tied: bool
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Return ``{row: (mean, covariance)}`` of each class with enough weight in ``post``.

    With ``tied`` the tissues share one covariance (their weighted mean), so the boundaries lie
    at the midpoints of the means; the lesion keeps its own.
    """
    params: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    # sums over a million voxels in float64: in float32 the means were off by up to 2e-3
    # of their value, enough to move the lesion threshold across thousands of voxels
    x64 = x.astype(np.float64)
    for k in range(post.shape[0]):
        w = post[k].astype(np.float64)
        total = float(w.sum())
        if total < 20:  # too few voxels to fit: the class keeps its prior, no likelihood
            continue
        mean = (x64 @ w) / total
        d = x64 - mean[:, None]
        params[k] = (mean, (d * w) @ d.T / total)
    fits = [k for k in params if k != _LESION_ROW]
    if tied and fits:
        weights = np.array([float(post[k].sum()) for k in fits])
        pooled = np.einsum("k,kde->de", weights, np.stack([params[k][1] for k in fits]))
        pooled /= weights.sum()
        for k in fits:
            params[k] = (params[k][0], pooled)
    return params


def _log_likelihoods(
    x: np.ndarray,
    params: dict[int, tuple[np.ndarray, np.ndarray]],
    post: np.ndarray,
    flair_index: int,
) -> np.ndarray:
    """Return the log likelihood of each class (``post``'s layout; 0 for an unfitted class).

    A voxel darker on FLAIR than :func:`_lesion_min_flair` cannot be lesion.
    """
    loglik = np.zeros_like(post)  # an unfitted class: flat likelihood
    for k, (mean, cov) in params.items():
        loglik[k] = _gaussian_loglik(x, mean, cov)
    if _LESION_ROW in params and _WM_ROW in params:
        loglik[_LESION_ROW, x[flair_index] < _lesion_min_flair(params, flair_index)] = -np.inf
    return loglik


def _lesion_min_flair(params: dict[int, tuple[np.ndarray, np.ndarray]], flair_index: int) -> float:
    """Return the least FLAIR of a lesion: :data:`LESION_MIN_SD_ABOVE_WM` white-matter SDs
    above its mean and :data:`LESION_MIN_SD_ABOVE_GM` cortical SDs above the cortex's mean."""
    wm_mean, wm_cov = params[_WM_ROW]
    floor = wm_mean[flair_index] + LESION_MIN_SD_ABOVE_WM * np.sqrt(
        wm_cov[flair_index, flair_index]
    )
    if _GM_ROW in params:
        gm_mean, gm_cov = params[_GM_ROW]
        floor = max(
            floor,
            gm_mean[flair_index]
            + LESION_MIN_SD_ABOVE_GM * np.sqrt(gm_cov[flair_index, flair_index]),
        )
    return floor


def _posterior(
    prior: np.ndarray,
    loglik: np.ndarray,
    fitted: list[int],
    mrf_weight: float,
    mask: np.ndarray,
) -> np.ndarray:
    """Return the class posteriors (prior times likelihood, normalised), then leaned towards
    the classes of each voxel's neighbours by ``mrf_weight`` (mean field) when it is > 0."""
    if fitted:
        loglik -= loglik[fitted].max(0)
    post = prior * np.exp(loglik)
    post /= np.maximum(post.sum(0), 1e-30)
    if mrf_weight > 0:
        post *= np.exp(mrf_weight * _neighbour_mean(post, mask))
        post /= np.maximum(post.sum(0), 1e-30)
    return post


def smooth_coarse(vol: np.ndarray, sigma_vox: float, factor: int = 4) -> np.ndarray:
    """Return ``vol`` Gaussian-smoothed with SD ``sigma_vox``, computed on a grid ``factor``
    times coarser (block means, then linear interpolation back): for smooth fields only.

    Examples:
        >>> v = np.ones((30, 21, 17), np.float32)
        >>> s = smooth_coarse(v, 8.0)
        >>> s.shape, bool(np.allclose(s, 1.0, atol=1e-4))
        ((30, 21, 17), True)
    """
    pad = [(0, (-n) % factor) for n in vol.shape]
    padded = np.pad(vol, pad, mode="edge")
    coarse_shape = [n // factor for n in padded.shape]
    blocks = padded.reshape(
        coarse_shape[0], factor, coarse_shape[1], factor, coarse_shape[2], factor
    ).mean((1, 3, 5))
    coarse = ndi.gaussian_filter(blocks, sigma_vox / factor, mode="nearest")
    out = coarse
    for axis, n in enumerate(vol.shape):  # separable linear interpolation back to the fine grid
        out = np.moveaxis(
            np.tensordot(_interp_matrix(n, coarse.shape[axis], factor), out, (1, axis)), 0, axis
        )
    return out.astype(vol.dtype)


def _interp_matrix(n_fine: int, n_coarse: int, factor: int) -> np.ndarray:
    """Return the (n_fine, n_coarse) matrix of linear interpolation from block centres."""
    pos = np.clip((np.arange(n_fine) + 0.5) / factor - 0.5, 0, n_coarse - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_coarse - 1)
    frac = pos - lo
    m = np.zeros((n_fine, n_coarse), np.float32)
    m[np.arange(n_fine), lo] += 1 - frac
    m[np.arange(n_fine), hi] += frac
    return m


def _log_bias(
    log_x: np.ndarray,
    post: np.ndarray,
    params: dict[int, tuple[np.ndarray, np.ndarray]],
    mask: np.ndarray,
    sigma_vox: float,
) -> np.ndarray:
    """Return the smooth log bias field per masked voxel and channel (``log_x``'s shape)."""
    voters = [k for k in params if k not in (CSF - 1, LESION - 1)]
    if not voters:
        return np.zeros_like(log_x)
    weight = post[voters].sum(0)
    out = np.empty_like(log_x)
    w_vol = np.zeros(mask.shape, np.float32)
    w_vol[mask] = weight
    w_smooth = smooth_coarse(w_vol, sigma_vox)[mask]
    r_vol = np.zeros(mask.shape, np.float32)
    for c in range(log_x.shape[0]):
        expected = sum(post[k] * np.log(max(float(params[k][0][c]), 1e-3)) for k in voters)
        r_vol[mask] = weight * log_x[c] - expected
        out[c] = smooth_coarse(r_vol, sigma_vox)[mask] / np.maximum(w_smooth, 1e-6)
    return out - out.mean(1, keepdims=True)


def _neighbour_mean(post: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Return, per class and masked voxel (``post``'s (C, N) layout), the mean posterior of
    the voxel's 3×3×3 neighbourhood."""
    vol = np.zeros(mask.shape, np.float32)
    out = np.empty_like(post)
    for k in range(post.shape[0]):
        vol[mask] = post[k]
        out[k] = ndi.uniform_filter(vol, 3)[mask]
    return out
