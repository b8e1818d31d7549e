"""The subjects of the longitudinal benchmark (``benchmarks/longitudinal.py``): how each set's
sessions are made or found, and the truth that goes with them.

Every subject is described by a plain dictionary (JSON, read by the methods' child processes)::

    {"name": "phantom-2ses/sub-01", "sessions": [SESSION, ...], "truth": PATH or None,
     "common": PATH or None}

    SESSION = {"label": "01", "years": 0.0 or None, "flair": PATH, "t1": PATH or None,
               "brain": PATH or None, "lesions": PATH or None, "truth_lesions": PATH or None,
               "to_common": PATH or None}

Every image of a session is on that session's FLAIR grid. ``lesions`` is the instance map the
methods are given (the truth on the phantom and real-anatomy sets; ``None`` on the real-change
set, where smoulder's segmentation fills it in); ``truth_lesions`` the truth instance map
(same ids as the truth table). ``truth`` is a JSON file::

    {"lesions": [{"id": 3, "kind": "sel", "expanding": true, "first_session": "01",
                  "true_rate_pct_per_year": 31.2 or null}, ...],
     "volumes_ul": {"3": {"01": 45.9, "02": 74.9}, ...}}

On the real-change set ``common`` is the expert change mask (``gt.nii.gz``) and each session's
``to_common`` the ITK affine that maps common-space points to its FLAIR's points.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import benchenv
import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
OPEN_MS = REPO.parent / "shared" / "data" / "open_ms"
CROSS_SECTIONAL = OPEN_MS / "cross_sectional"
DONOR_MASKS = OPEN_MS / "lesion_masks_mni"
LONGITUDINAL = OPEN_MS / "longitudinal"
#: Days in a Julian year (the year of every rate per year).
DAYS_PER_YEAR = 365.25
#: lesiontrack reslices masks as unsigned bytes: instance ids must stay below this.
MAX_LESION_ID = 255


# ============================================================================ phantom


def phantom_root(
    cache: Path,
    *,
    subjects: int,
    sessions: int,
    res_mm: float,
    seed: int,
    flair_slice_mm: float | None = None,
) -> Path:
    """Return a cached phantom dataset (generated if absent), named by the generator's source.

    The phantom's own mix: 12 baseline lesions, 30 % of them slowly expanding (radial rate
    0.3–0.8 mm/year), 10 % shrinking, 2 new lesions per follow-up, head repositioning and a
    bias field per session, one year between sessions.
    """
    from smoulder.phantom.dataset import generate_dataset
    from smoulder.phantom.generate import PhantomConfig

    thick = f"-flair{flair_slice_mm:g}mm" if flair_slice_mm else ""
    version = benchenv.source_fingerprint(*benchenv.PHANTOM_MODULES)
    name = f"phantom-{subjects}sub-{sessions}ses-{res_mm:g}mm{thick}-seed{seed}-{version}"
    root = cache / name
    if not (root / "dataset_description.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"  generating {name} ...", flush=True)
        config = PhantomConfig(
            subjects=subjects,
            sessions=sessions,
            resolution_mm=res_mm,
            seed=seed,
            flair_slice_mm=flair_slice_mm,
        )
        generate_dataset(root, config)
    return root


def read_tsv_rows(path: Path) -> list[dict[str, str]]:
    """Return the rows of a TSV file as dictionaries."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def phantom_truth(root: Path, sub: str, years: dict[str, float]) -> dict:
    """Return the truth of phantom subject ``sub`` (``"01"``) in the benchmark's form.

    The true rate of a lesion present at the first session is its volume change from the
    first to the last session, relative to the first, per year, from the partial-volume
    truth volumes; ``expanding`` is the phantom's ``kind == "sel"``.
    """
    folder = root / "derivatives" / "truth" / f"sub-{sub}"
    volumes: dict[str, dict[str, float]] = {}
    for row in read_tsv_rows(folder / f"sub-{sub}_desc-lesionvolumes_truth.tsv"):
        ses = row["session"].removeprefix("ses-")
        volumes.setdefault(row["lesion_id"], {})[ses] = float(row["volume_ml"]) * 1000.0
    first, last = min(years), max(years)
    lesions = []
    for row in read_tsv_rows(folder / f"sub-{sub}_desc-lesions_truth.tsv"):
        vols = volumes.get(row["lesion_id"], {})
        rate = None
        if first in vols and last in vols and vols[first] > 0 and last != first:
            rate = (vols[last] / vols[first] - 1.0) * 100.0 / (years[last] - years[first])
        lesions.append(
            {
                "id": int(row["lesion_id"]),
                "kind": row["kind"],
                "expanding": row["kind"] == "sel",
                "first_session": row["first_session"].removeprefix("ses-"),
                "radial_rate_mm_per_year": float(row["radial_rate_mm_per_year"]),
                "true_rate_pct_per_year": rate,
            }
        )
    return {"lesions": lesions, "volumes_ul": volumes}


def phantom_years(root: Path, sub: str) -> dict[str, float]:
    """Return ``{session label: years since the first}`` from the subject's ``sessions.tsv``."""
    from smoulder.longitudinal.intervals import session_dates, years_since_first

    rows = read_tsv_rows(root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv")
    dates = session_dates(rows)
    labels = sorted(dates)
    years = years_since_first([dates[s] for s in labels])
    return {s.removeprefix("ses-"): float(y) for s, y in zip(labels, years, strict=True)}


def phantom_subject(
    root: Path, sub: str, case: str, work: Path, thick_root: Path | None = None
) -> dict:
    """Return the description of phantom subject ``sub`` (see the module docstring).

    With ``thick_root`` (the same dataset made with a thick-slice FLAIR), the last session's
    FLAIR comes from there: a 3D baseline against a 2D follow-up. Its truth instances, brain
    mask and T1w are brought onto that FLAIR's grid (labels: label-aware; T1w: linear) and
    written to ``work``.
    """
    years = phantom_years(root, sub)
    truth = phantom_truth(root, sub, years)
    work.mkdir(parents=True, exist_ok=True)
    truth_path = work / "truth.json"
    truth_path.write_text(json.dumps(truth, indent=1))
    sessions = []
    labels = sorted(years)
    for ses in labels:
        anat = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
        tdir = root / "derivatives" / "truth" / f"sub-{sub}" / f"ses-{ses}" / "anat"
        prefix = f"sub-{sub}_ses-{ses}"
        flair = anat / f"{prefix}_FLAIR.nii.gz"
        lesions = tdir / f"{prefix}_space-T1w_desc-lesions_dseg.nii.gz"
        brain = tdir / f"{prefix}_space-T1w_desc-brain_mask.nii.gz"
        t1 = anat / f"{prefix}_T1w.nii.gz"
        wm = tdir / f"{prefix}_space-T1w_label-WM_probseg.nii.gz"
        if thick_root is not None and ses == labels[-1]:
            flair = thick_root / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"{prefix}_FLAIR.nii.gz"
            lesions = thick_labels(lesions, flair, work / f"{prefix}_lesions.nii.gz")
            brain = on_grid_file(brain, flair, work / f"{prefix}_brain.nii.gz", "nearest")
            t1 = on_grid_file(t1, flair, work / f"{prefix}_T1w.nii.gz", "linear")
            wm = on_grid_file(wm, flair, work / f"{prefix}_wm.nii.gz", "linear")
        sessions.append(
            {
                "label": ses,
                "years": years[ses],
                "flair": str(flair),
                "t1": str(t1),
                "wm": str(wm),
                "brain": str(brain),
                "lesions": str(lesions),
                "truth_lesions": str(lesions),
                "to_common": None,
            }
        )
    return {
        "name": f"{case}/sub-{sub}",
        "sessions": sessions,
        "truth": str(truth_path),
        "common": None,
    }


def thick_labels(src: Path, like: Path, out: Path) -> Path:
    """Return ``out`` after writing the instance map ``src`` on the (thick-slice) grid of
    ``like``: each voxel the lesion covering at least half of its slab
    (:func:`supersampled_labels`)."""
    from smoulder.registration.transforms import AffineTransform

    if not out.is_file():
        img = nib.load(src)
        labels = np.asarray(img.dataobj).astype(np.int16)
        thick = supersampled_labels(labels, img.affine, AffineTransform.identity(), nib.load(like))
        nib.save(nib.Nifti1Image(thick, nib.load(like).affine), out)
    return out


def on_grid_file(src: Path, like: Path, out: Path, interpolation: str) -> Path:
    """Return ``out`` after writing ``src`` resampled onto the grid of ``like`` (same world)."""
    from smoulder.registration.transforms import AffineTransform, resample

    if not out.is_file():
        moved = resample(
            nib.load(src), nib.load(like), AffineTransform.identity(), interpolation=interpolation
        )
        nib.save(moved, out)
    return out


# ============================================================================ real anatomy


def radial_pullback(
    points_mm: np.ndarray, centre_mm: np.ndarray, core_mm: float, factor: float, falloff_mm: float
) -> np.ndarray:
    """Return where follow-up points come from in the baseline after a radial expansion.

    Around ``centre_mm`` the follow-up is the baseline scaled by ``factor ** (1/3)`` out to
    the follow-up radius ``A = core_mm · factor ** (1/3)`` (so everything within ``core_mm`` of
    the centre grows by exactly ``factor`` in volume), and the map returns smoothly to the
    identity at ``B = A + falloff_mm``. Radially, a follow-up point at distance ``r`` comes
    from the baseline distance ``ρ(r)`` with ``ρ(r)³ = r³ − k·g(r)``, ``k = 1 − 1/factor``,
    ``g(r) = r³`` up to ``A`` and ``A³·(1 − smoothstep((r − A)/(B − A)))`` beyond: ``ρ`` is
    increasing (``g`` never increases beyond ``A``), continuous, and the identity from ``B``.

    Args:
        points_mm: ``(N, 3)`` follow-up points (mm).
        centre_mm: the centre (mm).
        core_mm: baseline radius that grows uniformly (mm).
        factor: volume factor (> 0; < 1 shrinks).
        falloff_mm: width of the shell over which the map returns to the identity (mm).

    Returns:
        ``(N, 3)`` baseline points.

    Examples:
        >>> c = np.zeros(3)
        >>> p = radial_pullback(np.array([[2.0, 0, 0], [0, 0, 9.0]]), c, 2.0, 8.0, 3.0)
        >>> p.round(6).tolist()  # radius 2 -> 4 in the follow-up: 2 comes from 1; 9 >= B = 7
        [[1.0, 0.0, 0.0], [0.0, 0.0, 9.0]]
    """
    d = np.asarray(points_mm, dtype=np.float64) - centre_mm
    r = np.linalg.norm(d, axis=1)
    big_a = core_mm * factor ** (1.0 / 3.0)
    t = np.clip((r - big_a) / falloff_mm, 0.0, 1.0)
    g = np.where(r <= big_a, r**3, big_a**3 * (1.0 - t * t * (3.0 - 2.0 * t)))
    rho = np.cbrt(r**3 - (1.0 - 1.0 / factor) * g)
    scale = np.divide(rho, r, out=np.ones_like(r), where=r > 1e-9)
    return centre_mm + d * scale[:, None]


def expansion_displacement(
    shape: tuple[int, int, int], affine: np.ndarray, expansions: list[dict], falloff_mm: float
) -> np.ndarray:
    """Return the displacement (``(3, X, Y, Z)``, mm) of the pull-back of every expansion.

    ``expansions`` holds ``{"centre_mm", "core_mm", "factor"}``; their outer balls must not
    overlap (each map is the identity beyond its ball, so the displacements then add up).
    """
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    disp = np.zeros_like(world)
    for e in expansions:
        centre = np.asarray(e["centre_mm"])
        outer = e["core_mm"] * e["factor"] ** (1 / 3) + falloff_mm
        near = np.linalg.norm(world - centre, axis=1) < outer
        moved = radial_pullback(world[near], centre, e["core_mm"], e["factor"], falloff_mm)
        disp[near] = moved - world[near]
    return disp.T.reshape(3, *shape).astype(np.float32)


def lesion_geometry(instances: np.ndarray, affine: np.ndarray) -> dict[int, dict]:
    """Return per lesion id its centre (mm), radius (mm, farthest voxel centre from the centre
    plus half a voxel diagonal) and volume (µl)."""
    voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    out = {}
    for i, sl in enumerate(ndimage.find_objects(instances), start=1):
        if sl is None:
            continue
        idx = np.argwhere(instances[sl] == i) + [s.start for s in sl]
        world = idx @ affine[:3, :3].T + affine[:3, 3]
        centre = world.mean(axis=0)
        radius = float(np.linalg.norm(world - centre, axis=1).max() + 0.5 * np.linalg.norm(voxel))
        out[i] = {"centre_mm": centre, "radius_mm": radius, "volume_ul": len(idx) * voxel.prod()}
    return out


def choose_expansions(
    instances: np.ndarray,
    affine: np.ndarray,
    factors: tuple[float, ...],
    falloff_mm: float,
    rng: np.random.Generator,
    min_volume_ul: float = 50.0,
) -> list[dict]:
    """Return up to ``len(factors)`` lesions to expand, each with its factor and the other
    lesions its deformation touches.

    A lesion qualifies when it holds at least ``min_volume_ul`` (a lesion of a few voxels
    cannot show a 10 % change on its grid), its core ball (its radius, where the map is a
    pure scaling) holds no voxel of another lesion, and its outer ball (the core grown by the
    factor, plus the falloff) overlaps no chosen lesion's. Lesions of its falloff shell are
    ``touched``: compressed a little, their true factor is not known exactly, so they are left
    out of the scores. Lesions with an untouched outer ball come first (crowded baselines
    such as patient19's have few).
    """
    geometry = lesion_geometry(instances, affine)
    voxel_mm = float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).min())
    world = np.argwhere(instances > 0) @ affine[:3, :3].T + affine[:3, 3]
    ids = instances[instances > 0]
    candidates = []
    for lesion in rng.permutation(sorted(geometry)):
        g = geometry[int(lesion)]
        if g["volume_ul"] < min_volume_ul:
            continue
        dist = np.linalg.norm(world - g["centre_mm"], axis=1)
        if np.any(ids[dist < g["radius_mm"] + voxel_mm] != lesion):
            continue
        outer = g["radius_mm"] * max(factors) ** (1 / 3) + falloff_mm + voxel_mm
        touched = sorted({int(i) for i in ids[dist < outer]} - {int(lesion)})
        candidates.append((len(touched) > 0, int(lesion), touched))
    chosen: list[dict] = []
    for _, lesion, touched in sorted(candidates, key=lambda c: c[0]):
        if len(chosen) == len(factors):
            break
        g = geometry[lesion]
        factor = factors[len(chosen)]
        outer = g["radius_mm"] * factor ** (1 / 3) + falloff_mm + voxel_mm
        if any(
            np.linalg.norm(g["centre_mm"] - c["centre_mm"]) < outer + c["outer_mm"] for c in chosen
        ):
            continue
        chosen.append(
            {
                "id": lesion,
                "centre_mm": g["centre_mm"].tolist(),
                "core_mm": g["radius_mm"],
                "factor": factor,
                "outer_mm": outer,
                "touched": touched,
            }
        )
    return chosen


def donor_lesions(
    patient: str,
    instances: np.ndarray,
    brain: np.ndarray,
    affine: np.ndarray,
    count: int,
    keep_out: list[dict],
    rng: np.random.Generator,
) -> np.ndarray:
    """Return up to ``count`` new lesions (a label map, 1..n) of real shape at real places.

    Each is a lesion of another patient of the same study (``lesion_masks_mni``, MNI like the
    baseline), kept where it lies in that patient, so shape and place are both real: 30–800
    µl, wholly inside this brain, at least 4 mm from this patient's lesions and from the
    balls of the expansions ``keep_out``, and apart from the other new lesions.
    """
    from smoulder.grids import resample_image

    voxel_mm = float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).min())
    margin = max(1, int(np.ceil(4.0 / voxel_mm)))
    forbidden = ndimage.binary_dilation(instances > 0, iterations=margin)
    for e in keep_out:
        forbidden |= ball(instances.shape, affine, np.asarray(e["centre_mm"]), e["outer_mm"] + 4.0)
    inside = ndimage.binary_erosion(brain, iterations=margin)
    donors = sorted(p for p in DONOR_MASKS.glob("*.nii.gz") if not p.name.startswith(patient))
    out = np.zeros(instances.shape, np.int16)
    for path in rng.permutation(donors):
        img = nib.load(path)
        mask = np.asarray(resample_image(img, instances.shape, affine, order=1).dataobj) >= 0.5
        labels, n = ndimage.label(mask, np.ones((3, 3, 3)))
        sizes = np.bincount(labels.ravel())[1:] * voxel_mm**3
        for lesion in rng.permutation(np.flatnonzero((sizes >= 30) & (sizes <= 800)) + 1):
            region = labels == lesion
            if forbidden[region].any() or not inside[region].all():
                continue
            out[region] = out.max() + 1
            forbidden |= ndimage.binary_dilation(region, iterations=margin)
            if out.max() == count:
                return out
    return out


def ball(
    shape: tuple[int, ...], affine: np.ndarray, centre_mm: np.ndarray, radius_mm: float
) -> np.ndarray:
    """Return the voxels of a grid within ``radius_mm`` of ``centre_mm``."""
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(world - centre_mm, axis=1) <= radius_mm).reshape(shape)


def paint_lesions(image: np.ndarray, new: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """Return ``image`` with the ``new`` lesions given the median intensity of the existing
    ``lesions``, blended over a one-voxel soft edge (FLAIR: bright; T1: dark)."""
    level = float(np.median(image[lesions > 0]))
    weight = np.clip(ndimage.gaussian_filter((new > 0).astype(np.float32), 0.7) * 1.5, 0, 1)
    weight[new > 0] = 1.0
    return (image * (1 - weight) + level * weight).astype(np.float32)


def random_rigid(
    rng: np.random.Generator, centre_mm: np.ndarray, max_deg: float, max_mm: float
) -> np.ndarray:
    """Return a 4×4 rigid matrix (rotation about ``centre_mm`` up to ``max_deg`` per axis, then
    a translation up to ``max_mm`` per axis)."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("xyz", rng.uniform(-max_deg, max_deg, 3), degrees=True).as_matrix()
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = centre_mm - rot @ centre_mm + rng.uniform(-max_mm, max_mm, 3)
    return m


#: Volume factors of the expanded lesions over one year (``--quick`` takes the first four).
FACTORS = (1.1, 1.6, 1.25, 1.4, 1.15, 1.5, 1.3, 1.2)
#: Width of the shell over which an expansion fades out (mm).
FALLOFF_MM = 3.0
#: Years between the real baseline and its synthetic follow-up.
ANATOMY_YEARS = 1.0


def anatomy_subject(
    cache: Path, patient: str, case: str, res_mm: float, seed: int, quick: bool
) -> dict:
    """Return a real baseline (FLAIR, T1, expert mask) and its synthetic follow-up.

    The follow-up: chosen lesions expanded by known volume factors (:data:`FACTORS`, by
    :func:`radial_pullback`), new lesions of real shape at real places
    (:func:`donor_lesions`), painted with the patient's own lesion intensities, then a small
    rigid move (≤ 2°, ≤ 2 mm per axis), an intensity rescale (× 0.85–1.15 per image) and
    Gaussian noise (2 % of the brain's 99th percentile). Instances: the expert mask's
    26-connected components (ids 1..n), new lesions after them. Cached under ``cache``.
    """
    from smoulder.grids import resample_image
    from smoulder.registration.transforms import (
        AffineTransform,
        DisplacementTransform,
        TransformChain,
        resample,
    )

    version = benchenv.source_fingerprint("longitudinal_cases")
    folder = (
        cache / f"anatomy-{patient}-{res_mm:g}mm-seed{seed}{'-quick' if quick else ''}-{version}"
    )
    done = folder / "subject.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"  making {folder.name} ...", flush=True)
    rng = np.random.default_rng([seed, int(patient.removeprefix("patient"))])
    src = CROSS_SECTIONAL / patient
    flair_img = nib.load(next(src.glob("FLAIR_*.nii.gz")))
    shape, affine = tuple(flair_img.shape[:3]), flair_img.affine
    if res_mm != 1.0:
        from smoulder.grids import covering_grid

        shape, affine = covering_grid(flair_img, res_mm)

    def load(pattern: str, order: int = 1) -> np.ndarray:
        img = nib.load(next(src.glob(pattern)))
        return np.asarray(resample_image(img, shape, affine, order=order).dataobj, np.float32)

    flair, t1 = load("FLAIR_*.nii.gz"), load("T1_*.nii.gz")
    instances, n = ndimage.label(load("GOLD_STANDARD_*.nii.gz") >= 0.5, np.ones((3, 3, 3)))
    brain = ndimage.binary_fill_holes(flair > 0)
    factors = FACTORS[:4] if quick else FACTORS
    expansions = choose_expansions(instances, affine, factors, FALLOFF_MM, rng)
    new = donor_lesions(patient, instances, brain, affine, 2 if quick else 4, expansions, rng)
    new_ids = np.where(new > 0, new + n, 0)
    if n + new.max() > MAX_LESION_ID:
        raise ValueError(f"{patient}: {n + new.max()} lesions, over {MAX_LESION_ID}")
    flair_new, t1_new = paint_lesions(flair, new, instances), paint_lesions(t1, new, instances)
    centre = affine[:3, :3] @ np.argwhere(brain).mean(axis=0) + affine[:3, 3]
    rigid = random_rigid(rng, centre, 2.0, 2.0)
    disp = expansion_displacement(shape, affine, expansions, FALLOFF_MM)
    chain = TransformChain([AffineTransform(rigid), DisplacementTransform(disp, affine)])
    grid = nib.Nifti1Image(np.zeros(shape, np.uint8), affine)

    def follow(data: np.ndarray, interpolation: str) -> np.ndarray:
        moved = resample(nib.Nifti1Image(data, affine), grid, chain, interpolation=interpolation)
        return np.asarray(moved.dataobj)

    base_labels = instances.astype(np.int16)
    fu_labels = supersampled_labels((base_labels + new_ids).astype(np.int16), affine, chain)
    fu_brain = follow(brain.astype(np.uint8), "nearest")
    paths = {}
    for tag, (fl, tt, lab, br) in {
        "01": (flair, t1, base_labels, brain.astype(np.uint8)),
        "02": (follow(flair_new, "linear"), follow(t1_new, "linear"), fu_labels, fu_brain),
    }.items():
        if tag == "02":
            fl, tt = (noisy(x, br > 0, rng) for x in (fl, tt))
        for name, data in (("FLAIR", fl), ("T1w", tt), ("lesions", lab), ("brain", br)):
            paths[tag, name] = folder / f"ses-{tag}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), paths[tag, name])
    truth = anatomy_truth(instances, new, n, expansions, fu_labels, affine)
    (folder / "truth.json").write_text(json.dumps(truth, indent=1))
    sessions = [
        {
            "label": tag,
            "years": years,
            "flair": str(paths[tag, "FLAIR"]),
            "t1": str(paths[tag, "T1w"]),
            "brain": str(paths[tag, "brain"]),
            "lesions": str(paths[tag, "lesions"]),
            "truth_lesions": str(paths[tag, "lesions"]),
            "to_common": None,
        }
        for tag, years in (("01", 0.0), ("02", ANATOMY_YEARS))
    ]
    subject = {
        "name": f"{case}/seed{seed}",
        "sessions": sessions,
        "truth": str(folder / "truth.json"),
        "common": None,
    }
    done.write_text(json.dumps(subject, indent=1))
    return subject


def supersampled_labels(
    labels: np.ndarray,
    affine: np.ndarray,
    chain,  # noqa: ANN001 - any smoulder transform (fixed -> moving points)
    like: nib.Nifti1Image | None = None,
    steps: int = 3,
) -> np.ndarray:
    """Return ``labels`` pulled through ``chain`` onto the grid of ``like`` (default: their
    own), each voxel taking the label that covers at least half of it (sub-points at
    ``steps`` per source voxel along each axis, at least ``steps``; nearest label at each).

    On a voxel grid a lesion of a few voxels cannot grow by 10 %: nearest neighbour moves its
    edge by whole voxels (0 or +60 %), and label-aware linear interpolation erodes it under a
    sub-voxel shift or onto thick slices (ties go to the background). The majority over
    sub-points follows the continuous volume. Only voxels near a lesion (of the
    nearest-neighbour result, dilated) are sub-sampled.

    Examples:
        >>> from smoulder.registration.transforms import AffineTransform
        >>> lab = np.zeros((1, 1, 8), np.int16); lab[..., 2:5] = 4
        >>> shift = np.eye(4); shift[2, 3] = 0.4  # content moves 0.4 voxel towards -z
        >>> supersampled_labels(lab, np.eye(4), AffineTransform(shift)).ravel().tolist()
        [0, 0, 4, 4, 4, 0, 0, 0]
    """
    from smoulder.registration.transforms import resample

    img = nib.Nifti1Image(labels, affine)
    like = like or img
    out_affine, out_shape = like.affine, like.shape[:3]
    near = np.asarray(resample(img, like, chain, interpolation="nearest").dataobj)
    todo = np.argwhere(ndimage.binary_dilation(near > 0, iterations=2))
    ratio = np.sqrt((out_affine[:3, :3] ** 2).sum(0)) / np.sqrt((affine[:3, :3] ** 2).sum(0).min())
    per_axis = [np.arange(max(steps, round(steps * r))) for r in ratio]
    grid = np.stack(np.meshgrid(*per_axis, indexing="ij"), -1).reshape(-1, 3)
    offsets = (grid + 0.5) / [len(a) for a in per_axis] - 0.5
    inverse = np.linalg.inv(affine)
    out = np.zeros(out_shape, labels.dtype)
    for chunk in np.array_split(todo, max(1, len(todo) // 20000)):
        sub = (chunk[:, None, :] + offsets[None]).reshape(-1, 3)
        moved = chain.apply(sub @ out_affine[:3, :3].T + out_affine[:3, 3])
        ijk = np.rint(moved @ inverse[:3, :3].T + inverse[:3, 3]).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < labels.shape), axis=1)
        got = np.zeros(len(sub), labels.dtype)
        got[inside] = labels[tuple(ijk[inside].T)]
        got = got.reshape(len(chunk), -1)
        for k, voxel in enumerate(chunk):
            ids, counts = np.unique(got[k], return_counts=True)
            best = np.argmax(np.where(ids > 0, counts, -1))
            if ids[best] > 0 and 2 * counts[best] >= got.shape[1]:
                out[tuple(voxel)] = ids[best]
    return out


def noisy(data: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return ``data`` rescaled (× 0.85–1.15) with Gaussian noise (2 % of the brain's 99th
    percentile) inside ``brain`` (the baselines are skull-stripped: zero stays zero)."""
    scale = rng.uniform(0.85, 1.15)
    sigma = 0.02 * float(np.percentile(data[brain], 99))
    out = data * scale
    out[brain] += rng.normal(0.0, sigma, int(brain.sum()))
    return np.clip(out, 0, None).astype(np.float32)


def anatomy_truth(
    instances: np.ndarray,
    new: np.ndarray,
    n: int,
    expansions: list[dict],
    fu_labels: np.ndarray,
    affine: np.ndarray,
) -> dict:
    """Return the truth of a synthetic follow-up: expanded lesions grow by their factor (exact
    by construction), the untouched keep their volume, new lesions appear in session 02; the
    lesions in an expansion's falloff shell (``touched``) have ``expanding`` None.

    ``mask_factor`` records the volume ratio the label-resampled follow-up mask shows (a
    check of the construction, not the truth)."""
    voxel_ul = float(abs(np.linalg.det(affine[:3, :3])))
    base = np.bincount(instances.ravel(), minlength=n + 1) * voxel_ul
    fu = (
        np.bincount(fu_labels.ravel().astype(np.int64), minlength=n + int(new.max()) + 1) * voxel_ul
    )
    factor = {e["id"]: e["factor"] for e in expansions}
    touched = {i for e in expansions for i in e["touched"]}
    lesions, volumes = [], {}
    for i in range(1, n + 1):
        f = factor.get(i, 1.0)
        kind = "sel" if i in factor else "touched" if i in touched else "stable"
        lesions.append(
            {
                "id": i,
                "kind": kind,
                # None: not scored (its true factor is between the shell's compression and 1)
                "expanding": None if kind == "touched" else i in factor,
                "first_session": "01",
                "true_rate_pct_per_year": (f - 1.0) * 100.0 / ANATOMY_YEARS,
                "mask_factor": round(float(fu[i] / base[i]), 4) if base[i] else None,
            }
        )
        volumes[str(i)] = {"01": float(base[i]), "02": float(base[i] * f)}
    for j in range(1, int(new.max()) + 1):
        lesions.append(
            {
                "id": n + j,
                "kind": "new",
                "expanding": False,
                "first_session": "02",
                "true_rate_pct_per_year": None,
            }
        )
        volumes[str(n + j)] = {"02": float(fu[n + j])}
    return {"lesions": lesions, "volumes_ul": volumes}


# ============================================================================ real change


def patient_years(patient: str) -> float:
    """Return the years between the two studies of ``patient`` (``patient_info.csv``)."""
    number = int(patient.removeprefix("patient"))
    with (LONGITUDINAL / "patient_info.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if int(row["patient_id"]) == number:
                return float(row["days_between_studies"]) / DAYS_PER_YEAR
    raise KeyError(f"{patient} is not in {LONGITUDINAL / 'patient_info.csv'}")


def change_subject(cache: Path, patient: str, case: str) -> dict:
    """Return a real two-session patient whose expert mask marks lesion change.

    Each study's T1W is brought onto its FLAIR's grid through the study's
    ``*_T1W_intrastudy_to_FLAIR.txt`` (FLAIR points → T1W points); a study without a T1W has
    none. ``lesions`` and ``brain`` are left for smoulder's segmentation to fill in.
    """
    from smoulder.registration.transforms import AffineTransform, resample

    src = LONGITUDINAL / patient
    folder = cache / f"change-{patient}"
    folder.mkdir(parents=True, exist_ok=True)
    years = patient_years(patient)
    sessions = []
    for k, study in enumerate(("study1", "study2")):
        flair = src / f"{study}_FLAIR.nii.gz"
        t1 = None
        if (src / f"{study}_T1W.nii.gz").is_file():
            t1 = folder / f"{study}_T1W_on_FLAIR.nii.gz"
            if not t1.is_file():
                xfm = AffineTransform.load(src / f"{study}_T1W_intrastudy_to_FLAIR.txt")
                nib.save(resample(nib.load(src / f"{study}_T1W.nii.gz"), nib.load(flair), xfm), t1)
        sessions.append(
            {
                "label": f"{k + 1:02d}",
                "years": [0.0, years][k],
                "flair": str(flair),
                "t1": str(t1) if t1 else None,
                "brain": None,
                "lesions": None,
                "truth_lesions": None,
                "to_common": str(src / f"{study}_FLAIR_to_common_space.txt"),
            }
        )
    return {
        "name": f"{case}/{patient}",
        "sessions": sessions,
        "truth": None,
        "common": str(src / "gt.nii.gz"),
    }
