"""The masks of a session's QSM: where χ is reconstructed, and the CSF that references it.

Both are on the GRE's own grid. The session's segmentation is on the FLAIR grid, so its brain
mask and CSF probability are resampled through the co-registration of the GRE onto the FLAIR,
which maps FLAIR points to GRE points (the registration convention of
:mod:`smoulder.registration`): resampling FLAIR-grid images onto the GRE grid takes its inverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import nibabel as nib

    from smoulder.registration.transforms import AffineTransform

#: CSF probability from which a voxel counts as sure CSF, the χ reference.
SURE_CSF_PROBABILITY = 0.9


def session_masks(
    magnitude: np.ndarray,
    gre: nib.Nifti1Image,
    brain_mask: nib.Nifti1Image,
    flair_to_gre: AffineTransform,
    *,
    csf_probseg: nib.Nifti1Image | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the QSM mask and the CSF reference mask (``None`` without ``csf_probseg``).

    The QSM mask is the session's brain mask mapped into GRE space (nearest neighbour) with
    its holes filled — the brain mask is parenchyma, and QSM needs the ventricles (enclosed
    CSF) back in — and cut to the head mask of the magnitude
    (:func:`smoulder.qsm.reconstruct.magnitude_mask`). The reference is the CSF probability
    mapped into GRE space (linear) at or above :data:`SURE_CSF_PROBABILITY`: ventricular CSF,
    sure CSF inside the brain.

    Args:
        magnitude: the echoes' magnitudes on the GRE grid, ``(echoes, x, y, z)`` or ``(x, y, z)``.
        gre: an image on the GRE grid (the echo-1 magnitude), whose shape and affine the masks
            take.
        brain_mask: the session's brain (parenchyma) mask on the FLAIR grid.
        flair_to_gre: the GRE's co-registration onto the FLAIR: maps FLAIR points to GRE points.
        csf_probseg: the session's CSF probability on the FLAIR grid; ``None``: no reference mask
            (χ is referenced to the whole mask).

    Returns:
        ``(mask, reference)``: boolean arrays of the GRE grid's shape; ``reference`` is ``None``
        when ``csf_probseg`` is.
    """
    from scipy import ndimage as ndi

    from smoulder.qsm.reconstruct import magnitude_mask
    from smoulder.registration.transforms import resample

    gre_to_flair = flair_to_gre.inverse()
    brain = resample(brain_mask, gre, gre_to_flair, interpolation="nearest")
    inside = ndi.binary_fill_holes(np.asarray(brain.dataobj) > 0)
    mask = inside & magnitude_mask(magnitude)
    if csf_probseg is None:
        return mask, None
    csf = resample(csf_probseg, gre, gre_to_flair)
    return mask, np.asarray(csf.dataobj) >= SURE_CSF_PROBABILITY
