"""Subject-specific refinement: the Gaussian mixture with the network as prior, bias, masks."""

from __future__ import annotations

import numpy as np
import pytest

from smoulder.segmentation.classes import CLASSES, LESION
from smoulder.segmentation.refine import (
    CSF,
    WM,
    brain_masks,
    em_refine,
    smooth_coarse,
)

GM = CLASSES.index("cortical_GM")


def _two_tissues(shape=(32, 32, 32), seed=0, gm=0.6, wm=0.5, noise=0.02):
    """GM in the first half along x, WM in the second; the prior puts the boundary 4 voxels
    too early and is unsure everywhere."""
    rng = np.random.default_rng(seed)
    truth = np.full(shape, WM)
    truth[: shape[0] // 2] = GM
    image = np.where(truth == GM, gm, wm) + noise * rng.standard_normal(shape)
    prior = np.full((len(CLASSES), *shape), 0.01)
    prior[GM], prior[WM] = 0.4, 0.55
    prior[GM, : shape[0] // 2 - 4], prior[WM, : shape[0] // 2 - 4] = 0.55, 0.4
    return truth, image.astype(np.float32), prior / prior.sum(0)


def test_intensities_overrule_an_unsure_prior() -> None:
    truth, image, prior = _two_tissues()
    post = em_refine([image], prior, np.ones(truth.shape, bool), bias_sigma_vox=0)
    assert (post.argmax(0) == truth).mean() > 0.97
    np.testing.assert_allclose(post.sum(0), 1.0, atol=1e-5)


def test_bias_field_is_removed() -> None:
    """A ±10 % linear bias along z mixes GM and WM (0.6 / 0.5) unless it is estimated."""
    truth, image, prior = _two_tissues(noise=0.01)
    bias = np.linspace(0.9, 1.1, truth.shape[2], dtype=np.float32)[None, None, :]
    biased = image * bias
    mask = np.ones(truth.shape, bool)
    plain = (em_refine([biased], prior, mask, bias_sigma_vox=0).argmax(0) == truth).mean()
    fixed = (em_refine([biased], prior, mask, bias_sigma_vox=10).argmax(0) == truth).mean()
    assert fixed > 0.9 and fixed > plain + 0.1, (plain, fixed)  # 0.78 -> 0.93 measured


def test_lesions_must_be_brighter_than_white_matter() -> None:
    """The prior says lesion in two blobs; only the FLAIR-bright one stays lesion."""
    truth, image, prior = _two_tissues()
    image[20:24, 4:8, 4:8] = 0.9  # bright: a lesion
    image[20:24, 20:24, 20:24] = 0.3  # dark: not a lesion whatever the prior says
    for box in ((slice(20, 24), slice(4, 8), slice(4, 8)), (slice(20, 24),) * 3):
        prior[(slice(None), *box)] = 0.01
        prior[(LESION, *box)] = 0.95
    post = em_refine([image], prior / prior.sum(0), np.ones(truth.shape, bool)).argmax(0)
    assert (post[20:24, 4:8, 4:8] == LESION).all()
    assert not (post[20:24, 20:24, 20:24] == LESION).any()


def test_a_lesion_the_network_missed_is_found_and_cortex_is_not_taken() -> None:
    """A FLAIR-bright blob in white matter that the network called grey matter (as it does with
    confluent periventricular lesions on real FLAIR): the lesion prior floor lets the subject's
    intensities make it lesion, while the cortex (FLAIR-brighter than WM too) stays grey."""
    truth, image, prior = _two_tissues()
    blob = (slice(20, 25), slice(10, 15), slice(10, 15))
    image[blob] = 0.7  # 5 SDs above the cortex, 10 above white matter
    prior[(slice(None), *blob)] = 0.01
    prior[(GM, *blob)] = 0.9
    prior /= prior.sum(0)
    prior[(LESION, *blob)] = 1e-6  # the network is sure there is no lesion
    mask = np.ones(truth.shape, bool)
    found = em_refine([image], prior, mask).argmax(0)
    assert (found[blob] == LESION).mean() > 0.95
    assert (found[truth == GM] == LESION).mean() < 0.01
    missed = em_refine([image], prior, mask, lesion_prior_floor=0.0).argmax(0)
    assert not (missed[blob] == LESION).any()


def test_outside_the_mask_is_background() -> None:
    truth, image, prior = _two_tissues()
    mask = np.zeros(truth.shape, bool)
    mask[4:28, 4:28, 4:28] = True
    post = em_refine([image], prior, mask)
    assert (post[0][~mask] == 1.0).all() and (post[0][mask] == 0.0).all()
    assert (em_refine([image], prior, np.zeros_like(mask))[0] == 1.0).all()


def test_brain_mask_cuts_scalp_and_keeps_ventricles() -> None:
    p = np.zeros((len(CLASSES), 40, 40, 40), np.float32)
    p[0] = 1.0
    brain = np.zeros((40, 40, 40), bool)
    brain[8:32, 8:32, 8:32] = True
    p[:, brain] = 0.0
    p[WM, brain] = 1.0
    p[:, 18:22, 18:22, 18:22] = 0.0
    p[CSF, 18:22, 18:22, 18:22] = 1.0  # a ventricle
    p[:, 38, :, :] = 0.0
    p[GM, 38, :, :] = 1.0  # scalp called cortex
    p[:, 32:38, 20:22, 20:22] = 0.0
    p[GM, 32:38, 20:22, 20:22] = 1.0  # touching the brain through a thin bridge
    got, intracranial = brain_masks(p)
    assert not got[38].any()
    assert got[8:32, 8:32, 8:32].all()  # enclosed CSF is inside (holes filled)
    assert intracranial[18:22, 18:22, 18:22].all()


@pytest.mark.parametrize("shape", [(16, 16, 16), (33, 17, 9)])
def test_coarse_smoothing_keeps_shape_and_linear_trends(shape) -> None:
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, shape[0], dtype=np.float32)[:, None, None], shape)
    out = smooth_coarse(np.ascontiguousarray(ramp), 2.0)
    assert out.shape == shape
    inner = slice(4, shape[0] - 4)
    assert np.abs(out[inner] - ramp[inner]).max() < 0.05
