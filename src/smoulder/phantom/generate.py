"""Synthetic subjects and sessions with exact truth: anatomy → deformation → lesions → physics.

For every session the truth is built on one grid in scanner space (the session's T1w grid) by
pulling each voxel back through the chain

    scanner ──rigid⁻¹──► subject at time t ──atrophy pull-back──► subject at baseline
            ──subject diffeomorphism──► template,

and sampling the template's tissue fractions there once (a single interpolation). Lesions,
rims and veins are evaluated analytically at the template point, the spinal cord at the subject
point (so its cross-sectional area is exact), and the images are made from the fractions with
the signal equations of :mod:`smoulder.phantom.physics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from smoulder.phantom import physics
from smoulder.phantom.anatomy import Anatomy
from smoulder.phantom.lesions import (
    LOCATIONS,
    Lesion,
    Patch,
    Vein,
    blob_sdf,
    location_candidates,
    real_sdf,
)
from smoulder.registration.fields import (
    exponentiate,
    gradient_of_poisson,
    sample_field,
    smooth_random_velocity,
)

#: Channels of a session's truth fractions. Air is what they leave.
SESSION_CLASSES: tuple[str, ...] = (
    "csf",
    "gm",
    "deep_gm",
    "wm",
    "soft_tissue",
    "bone",
    "lesion",
    "rim",
    "vein",
    "cord",
)
#: Tissue parameters used for each channel (the cord is white-matter-like).
CHANNEL_TISSUE: dict[str, str] = {
    "csf": "csf",
    "gm": "gm",
    "deep_gm": "deep_gm",
    "wm": "wm",
    "soft_tissue": "soft_tissue",
    "bone": "bone",
    "lesion": "lesion",
    "rim": "rim",
    "vein": "vein",
    "cord": "wm",
}


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that defines a phantom dataset; a seed makes it reproducible."""

    subjects: int = 1
    sessions: int = 2
    interval_years: float = 1.0
    seed: int = 0
    resolution_mm: float = 1.0
    flair_slice_mm: float | None = None
    gre_voxel_mm: float | None = None
    #: the GRE as an oblique slab: its grid turned by this angle (degrees) about the left-right
    #: axis (B0 stays along the scanner's z), as a slab tilted along the AC-PC line is
    gre_tilt_deg: float = 0.0
    #: the GRE slab's thickness (mm) across its slices, centred on the field of view; None:
    #: the whole field of view
    gre_slab_mm: float | None = None
    echo_times_ms: tuple[float, ...] = (6.0, 12.0, 18.0, 24.0)
    b0_tesla: float = 3.0
    lesions: int = 12
    new_lesions_per_session: int = 2
    prl_fraction: float = 0.3
    partial_rim_fraction: float = 0.1
    sel_fraction: float = 0.3
    shrinking_fraction: float = 0.1
    vein_adjacent: int = 2
    central_veins: int = 2
    iso_rims: int = 1
    min_lesion_ml: float = 0.01
    max_lesion_ml: float = 10.0
    pbvc_per_year: float = -0.5
    gm_extra_change_per_year: float = -0.3
    cord_loss_per_year_pct: float = -1.8
    subject_warp_mm: float = 3.0
    head_rotation_deg: float = 4.0
    head_translation_mm: float = 4.0
    snr: float = 30.0
    bias_strength: float = 0.2
    #: share of the CSF whose FLAIR signal is not nulled (CSF flowing in after the inversion
    #: pulse, as in the basal cisterns and the fourth ventricle of real 2-D FLAIR): 0 = none
    flair_inflow: float = 0.0
    anatomy: str | None = None
    lesion_masks: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "subjects": self.subjects >= 1,
            "sessions": self.sessions >= 1,
            "interval_years": self.interval_years > 0,
            "resolution_mm": 0.3 <= self.resolution_mm <= 6.0,
            "echo_times_ms": len(self.echo_times_ms) >= 1 and min(self.echo_times_ms) > 0,
            "lesions": self.lesions >= 0,
            "snr": self.snr > 0,
            "flair_inflow": 0.0 <= self.flair_inflow <= 1.0,
            "gre_tilt_deg": abs(self.gre_tilt_deg) <= 45.0,
            "gre_slab_mm": self.gre_slab_mm is None or self.gre_slab_mm > 0,
            "min_lesion_ml": 0 < self.min_lesion_ml <= self.max_lesion_ml,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"phantom {name}={getattr(self, name)!r} is out of range")


@dataclass
class Subject:
    """One synthetic subject: everything needed to render any of its sessions."""

    label: str
    rng_seed: tuple[int, int]
    tissues: dict[str, physics.Tissue]
    subject_velocity: np.ndarray
    coarse_factor: float
    atrophy_basis: np.ndarray
    lesions: list[Lesion]
    rigid: list[tuple[np.ndarray, np.ndarray]]
    years: list[float]
    cord_axes_mm: tuple[float, float]
    cord_loss_pct_per_year: float
    atrophy_coefficients: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class SessionTruth:
    """A session's truth on its scanner-space grid."""

    fractions: np.ndarray
    lesion_ids: np.ndarray
    lesion_fractions: dict[int, tuple[np.ndarray, np.ndarray]]
    rim_chi: np.ndarray
    template_points_vox: np.ndarray
    baseline_points_mm: np.ndarray
    cord_csa_mm2: float

    def channel(self, name: str) -> np.ndarray:
        """Return the fraction map of channel ``name``."""
        return self.fractions[SESSION_CLASSES.index(name)]


# ----------------------------------------------------------------------------- subject set-up


def make_subject(anatomy: Anatomy, config: PhantomConfig, index: int) -> Subject:
    """Return subject ``index``: tissues, deformations, lesions, head positions, cord."""
    seed = (config.seed, index)
    rng = np.random.default_rng(seed)
    tissues = physics.sample_tissues(rng)
    sp = anatomy.spacing_mm[0]
    factor = max(4.0 / sp, 1.0)
    coarse_shape = tuple(int(np.ceil(n / factor)) + 1 for n in anatomy.shape)
    z_world = anatomy.affine[2, 3] + sp * factor * np.arange(coarse_shape[2])
    # fade the subject warp out below the brain so the neck and cord keep their exact geometry
    fade = np.clip((z_world - anatomy.cord_top_mm[2]) / 15.0, 0.0, 1.0)[None, None, :]
    velocity = smooth_random_velocity(
        coarse_shape,
        rng,
        max_voxels=config.subject_warp_mm / (sp * factor),
        smoothness_voxels=3.0,
        weight=np.broadcast_to(fade, coarse_shape),
    )
    subject_disp = exponentiate(velocity)
    lesions = place_lesions(anatomy, config, rng)
    years = [config.interval_years * k for k in range(config.sessions)]
    rigid = [random_rigid(rng, config) for _ in range(config.sessions)]
    cord = (rng.uniform(6.0, 7.0), rng.uniform(4.0, 4.6))
    subj = Subject(
        label=f"{index + 1:02d}",
        rng_seed=seed,
        tissues=tissues,
        subject_velocity=subject_disp,
        coarse_factor=factor,
        atrophy_basis=np.zeros(0),
        lesions=lesions,
        rigid=rigid,
        years=years,
        cord_axes_mm=cord,
        cord_loss_pct_per_year=config.cord_loss_per_year_pct,
    )
    subj.atrophy_basis = atrophy_basis(anatomy, subj)
    return subj


def random_rigid(rng: np.random.Generator, config: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return a random head position ``(rotation 3×3, translation mm)``."""
    angles = np.deg2rad(rng.uniform(-1, 1, 3) * config.head_rotation_deg)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx, rng.uniform(-1, 1, 3) * config.head_translation_mm


def place_lesions(
    anatomy: Anatomy, config: PhantomConfig, rng: np.random.Generator
) -> list[Lesion]:
    """Return the subject's lesions: baseline ones and those appearing at later sessions."""
    candidates = location_candidates(anatomy)
    real = None
    if config.lesion_masks:
        from smoulder.phantom.lesions import real_shapes

        real = real_shapes(config.lesion_masks)
    n_new = config.new_lesions_per_session * max(config.sessions - 1, 0)
    total = config.lesions + n_new
    lesions: list[Lesion] = []
    log_lo, log_hi = np.log(config.min_lesion_ml), np.log(config.max_lesion_ml)
    for i in range(total):
        location = LOCATIONS[i % len(LOCATIONS)]
        pts = candidates[location]
        if len(pts) == 0:
            location, pts = "deep", candidates["deep"]
        # lesion volumes are skewed towards small ones: log-uniform, with a heavier small end
        volume = float(np.exp(log_lo + (log_hi - log_lo) * rng.uniform() ** 1.6))
        if location in ("juxtacortical", "infratentorial"):
            volume = min(volume, 0.8)
        confluent = location == "periventricular" and volume > 1.0 and rng.uniform() < 0.5
        if real is not None and rng.uniform() < 0.7:
            mask, vox, name = real[int(rng.integers(len(real)))]
            sdf, source = real_sdf(mask, vox), name
            volume = float(mask.sum() * vox**3 / 1000)
        else:
            sdf = blob_sdf(rng, volume, lobes=3 if confluent else 1)
            source = "confluent" if confluent else "synthetic"
        radius = (3 * volume * 1000 / (4 * np.pi)) ** (1 / 3)
        for _ in range(200):
            center = pts[int(rng.integers(len(pts)))] + rng.uniform(-0.5, 0.5, 3)
            if all(
                np.linalg.norm(center - o.center_mm) > radius + o.radius_mm + 6.0 for o in lesions
            ):
                break
        else:
            continue
        patch = Patch(sdf.data, sdf.origin_mm + center, sdf.spacing_mm)
        lesions.append(
            Lesion(
                lesion_id=len(lesions) + 1,
                location=location,
                sdf=patch,
                center_mm=center,
                first_session=_first_session(i, config),
                shape_source=source,
                radius_mm=radius,
            )
        )
    assign_lesion_types(lesions, config, rng)
    return lesions


def _first_session(i: int, config: PhantomConfig) -> int:
    """Return the session where the ``i``-th drawn lesion appears.

    The first ``config.lesions`` exist at baseline; the rest arrive
    ``config.new_lesions_per_session`` at a time from the second session on.

    Examples:
        >>> cfg = PhantomConfig(sessions=3, lesions=2, new_lesions_per_session=2)
        >>> [_first_session(i, cfg) for i in range(6)]
        [0, 0, 1, 1, 2, 2]
    """
    if i < config.lesions:
        return 0
    return 1 + (i - config.lesions) // max(config.new_lesions_per_session, 1)


def assign_lesion_types(
    lesions: list[Lesion], config: PhantomConfig, rng: np.random.Generator
) -> None:
    """Set evolution, rims and mimics of ``lesions`` in place, in the proportions of ``config``."""
    base = [les for les in lesions if les.first_session == 0]
    for les in lesions:
        if les.first_session > 0:
            les.kind = "new"
    order = rng.permutation(len(base))
    n_sel = int(round(config.sel_fraction * len(base)))
    n_shrink = int(round(config.shrinking_fraction * len(base)))
    for rank, j in enumerate(order):
        les = base[j]
        if rank < n_sel and les.radius_mm >= 1.5:
            les.kind, les.radial_rate_mm_per_year = "sel", float(rng.uniform(0.3, 0.8))
        elif rank < n_sel + n_shrink and les.radius_mm >= 2.0:
            les.kind, les.radial_rate_mm_per_year = "shrinking", -float(rng.uniform(0.2, 0.4))
    # rims need room for a 1–2 mm shell: only lesions of radius ≥ 2.5 mm can carry one
    rim_able = [les for les in lesions if les.radius_mm >= 2.5]
    rng.shuffle(rim_able)  # type: ignore[arg-type]
    n_prl = int(round(config.prl_fraction * len(lesions)))
    n_partial = int(round(config.partial_rim_fraction * len(lesions)))
    queue = list(rim_able)
    for _ in range(min(n_prl, len(queue))):
        les = queue.pop()
        les.rim, les.rim_coverage = "yes", float(rng.choice([1.0, rng.uniform(0.75, 0.95)]))
        les.rim_width_mm = float(rng.uniform(1.0, 2.0))
        les.rim_chi_ppm = float(rng.uniform(0.05, 0.10))
        les.rim_axis = _unit(rng.normal(size=3))
    for _ in range(min(n_partial, len(queue))):
        les = queue.pop()
        les.rim, les.rim_coverage = "partial", float(rng.uniform(0.25, 0.5))
        les.rim_width_mm = float(rng.uniform(1.0, 2.0))
        les.rim_chi_ppm = float(rng.uniform(0.05, 0.10))
        les.rim_axis = _unit(rng.normal(size=3))
    for _ in range(min(config.iso_rims, len(queue))):
        les = queue.pop()
        les.mimic, les.rim_coverage = "iso_rim", 1.0
        les.rim_width_mm, les.rim_chi_ppm = float(rng.uniform(1.0, 2.0)), 0.0
    plain = [les for les in lesions if les.mimic == "none" and les.radius_mm >= 1.5]
    rng.shuffle(plain)  # type: ignore[arg-type]
    for kind, count in (
        ("vein_adjacent", config.vein_adjacent),
        ("central_vein", config.central_veins),
    ):
        for _ in range(min(count, len(plain))):
            les = plain.pop()
            les.mimic = kind
            direction = _unit(rng.normal(size=3))
            radius = float(rng.uniform(0.5, 0.8))
            offset = np.zeros(3)
            if kind == "vein_adjacent":
                side = _unit(np.cross(direction, rng.normal(size=3)))
                offset = side * (les.radius_mm + radius + 0.8)
            half = les.radius_mm + 8.0
            mid = les.center_mm + offset
            les.vein = Vein(mid - half * direction, mid + half * direction, radius)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def atrophy_basis(anatomy: Anatomy, subject: Subject) -> np.ndarray:
    """Return two velocity fields ``(2, 3, *coarse)``: whole-parenchyma and grey-matter shrinkage.

    Each is the gradient of a potential whose Laplacian is the prescribed relative volume change
    (−1 per unit in the tissue, balanced by expansion of the intracranial CSF), computed on the
    coarse grid in the subject's baseline space; coefficients found per session scale them.
    """
    factor = subject.coarse_factor
    coarse = subject.subject_velocity.shape[1:]
    grid = np.stack(np.meshgrid(*[np.arange(n) * factor for n in coarse], indexing="ij")).astype(
        np.float32
    )
    pts = grid + sample_field(subject.subject_velocity, grid / factor) * factor
    frac = [ndimage.map_coordinates(anatomy.fractions[i], pts, order=1) for i in range(4)]
    csf, gm, deep, wm = frac
    parenchyma, grey = gm + deep + wm, gm + deep
    csf_ic = csf * ndimage.binary_dilation(parenchyma > 0.5, iterations=3)
    spacing = (anatomy.spacing_mm[0] * factor,) * 3
    basis = []
    for tissue in (parenchyma, grey):
        source = -tissue + csf_ic * (tissue.sum() / max(csf_ic.sum(), 1e-6))
        basis.append(gradient_of_poisson(source, spacing))
    return np.stack(basis)


# ----------------------------------------------------------------------------- session truth


def template_points(
    anatomy: Anatomy,
    subject: Subject,
    session: int,
    coefficients: tuple[float, float],
    region: tuple[slice, slice, slice] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return voxel positions in the template, the baseline subject, and the session's subject.

    All three are ``(3, ...)`` arrays over the session's scanner grid (or ``region`` of it):
    template voxel coordinates, baseline-subject world mm, and session-subject world mm.
    """
    shape = anatomy.shape
    region = region or tuple(slice(0, n) for n in shape)  # type: ignore[assignment]
    aff = anatomy.affine
    axes = [
        aff[i, i] * np.arange(n, dtype=np.float32)[r] + aff[i, 3]
        for i, (n, r) in enumerate(zip(shape, region, strict=True))
    ]
    scanner = np.stack(np.meshgrid(*axes, indexing="ij"))
    rot, trans = subject.rigid[session]
    center = _head_center(anatomy)
    rel = scanner - (center + trans).astype(np.float32)[:, None, None, None]
    subj_t = (
        np.tensordot(rot.T.astype(np.float32), rel, axes=1)
        + center.astype(np.float32)[:, None, None, None]
    )
    del rel, scanner
    sp, factor = anatomy.spacing_mm[0], subject.coarse_factor
    coarse = (subj_t - aff[:3, 3, None, None, None].astype(np.float32)) / (sp * factor)
    a, b = coefficients
    if a or b:
        vel = a * subject.atrophy_basis[0] + b * subject.atrophy_basis[1]
        # pull-back of the forward flow: first order in the (sub-voxel) velocity
        subj_0 = subj_t - sample_field(vel, coarse) * (sp * factor)
        coarse = (subj_0 - aff[:3, 3, None, None, None].astype(np.float32)) / (sp * factor)
    else:
        subj_0 = subj_t
    tmpl = coarse * factor + sample_field(subject.subject_velocity, coarse) * factor
    return tmpl.astype(np.float32), subj_0.astype(np.float32), subj_t.astype(np.float32)


def _head_center(anatomy: Anatomy) -> np.ndarray:
    mid = (np.array(anatomy.shape) - 1) / 2
    return (anatomy.affine @ np.r_[mid, 1.0])[:3]


def parenchyma_volumes_ml(
    anatomy: Anatomy,
    subject: Subject,
    session: int,
    coefficients: tuple[float, float],
    *,
    stride: int = 1,
) -> tuple[float, float]:
    """Return (parenchyma, grey matter) volumes in ml of ``session`` for atrophy coefficients.

    ``stride > 1`` samples every ``stride``-th voxel along each axis (a cheaper estimate).
    """
    box = tuple(slice(s.start, s.stop, stride) for s in _brain_box(anatomy))
    pts, _, _ = template_points(anatomy, subject, session, coefficients, region=box)  # type: ignore[arg-type]
    gm, deep, wm = (
        ndimage.map_coordinates(anatomy.channel(c), pts, order=1, prefilter=False)
        for c in ("gm", "deep_gm", "wm")
    )
    voxel_ml = (anatomy.spacing_mm[0] * stride) ** 3 / 1000
    return float((gm + deep + wm).sum() * voxel_ml), float((gm + deep).sum() * voxel_ml)


def _brain_box(anatomy: Anatomy) -> tuple[slice, slice, slice]:
    idx = np.argwhere(anatomy.fractions[1:4].sum(0) > 0)
    margin = int(np.ceil(15.0 / anatomy.spacing_mm[0]))
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, anatomy.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def solve_atrophy(
    anatomy: Anatomy, subject: Subject, config: PhantomConfig, *, tol_pct: float = 0.002
) -> list[tuple[float, float]]:
    """Return per-session atrophy coefficients giving the requested PBVC and GM change exactly.

    The coefficients scale the two velocity fields of :func:`atrophy_basis`; Newton steps on the
    volumes measured from the warped truth maps reach the targets to ``tol_pct`` percentage
    points. The volumes are nearly linear in the coefficients, so a Jacobian from finite
    differences on every second voxel is accurate enough to steer steps taken on all voxels.
    """
    bases = {s: parenchyma_volumes_ml(anatomy, subject, 0, (0.0, 0.0), stride=s) for s in (1, 2)}
    coefficients = [(0.0, 0.0)]
    for k in range(1, config.sessions):
        t = subject.years[k]
        targets = np.array(
            [config.pbvc_per_year * t, (config.pbvc_per_year + config.gm_extra_change_per_year) * t]
        )
        coeff = np.array([-targets[0], targets[0] - targets[1]]) / 100

        def errors(
            c: np.ndarray, stride: int, k: int = k, targets: np.ndarray = targets
        ) -> np.ndarray:
            vols = parenchyma_volumes_ml(anatomy, subject, k, (c[0], c[1]), stride=stride)
            return 100 * (np.array(vols) / np.array(bases[stride]) - 1) - targets

        step = 1e-3
        e0 = errors(coeff, 2)
        jac = np.stack([(errors(coeff + step * np.eye(2)[j], 2) - e0) / step for j in range(2)], 1)
        err = errors(coeff, 1)
        for _ in range(8):
            if np.all(np.abs(err) < tol_pct):
                break
            coeff = coeff - np.linalg.solve(jac, err)
            err = errors(coeff, 1)
        coefficients.append((float(coeff[0]), float(coeff[1])))
    return coefficients


def session_truth(anatomy: Anatomy, subject: Subject, session: int) -> SessionTruth:
    """Return the truth fractions, lesion instances and maps of one session on its grid."""
    coeff = subject.atrophy_coefficients[session]
    tmpl_vox, subj_0, subj_t = template_points(anatomy, subject, session, coeff)
    shape = anatomy.shape
    sp = anatomy.spacing_mm[0]
    frac = np.zeros((len(SESSION_CLASSES), *shape), np.float32)
    for i, name in enumerate(anatomy.classes):
        frac[SESSION_CLASSES.index(name)] = ndimage.map_coordinates(
            anatomy.fractions[i], tmpl_vox, order=1, prefilter=False
        )
    tmpl_mm = np.tensordot(anatomy.affine[:3, :3].astype(np.float32), tmpl_vox, axes=1)
    tmpl_mm += anatomy.affine[:3, 3, None, None, None].astype(np.float32)

    wm = frac[SESSION_CLASSES.index("wm")]
    lesion_ch = frac[SESSION_CLASSES.index("lesion")]
    rim_ch = frac[SESSION_CLASSES.index("rim")]
    vein_total = np.zeros(shape, np.float32)
    rim_chi = np.zeros(shape, np.float32)
    lesion_fractions: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    years = subject.years[session]
    for les in subject.lesions:
        if les.first_session > session:
            continue
        since = years - subject.years[les.first_session]
        grow = max(les.growth_mm(since), 0.0)
        lo, hi = les.bounds_mm(grow + 2 * sp)
        inside = np.all(
            (tmpl_mm >= lo[:, None, None, None]) & (tmpl_mm <= hi[:, None, None, None]), axis=0
        )
        idx = np.nonzero(inside)
        if len(idx[0]) == 0:
            continue
        pts = tmpl_mm[:, idx[0], idx[1], idx[2]]
        f_les, f_rim = les.fractions(pts, since, sp)
        f_les = np.minimum(f_les, wm[idx])  # lesions replace white matter only
        f_rim = np.minimum(f_rim, f_les)
        wm[idx] -= f_les
        lesion_ch[idx] += f_les - f_rim
        rim_ch[idx] += f_rim
        rim_chi[idx] += f_rim * les.rim_chi_ppm
        lesion_fractions[les.lesion_id] = (np.stack(idx), f_les)
        if les.vein is not None:
            vein_total[idx] = np.maximum(vein_total[idx], les.vein.fraction(pts, sp))
    if vein_total.any():
        # a vessel displaces whatever tissue it crosses, in proportion
        keep = 1.0 - vein_total
        frac *= keep[None]
        rim_chi *= keep
        frac[SESSION_CLASSES.index("vein")] = vein_total * (frac.sum(0) + vein_total <= 1.0 + 1e-6)
        for lid, (idx_arr, f) in lesion_fractions.items():
            lesion_fractions[lid] = (idx_arr, f * keep[tuple(idx_arr)])
    csa = paint_cord(frac, subj_t, anatomy, subject, session)

    lesion_ids = np.zeros(shape, np.int16)
    best = np.zeros(shape, np.float32)
    for lid, (idx_arr, f) in lesion_fractions.items():
        sel = tuple(idx_arr)
        better = (f >= 0.5) & (f > best[sel])
        target = tuple(a[better] for a in idx_arr)
        lesion_ids[target] = lid
        best[target] = f[better]
    return SessionTruth(
        fractions=frac,
        lesion_ids=lesion_ids,
        lesion_fractions=lesion_fractions,
        rim_chi=rim_chi,
        template_points_vox=tmpl_vox,
        baseline_points_mm=subj_0,
        cord_csa_mm2=csa,
    )


def paint_cord(
    frac: np.ndarray, subj_t: np.ndarray, anatomy: Anatomy, subject: Subject, session: int
) -> float:
    """Draw the cord and canal CSF below the brain into ``frac``; return the true CSA in mm².

    The cord is an elliptic cylinder along the subject's z axis (axes shrink with the annual
    cord loss); the area of an ellipse, π·a·b, is the exact cross-sectional area.
    """
    a0, b0 = subject.cord_axes_mm
    years = subject.years[session]
    scale = np.sqrt(max(1.0 + subject.cord_loss_pct_per_year / 100 * years, 0.1))
    a, b = a0 * scale, b0 * scale
    cx, cy, top = anatomy.cord_top_mm
    sp = anatomy.spacing_mm[0]
    # a linear partial-volume ramp of width h around a curved edge adds π·h²/12 to the area:
    # draw slightly smaller axes so that the fractions integrate to π·a·b
    shrink = np.sqrt(max(1.0 - sp**2 / (12 * a * b), 0.5))
    a_draw, b_draw = a * shrink, b * shrink
    below = np.clip((top - subj_t[2]) / sp + 0.5, 0.0, 1.0)
    zone = below > 0
    dx, dy = subj_t[0][zone] - cx, subj_t[1][zone] - cy
    r_ell = np.sqrt((dx / a_draw) ** 2 + (dy / b_draw) ** 2)
    # signed distance to the ellipse, first order: (r_ell − 1) × local radius
    local_r = np.sqrt((dx**2 + dy**2) / np.maximum(r_ell**2, 1e-9))
    cord = np.clip(0.5 - (r_ell - 1.0) * local_r / sp, 0.0, 1.0) * below[zone]
    canal = np.clip((anatomy.canal_radius_mm - np.hypot(dx, dy)) / sp + 0.5, 0.0, 1.0) * below[zone]
    room = np.clip(1.0 - frac[:, zone].sum(0), 0.0, 1.0)
    cord = np.minimum(cord, room)
    frac[SESSION_CLASSES.index("cord"), zone] += cord
    frac[SESSION_CLASSES.index("csf"), zone] += np.clip(np.minimum(canal, room) - cord, 0.0, None)
    return float(np.pi * a * b)


# ----------------------------------------------------------------------------- images


def chi_map_ppm(truth: SessionTruth, tissues: dict[str, physics.Tissue]) -> np.ndarray:
    """Return the true susceptibility (ppm, relative to CSF) of a session."""
    chi = np.zeros(truth.fractions.shape[1:], np.float32)
    for i, name in enumerate(SESSION_CLASSES):
        if name != "rim":
            chi += truth.fractions[i] * tissues[CHANNEL_TISSUE[name]].chi_ppm
    # rims carry their own susceptibility on top of the lesion tissue they are made of
    chi += truth.channel("rim") * tissues["lesion"].chi_ppm + truth.rim_chi
    air = np.clip(1.0 - truth.fractions.sum(0), 0.0, 1.0)
    chi += air * tissues["air"].chi_ppm
    return chi


def mix(truth: SessionTruth, per_class: dict[str, Any]) -> np.ndarray:
    """Return ``Σ_c fraction_c · value_c`` over the channels (values scalar or per echo)."""
    first = np.asarray(next(iter(per_class.values())))
    out = np.zeros(first.shape + truth.fractions.shape[1:], np.float32)
    for i, name in enumerate(SESSION_CLASSES):
        value = np.asarray(per_class[CHANNEL_TISSUE[name]], np.float32)
        out += value.reshape(value.shape + (1, 1, 1)) * truth.fractions[i]
    return out
