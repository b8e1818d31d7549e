"""Upper cervical spinal cord cross-sectional area (CSA) on brain MRI.

Method, in the order :func:`~smoulder.cord.measure.measure_cord` runs it:

1. **Slices.** The image is read as a stack of axial slices: those of the voxel axis closest
   to the head–foot (world z) direction of its affine. Distances are in world mm.
2. **Centreline** (:mod:`smoulder.cord.centreline`). Each slice is filtered by a cord-in-CSF
   detector (a cord-sized square of one contrast against CSF squares on either side, bright
   cord in dark CSF on T1-like images, the reverse on T2); its lowest value over 15 mm along
   the slices marks tubes. Up to 20 tubes (below and near a given start point, if any) are
   tracked slice by slice, up and down, to the best response within 1.5 mm of the line
   through the last 10 mm of track (at most 45° from the slice normal); with a brain mask,
   nothing at or above the brain's lower end is searched or followed. The track on which a
   cord blob is found most often is kept. Each tracked centre is refined to
   the centroid of the cord found there, and x(z), y(z) are smoothed by a robust polynomial
   whose derivative gives the unit tangent.
3. **Partial-volume cord fraction** (:mod:`smoulder.cord.fraction`). On each slice the cord
   intensity (median of the cord's inner part) and the CSF intensity (median of the CSF side of
   a ring around the cord) are estimated, smoothed along the cord, and each voxel's fraction is
   ``(I − I_csf) / (I_cord − I_csf)`` clipped to [0, 1], kept only inside the cord (the
   component of fraction ≥ 0.5 that holds the centre, interior set to 1) and its one-voxel
   partial-volume edge. The binary cord mask is fraction ≥ 0.5.
4. **Angle-corrected CSA.** Slice CSA = Σ fraction × in-plane voxel area × cos(angle between
   the centreline tangent and the slice normal): exact for a tilted cylinder.
5. **Reference level.** The anchor is a given world point or the lower end of the brain
   parenchyma along the centreline (the foramen magnum); the CSA is the mean slice CSA over the
   slab 15–30 mm below it, measured along the centreline. A field of view that stops short of
   the slab is reported as not measurable, with the distances.
"""

from smoulder.cord.centreline import Centreline, Contrast, find_centreline
from smoulder.cord.fraction import cord_fraction, slice_csa_mm2
from smoulder.cord.measure import CordMeasure, measure_cord, save_cord_outputs

__all__ = [
    "Centreline",
    "Contrast",
    "CordMeasure",
    "cord_fraction",
    "find_centreline",
    "measure_cord",
    "save_cord_outputs",
    "slice_csa_mm2",
]
