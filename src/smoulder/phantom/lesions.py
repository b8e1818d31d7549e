"""Phantom lesions: shapes as signed-distance patches, placement, rims, veins and evolution.

A lesion is a signed-distance function (SDF, millimetres, negative inside) sampled on a small
patch in template space. Its extent at time ``t`` is ``sdf <= g(t)``: growing ``g`` dilates the
lesion by the same distance everywhere, which is what "concentric expansion" of a slowly
expanding lesion means, and the true rate is then exact in millimetres per year.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from smoulder.phantom.anatomy import Anatomy

LOCATIONS: tuple[str, ...] = ("periventricular", "juxtacortical", "deep", "infratentorial")
MIMICS: tuple[str, ...] = ("none", "vein_adjacent", "central_vein", "iso_rim")


@dataclass
class Patch:
    """A scalar field on a small axis-aligned grid in template world coordinates."""

    data: np.ndarray
    origin_mm: np.ndarray
    spacing_mm: float

    def sample(self, points_mm: np.ndarray, cval: float) -> np.ndarray:
        """Return the field at world points ``(3, N)`` (linear interpolation, ``cval`` outside)."""
        vox = (points_mm - self.origin_mm[:, None]) / self.spacing_mm
        return ndimage.map_coordinates(self.data, vox, order=1, mode="constant", cval=cval)

    @property
    def bounds_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the lowest and highest world corner of the patch."""
        return self.origin_mm, self.origin_mm + (np.array(self.data.shape) - 1) * self.spacing_mm


@dataclass
class Vein:
    """A straight vessel segment of radius ``radius_mm`` between two template-space points."""

    start_mm: np.ndarray
    end_mm: np.ndarray
    radius_mm: float

    def fraction(self, points_mm: np.ndarray, voxel_mm: float) -> np.ndarray:
        """Return the partial-volume fraction of the vein at points ``(3, N)``."""
        axis = self.end_mm - self.start_mm
        length = float(np.linalg.norm(axis))
        axis = axis / length
        rel = points_mm - self.start_mm[:, None]
        along = np.clip(axis @ rel, 0.0, length)
        dist = np.linalg.norm(rel - axis[:, None] * along, axis=0)
        return np.clip(0.5 - (dist - self.radius_mm) / voxel_mm, 0.0, 1.0)


@dataclass
class Lesion:
    """One lesion instance with its truth.

    Attributes:
        lesion_id: index in the instance maps (1-based).
        location: one of :data:`LOCATIONS`.
        sdf: signed distance (mm) patch of the baseline shape.
        center_mm: template-space centre.
        kind: ``stable``, ``sel`` (slowly expanding), ``shrinking`` or ``new``.
        radial_rate_mm_per_year: signed speed of the boundary (0 for stable and new).
        first_session: index of the first session where the lesion exists.
        rim: ``yes`` (complete paramagnetic rim), ``partial`` or ``no``.
        rim_coverage: fraction of the lesion edge (solid angle) carrying the rim.
        rim_width_mm: thickness of the rim shell, inside the lesion edge.
        rim_axis: unit vector around which a partial rim's cap is centred.
        rim_chi_ppm: susceptibility of the rim (0 for no rim and for iso-rims).
        mimic: one of :data:`MIMICS`.
        vein: the vessel of a vein mimic or central vein, if any.
        shape_source: ``synthetic``, ``confluent`` or the real mask it came from.
    """

    lesion_id: int
    location: str
    sdf: Patch
    center_mm: np.ndarray
    kind: str = "stable"
    radial_rate_mm_per_year: float = 0.0
    first_session: int = 0
    rim: str = "no"
    rim_coverage: float = 0.0
    rim_width_mm: float = 0.0
    rim_axis: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    rim_chi_ppm: float = 0.0
    mimic: str = "none"
    vein: Vein | None = None
    shape_source: str = "synthetic"
    radius_mm: float = 0.0

    def growth_mm(self, years_since_first: float) -> float:
        """Return the boundary offset ``g(t)`` (mm) at ``years_since_first`` after appearing."""
        g = self.radial_rate_mm_per_year * max(years_since_first, 0.0)
        return max(g, -0.5 * self.radius_mm)

    def fractions(
        self, points_mm: np.ndarray, years_since_first: float, voxel_mm: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(lesion, rim)`` partial-volume fractions at template points ``(3, N)``.

        The rim is a shell of ``rim_width_mm`` just inside the lesion edge, limited to a cap of
        the sphere of directions for partial rims; an iso-rim mimic has the same shell.
        """
        g = self.growth_mm(years_since_first)
        sdf = self.sdf.sample(points_mm, cval=1e3)
        lesion = np.clip(0.5 - (sdf - g) / voxel_mm, 0.0, 1.0)
        if self.rim_width_mm <= 0:
            return lesion, np.zeros_like(lesion)
        inner = np.clip(0.5 - (sdf - g + self.rim_width_mm) / voxel_mm, 0.0, 1.0)
        rim = lesion - inner
        if self.rim_coverage < 1.0:
            rel = points_mm - self.center_mm[:, None]
            cos = (self.rim_axis @ rel) / np.maximum(np.linalg.norm(rel, axis=0), 1e-6)
            cos_edge = 1.0 - 2.0 * self.rim_coverage
            rim = rim * np.clip((cos - cos_edge) / 0.15 + 0.5, 0.0, 1.0)
        return lesion, rim

    def bounds_mm(self, max_growth_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """Return template-space bounds that contain the lesion, its growth and its vein."""
        lo, hi = self.sdf.bounds_mm
        lo, hi = lo - max_growth_mm, hi + max_growth_mm
        if self.vein is not None:
            pts = np.stack([self.vein.start_mm, self.vein.end_mm])
            lo = np.minimum(lo, pts.min(0) - 2 * self.vein.radius_mm - 1)
            hi = np.maximum(hi, pts.max(0) + 2 * self.vein.radius_mm + 1)
        return lo, hi

    def truth_record(self) -> dict[str, object]:
        """Return the JSON-friendly truth of this lesion (no arrays)."""
        rec = asdict(self)
        rec.pop("sdf")
        rec["center_mm"] = [round(float(c), 2) for c in self.center_mm]
        rec["rim_axis"] = [round(float(c), 4) for c in self.rim_axis]
        rec["vein"] = (
            None
            if self.vein is None
            else {
                "start_mm": self.vein.start_mm.round(2).tolist(),
                "end_mm": self.vein.end_mm.round(2).tolist(),
                "radius_mm": self.vein.radius_mm,
            }
        )
        return rec


def sdf_from_mask(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Return the signed distance (mm; negative inside, zero half a voxel out) of a binary mask.

    Examples:
        >>> m = np.zeros((9, 9, 9), bool); m[3:6, 3:6, 3:6] = True
        >>> float(sdf_from_mask(m, 1.0)[4, 4, 4]), float(sdf_from_mask(m, 1.0)[4, 4, 0])
        (-1.5, 2.5)
    """
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    return (np.where(mask, -inside, outside) + np.where(mask, 0.5, -0.5) * spacing_mm).astype(
        np.float32
    )


def blob_sdf(
    rng: np.random.Generator,
    volume_ml: float,
    *,
    lobes: int = 1,
    spacing_mm: float = 0.5,
    margin_mm: float = 4.0,
) -> Patch:
    """Return an SDF patch (centred at the origin) of a random ovoid lesion of ``volume_ml``.

    An ellipsoid with random axes and orientation, with its surface perturbed by smooth noise;
    ``lobes > 1`` joins several such blobs into one confluent lesion.
    """
    radius = (3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    spacing_mm = (
        min(spacing_mm, max(radius / 4, 0.25)) if radius < 2 else max(spacing_mm, radius / 16)
    )
    half = radius * (1.8 if lobes > 1 else 1.5) + margin_mm
    n = int(np.ceil(2 * half / spacing_mm)) + 1
    ax = (np.arange(n) - (n - 1) / 2) * spacing_mm
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))
    inside = np.zeros((n, n, n), bool)
    lobe_r = radius / lobes ** (1 / 3)
    for i in range(lobes):
        offset = np.zeros(3) if i == 0 else rng.normal(size=3) * lobe_r * 0.8
        axes = lobe_r * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)])
        axes *= (lobe_r**3 / np.prod(axes)) ** (1 / 3)
        rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        rel = np.tensordot(rot.T, grid - offset[:, None, None, None], axes=1)
        q = np.sqrt(sum((rel[k] / axes[k]) ** 2 for k in range(3)))
        noise = ndimage.gaussian_filter(
            rng.standard_normal((n, n, n)), max(lobe_r / spacing_mm / 2, 1)
        )
        noise /= noise.std() + 1e-9
        inside |= q <= 1.0 + 0.12 * noise
    inside = ndimage.binary_fill_holes(inside)
    # keep the largest piece so a lesion is one connected instance
    lab, num = ndimage.label(inside)
    if num > 1:
        sizes = ndimage.sum(inside, lab, range(1, num + 1))
        inside = lab == (1 + int(np.argmax(sizes)))
    sdf = sdf_from_mask(inside, spacing_mm)
    return Patch(sdf, np.full(3, ax[0]), spacing_mm)


def real_shapes(
    directory: str | Path, *, min_voxels: int = 10
) -> list[tuple[np.ndarray, float, str]]:
    """Return the lesion components of every mask in ``directory``: ``(mask, voxel_mm, name)``."""
    shapes = []
    for path in sorted(Path(directory).glob("*.nii*")):
        img = nib.load(str(path))
        data = np.asarray(img.dataobj) > 0
        voxel = float(np.cbrt(abs(np.linalg.det(img.affine[:3, :3]))))
        lab, num = ndimage.label(data)
        for i, sl in enumerate(ndimage.find_objects(lab), start=1):
            comp = lab[sl] == i
            if comp.sum() >= min_voxels:
                shapes.append((np.pad(comp, 2), voxel, f"{path.name}#{i}"))
    return shapes


def real_sdf(
    mask: np.ndarray, voxel_mm: float, *, spacing_mm: float = 0.5, margin_mm: float = 4.0
) -> Patch:
    """Return an SDF patch (centred on its centroid) of a real lesion mask, smoothed, resampled."""
    zoom = voxel_mm / spacing_mm
    pad = int(np.ceil(margin_mm / voxel_mm))
    fine = ndimage.zoom(np.pad(mask.astype(np.float32), pad), zoom, order=1) > 0.5
    sdf = sdf_from_mask(fine, spacing_mm)
    centroid = np.array(ndimage.center_of_mass(fine)) * spacing_mm
    return Patch(sdf, -centroid, spacing_mm)


def location_candidates(anatomy: Anatomy) -> dict[str, np.ndarray]:
    """Return template-space candidate centres (``(N, 3)`` mm) for each lesion location."""
    sp = anatomy.spacing_mm[0]
    csf, gm, wm = anatomy.channel("csf"), anatomy.channel("gm"), anatomy.channel("wm")
    intracranial = ndimage.binary_fill_holes((anatomy.fractions[:4].sum(0)) > 0.5)
    depth = ndimage.distance_transform_edt(intracranial, sampling=sp)
    ventricles = (csf > 0.7) & (depth > 18.0)
    d_vent = ndimage.distance_transform_edt(~ventricles, sampling=sp)
    d_gm = ndimage.distance_transform_edt(~(gm > 0.5), sampling=sp)
    xx, yy, zz = np.meshgrid(
        *(
            anatomy.affine[i, i] * np.arange(n) + anatomy.affine[i, 3]
            for i, n in enumerate(anatomy.shape)
        ),
        indexing="ij",
        sparse=True,
    )
    supra = zz > -10.0
    # below the tentorium (MNI mm): the cerebellum behind and under the temporal lobes, and the
    # brainstem on the midline; the temporal lobes' white matter reaches z = -40 further forward
    posterior_fossa = (zz < -22.0) & (
        ((yy < -45.0) & (zz < -25.0)) | ((np.abs(xx) < 12.0) & (yy < -10.0))
    )
    masks = {
        "periventricular": (wm > 0.8) & (d_vent <= 4.0) & supra,
        "juxtacortical": (wm > 0.5) & (d_gm <= 1.5 * sp) & (depth > 6.0) & supra,
        "deep": (wm > 0.9) & (d_vent > 10.0) & (d_gm > 6.0) & supra,
        "infratentorial": (wm > 0.7) & posterior_fossa & (depth > 4.0),
    }
    out = {}
    for name, m in masks.items():
        idx = np.argwhere(m)
        out[name] = (anatomy.affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    return out
