"""Lesions as numbered instances, their table of measurements, and lesion filling.

From a lesion probability map (any segmenter's output) to what a neuroradiologist counts:

* :func:`lesion_instances`: threshold, 26-connected components, small ones dropped, confluent
  lesions split where the probability shows separate cores, IDs numbered by world position.
* :func:`lesion_table`: one row per lesion (centroid, volume, location, probability).
* :func:`write_lesion_stats`: that table as a BIDS TSV with its JSON column dictionary.
* :func:`fill_lesions`: a T1w with lesions painted over by normal-appearing white matter, for
  tissue segmentation and atrophy measures that lesions would otherwise bias.

Conventions: arrays are 3D voxel grids with a 4×4 voxel-to-world affine (RAS mm, as in
nibabel); volumes are in µl (= mm³); connectivity is 26 (faces, edges and corners) everywhere,
so that a thin oblique lesion is one lesion even on thick slices, where 6-connectivity would
break it into several and inflate lesion counts.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from smoulder.grids import voxel_sizes, voxel_volume_mm3
from smoulder.images import save_json, save_text
from smoulder.segmentation.classes import CLASSES

#: Labels of smoulder's tissue segmentation (``_dseg``): class name (lower case) → label, e.g.
#: ``background`` 0, ``csf`` 1, ``cortical_gm`` 2, ``deep_gm`` 3, ``wm`` 4, ``lesion`` 5.
TISSUE_LABELS: dict[str, int] = {name.lower(): index for index, name in enumerate(CLASSES)}

#: Lesion locations of :func:`lesion_table`, with their meaning (the ``Levels`` of the TSV).
LOCATIONS: dict[str, str] = {
    "infratentorial": "more than half of the lesion inside the infratentorial mask "
    "(brainstem, cerebellum, fourth ventricle; smoulder segment: the shipped MNI152 prior, "
    "registered affinely to the brain, at probability >= 0.5)",
    "periventricular": "touching, or within periventricular_mm of, ventricular CSF",
    "juxtacortical": "touching, or within juxtacortical_mm of, cortical grey matter "
    "(cortical/juxtacortical in McDonald 2017)",
    "deep_white_matter": "none of the above",
    "unknown": "no tissue segmentation was available to place the lesion",
}

#: Columns of the lesion table, as BIDS describes them in the TSV's JSON sidecar.
LESION_COLUMNS: dict[str, dict[str, Any]] = {
    "index": {"Description": "lesion ID: the label of the lesion in the instance map"},
    "centroid_i": {"Description": "centroid, first voxel axis (0-based index)", "Units": "voxel"},
    "centroid_j": {"Description": "centroid, second voxel axis (0-based index)", "Units": "voxel"},
    "centroid_k": {"Description": "centroid, third voxel axis (0-based index)", "Units": "voxel"},
    "centroid_x_mm": {"Description": "centroid, world x (RAS: towards right)", "Units": "mm"},
    "centroid_y_mm": {"Description": "centroid, world y (RAS: towards anterior)", "Units": "mm"},
    "centroid_z_mm": {"Description": "centroid, world z (RAS: towards superior)", "Units": "mm"},
    "volume_ul": {"Description": "lesion volume (voxel count times voxel volume)", "Units": "uL"},
    "n_voxels": {"Description": "number of voxels of the lesion"},
    "location": {"Description": "lesion location (McDonald-2017-like)", "Levels": LOCATIONS},
    "mean_probability": {"Description": "mean lesion probability over the lesion's voxels"},
    "max_probability": {"Description": "highest lesion probability in the lesion"},
}


@dataclass(frozen=True)
class LocationRules:
    """The distances (mm) by which :func:`lesion_table` places a lesion.

    Location (one per lesion, first rule that holds, McDonald 2017 / MAGNIMS 2016-like):

    1. ``infratentorial``: more than half of the lesion's voxels in the infratentorial mask
       (brainstem and cerebellum, e.g. from an atlas). Without the mask no lesion is.
    2. ``periventricular``: the lesion touches ventricular CSF (a 26-neighbour) or a voxel of
       it lies within :attr:`periventricular_mm` of one (3 mm: voxel-centre distances, so at
       1 mm up to two voxels of white matter between lesion and ventricle).
    3. ``juxtacortical``: cortical grey matter lies within :attr:`juxtacortical_mm` of the
       lesion (2 mm), not counting the grey matter that touches the lesion: the edge between a
       bright lesion and darker white matter has grey matter's intensity, so segmentations put
       a shell of "grey matter" around every lesion. At 1 mm the cortex must therefore reach
       the second ring of voxels around the lesion, as it does when the lesion abuts the
       cortex (McDonald: no white matter between them). Lesions inside the cortex are counted
       here too (McDonald's cortical/juxtacortical).
    4. ``deep_white_matter``: anything else. Without a tissue segmentation a lesion that is not
       infratentorial or (given a ventricle mask) periventricular is ``unknown``.

    Ventricular CSF is the ventricle mask when given (e.g. from a parcellation: prefer it).
    Otherwise the segmentation has one CSF class for ventricles and sulci, and the
    ventricles are taken as the CSF voxels farther than :attr:`ventricle_margin_mm` from both
    background and cortical grey matter (sulcal and outer CSF always lie against cortex or
    outside the brain; ventricles are walled by white and deep grey matter), in groups of at
    least 200 µl (smaller ones are perivascular spaces). Lateral-ventricle voxels close to the
    cortex (temporal horns by the hippocampus, if that is labelled cortex) are lost, which
    only matters for lesions touching those voxels alone.
    """

    #: largest lesion–ventricle distance of a periventricular lesion
    periventricular_mm: float = 3.0
    #: largest lesion–cortex distance of a juxtacortical lesion
    juxtacortical_mm: float = 2.0
    #: distance from background and cortex beyond which CSF counts as ventricular
    ventricle_margin_mm: float = 5.0


_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
Box = tuple[slice, ...]
# Ventricle candidates smaller than this are dilated perivascular spaces or segmentation specks
# labelled CSF, not ventricles (lateral ventricles are several ml, the third ventricle ~1 ml).
_MIN_VENTRICLE_UL = 200.0


def lesion_instances(
    prob: np.ndarray,
    affine: np.ndarray,
    *,
    threshold: float = 0.5,
    min_volume_ul: float = 10.0,
    min_voxels: int = 3,
    split: bool = True,
    core_threshold: float = 0.9,
    min_core_ul: float = 3.0,
) -> np.ndarray:
    """Return the lesion instance map of ``prob``: int32, 0 outside lesions, lesions 1..N.

    1. Voxels with ``prob >= threshold`` are lesion; 26-connected groups of them are
       candidate lesions, and those under ``min_volume_ul`` *or* under ``min_voxels`` voxels
       are dropped.
    2. With ``split``, a candidate is split where it holds two or more *cores*: 26-connected
       groups of voxels with ``prob >= core_threshold`` of at least ``min_core_ul`` each.
       Every voxel goes to the core it floods from (watershed of ``-prob`` from the cores,
       inside the candidate), so two lesions joined by a bridge of lower probability become
       two. A split is kept only if every part still reaches that minimum; otherwise the
       core with the smallest part is dropped and the flooding redone.
    3. IDs follow the world position of the lesion centroid, inferior to superior (z), then
       posterior to anterior (y), then left to right (x), each rounded to 0.1 mm, ties going
       to the larger lesion: flipping or permuting the voxel axes (with the matching affine)
       numbers the same lesions alike.

    Defaults: ``min_volume_ul = 10`` µl (10 voxels at 1 mm, a sphere of 2.7 mm diameter) sits
    just under the 3 mm long-axis size MAGNIMS asks of a lesion and removes the speckle that
    segmenters leave at tissue boundaries. On a coarse grid one voxel is already more than
    10 µl (27 µl at 3 mm), so the size is stated in voxels too: ``min_voxels = 3``, the
    field's usual smallest lesion, keeps single noisy voxels and pairs from counting as
    lesions whatever the voxel size. ``core_threshold = 0.9`` keeps cores to where the
    segmenter is confident; ``min_core_ul = 3`` µl stops single noisy maxima from splitting a
    lesion.

    Args:
        prob: 3D lesion probability map (a binary mask works too: values 0 and 1).
        affine: 4×4 voxel-to-world affine of ``prob`` (voxel volume, world order of IDs).
        threshold: probability at and above which a voxel is lesion.
        min_volume_ul: smallest lesion kept, µl (mm³).
        min_voxels: smallest lesion kept, voxels (both minimums apply).
        split: split confluent lesions at separate probability cores.
        core_threshold: probability at and above which a voxel belongs to a core
            (above ``threshold``).
        min_core_ul: smallest core that may start a lesion of its own, µl.

    Raises:
        ValueError: ``prob`` is not 3D, ``affine`` not 4×4, or a threshold or size is invalid.

    Examples:
        >>> prob = np.zeros((20, 8, 8), np.float32)
        >>> prob[2:6, 2:6, 2:6] = 0.95      # 64 µl at x = 3.5 mm
        >>> prob[12:16, 2:6, 2:6] = 0.8     # 64 µl at x = 13.5 mm
        >>> prob[18, 7, 7] = 1.0            # 1 µl: dropped
        >>> inst = lesion_instances(prob, np.eye(4))
        >>> int(inst.max()), int(inst[3, 3, 3]), int(inst[13, 3, 3]), int(inst[18, 7, 7])
        (2, 1, 2, 0)
        >>> # on a 3-mm grid one voxel is 27 µl, yet still no lesion: fewer than 3 voxels
        >>> int(lesion_instances(prob, np.diag([3.0, 3, 3, 1]))[18, 7, 7])
        0
        >>> # IDs follow world x, not the array: with x flipped the lesion at voxel 13 comes first
        >>> flipped = lesion_instances(prob, np.diag([-1.0, 1, 1, 1]))
        >>> int(flipped[3, 3, 3]), int(flipped[13, 3, 3])
        (2, 1)
    """
    prob = _checked_volume(prob, "prob")
    affine = _checked_affine(affine)
    if not core_threshold > threshold:
        raise ValueError(
            f"core_threshold: expected a value above threshold ({threshold}), "
            f"found {core_threshold!r}"
        )
    for name, value in (("min_volume_ul", min_volume_ul), ("min_core_ul", min_core_ul)):
        if not value >= 0:
            raise ValueError(f"{name}: expected a volume >= 0 µl, found {value!r}")
    if not (isinstance(min_voxels, (int, np.integer)) and min_voxels >= 1):
        raise ValueError(f"min_voxels: expected a whole number >= 1, found {min_voxels!r}")
    voxel_ul = _voxel_volume_ul(affine)
    # the voxel count as a volume, a hair under so that exactly min_voxels voxels pass
    min_volume_ul = max(float(min_volume_ul), (min_voxels - 0.5) * voxel_ul)
    components, _ = ndimage.label(prob >= threshold, structure=_FULL)
    out = np.zeros(prob.shape, dtype=np.int32)
    next_id = 1
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        component = components[box] == index
        if np.count_nonzero(component) * voxel_ul < min_volume_ul:
            continue
        parts = (
            _split_at_cores(
                prob[box], component, voxel_ul, core_threshold, min_core_ul, min_volume_ul
            )
            if split
            else component.astype(np.int32)
        )
        n_parts = int(parts.max())
        view = out[box]
        view[parts > 0] = parts[parts > 0] + (next_id - 1)
        next_id += n_parts
    return _renumber_by_world_position(out, affine)


def drop_outside_white_matter(
    prob: np.ndarray,
    wm_prob: np.ndarray,
    *,
    threshold: float = 0.5,
    min_wm: float = 0.2,
    ring_voxels: int = 2,
) -> np.ndarray:
    """Return ``prob`` with candidate lesions that do not touch white matter set to 0.

    MS white-matter lesions lie in or against the white matter (juxtacortical ones touch
    it too). A candidate (26-connected group of ``prob >= threshold``) whose surrounding
    shell of ``ring_voxels`` has a mean white-matter probability under ``min_wm`` is enclosed
    by cortex or CSF: a bright sulcus, vessel or choroid plexus, not a white-matter lesion.

    Args:
        prob: 3D lesion probability.
        wm_prob: 3D white-matter probability on the same grid.
        threshold: lesion threshold (as :func:`lesion_instances`).
        min_wm: smallest mean white-matter probability of the shell.
        ring_voxels: shell thickness, voxels.

    Examples:
        >>> p = np.zeros((30, 10, 10), np.float32); wm = np.zeros_like(p); wm[:15] = 1.0
        >>> p[5:8, 4:7, 4:7] = 0.75; p[20:23, 4:7, 4:7] = 0.75  # one in WM, one in cortex
        >>> out = drop_outside_white_matter(p, wm)
        >>> float(out[6, 5, 5]), float(out[21, 5, 5])
        (0.75, 0.0)
    """
    prob = _checked_volume(prob, "prob")
    wm_prob = _checked_volume(wm_prob, "wm_prob")
    if wm_prob.shape != prob.shape:
        raise ValueError(f"wm_prob: expected shape {prob.shape}, found {wm_prob.shape}")
    out = prob.copy()
    for box, component, shell in _components_with_shells(prob >= threshold, ring_voxels):
        if shell.any() and float(wm_prob[box][shell].mean()) < min_wm:
            out[box][component] = 0.0
    return out


def lesion_table(
    instances: np.ndarray,
    affine: np.ndarray,
    prob: np.ndarray | None = None,
    tissue_dseg: np.ndarray | None = None,
    *,
    tissue_labels: Mapping[str, int] = TISSUE_LABELS,
    infratentorial_mask: np.ndarray | None = None,
    ventricle_mask: np.ndarray | None = None,
    rules: LocationRules = LocationRules(),
) -> list[dict[str, Any]]:
    """Return one row per lesion of ``instances``, by ID (columns: :data:`LESION_COLUMNS`).

    Each lesion's location is the first of :class:`LocationRules` that holds.

    Args:
        instances: 3D integer instance map (0: background), e.g. from :func:`lesion_instances`.
        affine: 4×4 voxel-to-world affine of the maps.
        prob: the lesion probability map on the same grid; without it the probability columns
            are ``None`` (``n/a`` in the TSV).
        tissue_dseg: 3D integer tissue segmentation on the same grid, labelled as
            ``tissue_labels`` says.
        tissue_labels: class name → label; needs ``background``, ``csf`` and ``cortical_gm``.
        infratentorial_mask: boolean map of brainstem and cerebellum on the same grid.
        ventricle_mask: boolean map of the ventricles on the same grid (overrides the CSF
            heuristic).
        rules: the distances of the location rules.

    Raises:
        ValueError: maps of different shapes, a non-integer or negative instance map, or
            ``tissue_labels`` missing a class.

    Examples:
        >>> inst = np.zeros((10, 10, 10), np.int32)
        >>> inst[2:4, 2:4, 2:4] = 1
        >>> rows = lesion_table(inst, np.diag([0.5, 1.0, 3.0, 1.0]))
        >>> r = rows[0]
        >>> r["index"], r["n_voxels"], r["volume_ul"], r["centroid_z_mm"], r["location"]
        (1, 8, 12.0, 7.5, 'unknown')
    """
    labels = _checked_instances(instances)
    affine = _checked_affine(affine)
    masks = {"infratentorial_mask": infratentorial_mask, "ventricle_mask": ventricle_mask}
    _check_shapes(labels.shape, {"prob": prob, "tissue_dseg": tissue_dseg, **masks})
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        return []
    voxel_ul = _voxel_volume_ul(affine)
    counts, centroids_ijk = _centroids(labels, int(ids.max()))
    counts, centroids_ijk = counts[ids], centroids_ijk[ids]
    centroids_xyz = centroids_ijk @ affine[:3, :3].T + affine[:3, 3]
    tissues = None if tissue_dseg is None else _tissue_masks(tissue_dseg, tissue_labels)
    locations = _locations(labels, ids, affine, tissues, infratentorial_mask, ventricle_mask, rules)
    means, maxima = _probability_stats(labels, ids, prob)
    rows = []
    for n, lesion in enumerate(ids):
        ijk, xyz = centroids_ijk[n], centroids_xyz[n]
        rows.append(
            {
                "index": int(lesion),
                "centroid_i": float(ijk[0]),
                "centroid_j": float(ijk[1]),
                "centroid_k": float(ijk[2]),
                "centroid_x_mm": float(xyz[0]),
                "centroid_y_mm": float(xyz[1]),
                "centroid_z_mm": float(xyz[2]),
                "volume_ul": float(counts[n] * voxel_ul),
                "n_voxels": int(counts[n]),
                "location": locations[n],
                "mean_probability": means[n],
                "max_probability": maxima[n],
            }
        )
    return rows


def write_lesion_stats(
    rows: Sequence[Mapping[str, Any]],
    path_tsv: str | Path,
    columns: Mapping[str, Mapping[str, Any]] = LESION_COLUMNS,
) -> Path:
    """Return ``path_tsv`` after writing ``rows`` there as a TSV, with its JSON dictionary.

    The columns are those of :data:`LESION_COLUMNS`, in that order, whatever the rows hold,
    so that a session without lesions still gets a TSV with its header line (and the JSON).
    Missing values (``None``, NaN) are written ``n/a``; floats keep 4 decimals. Both files are
    written atomically, the JSON first, so a TSV under its final name always has its sidecar.

    Args:
        rows: lesion rows, as :func:`lesion_table` returns them.
        path_tsv: destination ``.tsv``; the JSON goes beside it with the same stem.
        columns: the column dictionary (:data:`LESION_COLUMNS`, or it with later steps'
            columns, such as :data:`smoulder.rims.assess.RIM_COLUMNS`).

    Raises:
        ValueError: ``path_tsv`` does not end in ``.tsv``, or a row lacks a column or has one
            that ``columns`` does not describe.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "sub-01_desc-lesions_stats.tsv"
        >>> _ = write_lesion_stats([], out)
        >>> out.read_text().split("\\t")[:3], out.with_suffix(".json").is_file()
        (['index', 'centroid_i', 'centroid_j'], True)
    """
    path = Path(path_tsv)
    if path.suffix != ".tsv":
        raise ValueError(f"path_tsv: expected a file name ending in .tsv, found {path.name!r}")
    names = list(columns)
    for n, row in enumerate(rows):
        missing = [c for c in names if c not in row]
        unknown = [c for c in row if c not in columns]
        if missing or unknown:
            raise ValueError(
                f"row {n}: expected the columns {names}, found "
                f"{'missing ' + str(missing) if missing else ''}"
                f"{' and ' if missing and unknown else ''}"
                f"{'unknown ' + str(unknown) if unknown else ''}"
            )
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([_tsv_value(row[c]) for c in names])
    save_json(dict(columns), path.with_suffix(".json"))
    return save_text(buf.getvalue(), path)


def fill_lesions(
    t1: np.ndarray,
    lesion_mask: np.ndarray,
    wm_mask: np.ndarray,
    *,
    shell_voxels: int = 3,
    min_shell_voxels: int = 30,
    rng_seed: int = 0,
) -> np.ndarray:
    """Return a copy of ``t1`` whose lesion voxels hold normal-appearing white matter values.

    Lesions (T1-hypointense in MS) bias tissue segmentation towards grey matter and so bias
    atrophy measures; filling them first removes that bias. As in FSL's ``lesion_filling``
    (Battaglini et al. 2012), each lesion — a 26-connected group of ``lesion_mask`` voxels —
    gets values drawn at random, with replacement, from the normal-appearing white matter
    (``wm_mask`` outside every lesion) in a shell ``shell_voxels`` wide around it, so the
    filled voxels carry the local white matter intensity (bias field included) and its
    spread. Where that shell holds fewer than ``min_shell_voxels`` voxels, the draw is from all
    normal-appearing white matter. The same inputs and ``rng_seed`` give the same output.

    Args:
        t1: 3D T1-weighted image.
        lesion_mask: 3D map on the same grid; nonzero voxels are lesion (a binary mask or an
            instance map).
        wm_mask: 3D map on the same grid; nonzero voxels are white matter (lesions in it or
            not: they are excluded here).
        shell_voxels: width of the shell around each lesion, voxels (26-connected dilation).
        min_shell_voxels: fewest shell voxels to draw from before falling back to all
            normal-appearing white matter.
        rng_seed: seed of the random draw.

    Raises:
        ValueError: shapes differ, or there is no normal-appearing white matter to draw from
            while there are lesions.

    Examples:
        >>> t1 = np.full((9, 9, 9), 100.0)
        >>> lesion = np.zeros(t1.shape, bool)
        >>> lesion[3:6, 3:6, 3:6] = True
        >>> t1[lesion] = 40.0
        >>> filled = fill_lesions(t1, lesion, np.ones(t1.shape, bool))
        >>> float(filled[lesion].min()), bool(np.all(filled[~lesion] == t1[~lesion]))
        (100.0, True)
    """
    image = _checked_volume(t1, "t1", dtype=None)
    lesions = np.asarray(lesion_mask) != 0
    for name, other in (("lesion_mask", lesions), ("wm_mask", wm_mask)):
        if np.shape(other) != image.shape:
            raise ValueError(
                f"{name}: expected the shape of t1 {image.shape}, found {np.shape(other)}"
            )
    if shell_voxels < 1:
        raise ValueError(f"shell_voxels: expected at least 1, found {shell_voxels!r}")
    out = image.copy()
    if not lesions.any():
        return out
    nawm = (np.asarray(wm_mask) != 0) & ~lesions
    if not nawm.any():
        raise ValueError(
            "wm_mask: expected normal-appearing white matter outside the lesions, found none"
        )
    rng = np.random.default_rng(rng_seed)
    for box, lesion, shell in _components_with_shells(lesions, shell_voxels):
        pool = image[box][shell & nawm[box]]
        if pool.size < min_shell_voxels:
            pool = image[nawm]
        view = out[box]
        view[lesion] = rng.choice(pool, size=int(np.count_nonzero(lesion)), replace=True)
    return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _components_with_shells(
    mask: np.ndarray, width: int
) -> Iterator[tuple[Box, np.ndarray, np.ndarray]]:
    """Yield ``(box, component, shell)`` for each 26-connected component of ``mask``.

    ``box`` is the component's bounding box grown by ``width`` voxels (within the array);
    ``component`` and ``shell`` are boolean maps of that box: the component, and the voxels
    within ``width`` 26-connected dilations of it that are not part of it.
    """
    components, _ = ndimage.label(mask, structure=_FULL)
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        wide = _padded(box, width, mask.shape)
        component = components[wide] == index
        shell = ndimage.binary_dilation(component, _FULL, iterations=width) & ~component
        yield wide, component, shell


def _split_at_cores(
    prob: np.ndarray,
    component: np.ndarray,
    voxel_ul: float,
    core_threshold: float,
    min_core_ul: float,
    min_volume_ul: float,
) -> np.ndarray:
    """Return ``component`` as parts 1..m (int32), one per core that survives (see caller)."""
    from skimage.segmentation import watershed

    cores, n = ndimage.label(component & (prob >= core_threshold), structure=_FULL)
    sizes_ul = np.bincount(cores.ravel(), minlength=n + 1)[1:] * voxel_ul
    keep = [k + 1 for k in range(n) if sizes_ul[k] >= min_core_ul]
    while len(keep) >= 2:
        lookup = np.zeros(n + 1, dtype=np.int32)
        lookup[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
        markers = lookup[cores]
        parts = watershed(-prob, markers, mask=component, connectivity=3).astype(np.int32)
        part_ul = np.bincount(parts.ravel(), minlength=len(keep) + 1)[1:] * voxel_ul
        if part_ul.min() >= min_volume_ul:
            return parts
        del keep[int(np.argmin(part_ul))]
    return component.astype(np.int32)


def _renumber_by_world_position(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Return ``labels`` renumbered 1..N by world centroid (z, y, x at 0.1 mm), then size."""
    n = int(labels.max())
    if n == 0:
        return labels
    counts, centroids = _centroids(labels, n)
    present = np.flatnonzero(counts[1:]) + 1
    world = centroids[present] @ affine[:3, :3].T + affine[:3, 3]
    rounded = np.round(world, 1) + 0.0  # + 0.0: -0.0 and 0.0 sort alike
    # np.lexsort sorts by the last key first
    order = np.lexsort((present, -counts[present], rounded[:, 0], rounded[:, 1], rounded[:, 2]))
    lookup = np.zeros(n + 1, dtype=np.int32)
    lookup[present[order]] = np.arange(1, present.size + 1, dtype=np.int32)
    return lookup[labels]


def _centroids(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(voxel counts (n + 1,), voxel centroids (n + 1, 3))`` of labels 0..n (0 unset)."""
    where = np.nonzero(labels > 0)
    ids = labels[where]
    counts = np.bincount(ids, minlength=n + 1)
    centroids = np.zeros((n + 1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        for axis in range(3):
            centroids[:, axis] = np.bincount(ids, weights=where[axis], minlength=n + 1) / counts
    centroids[counts == 0] = np.nan
    return counts, centroids


def _check_shapes(shape: tuple[int, ...], maps: Mapping[str, np.ndarray | None]) -> None:
    """Raise ValueError naming the first of the given ``maps`` whose shape is not ``shape``."""
    for name, other in maps.items():
        if other is not None and np.shape(other) != shape:
            raise ValueError(
                f"{name}: expected the shape of instances {shape}, found {np.shape(other)}"
            )


def _probability_stats(
    labels: np.ndarray, ids: np.ndarray, prob: np.ndarray | None
) -> tuple[list[float | None], list[float | None]]:
    """Return the mean and the highest ``prob`` of each lesion in ``ids`` (``None`` without it)."""
    if prob is None:
        return [None] * ids.size, [None] * ids.size
    inside = labels > 0  # per-lesion statistics over lesion voxels only: much faster
    values = np.asarray(prob, dtype=np.float64)[inside]
    means: list[float | None] = [float(v) for v in ndimage.mean(values, labels[inside], ids)]
    maxima: list[float | None] = [float(v) for v in ndimage.maximum(values, labels[inside], ids)]
    return means, maxima


def _tissue_masks(
    tissue_dseg: np.ndarray, tissue_labels: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Return the ``background``, ``csf`` and ``cortical_gm`` masks of a tissue segmentation.

    Raises:
        ValueError: ``tissue_labels`` lacks one of them.
    """
    wanted = ("background", "csf", "cortical_gm")
    missing = [c for c in wanted if c not in tissue_labels]
    if missing:
        raise ValueError(
            f"tissue_labels: expected labels for background, csf and cortical_gm, "
            f"found none for {', '.join(missing)}"
        )
    dseg = np.asarray(tissue_dseg)
    return {c: dseg == tissue_labels[c] for c in wanted}


def _locations(
    labels: np.ndarray,
    ids: np.ndarray,
    affine: np.ndarray,
    tissues: dict[str, np.ndarray] | None,
    infratentorial_mask: np.ndarray | None,
    ventricle_mask: np.ndarray | None,
    rules: LocationRules,
) -> list[str]:
    """Return the location of each lesion in ``ids`` (:class:`LocationRules`).

    ``tissues`` holds the masks of :func:`_tissue_masks`, or is ``None`` without a tissue
    segmentation.
    """
    zooms = voxel_sizes(affine)
    infratentorial = np.zeros(ids.size, dtype=bool)
    if infratentorial_mask is not None:
        lesion = labels > 0
        inside = (np.asarray(infratentorial_mask)[lesion] != 0).astype(np.float64)
        infratentorial = np.asarray(ndimage.mean(inside, labels[lesion], ids)) > 0.5
    cortex = None if tissues is None else tissues["cortical_gm"]
    ventricles = None if ventricle_mask is None else np.asarray(ventricle_mask) != 0
    if tissues is not None and ventricles is None:
        ventricles = _ventricles_from_csf(
            tissues, zooms, rules.ventricle_margin_mm, _voxel_volume_ul(affine)
        )
    periventricular = _near(labels, ids, ventricles, rules.periventricular_mm, zooms)
    juxtacortical = _near(labels, ids, cortex, rules.juxtacortical_mm, zooms, skip_touching=True)
    otherwise = "deep_white_matter" if tissues is not None else "unknown"
    out = []
    for k in range(ids.size):
        if infratentorial[k]:
            out.append("infratentorial")
        elif periventricular[k]:
            out.append("periventricular")
        elif juxtacortical[k]:
            out.append("juxtacortical")
        else:
            out.append(otherwise)
    return out


def _ventricles_from_csf(
    tissues: dict[str, np.ndarray], zooms: np.ndarray, margin_mm: float, voxel_ul: float
) -> np.ndarray:
    """Return the CSF voxels beyond ``margin_mm`` of background and cortex, in large groups.

    ``tissues`` holds the masks of :func:`_tissue_masks`.
    """
    csf, background, cortex = tissues["csf"], tissues["background"], tissues["cortical_gm"]
    deep = csf.copy()
    boxes = ndimage.find_objects(csf.astype(np.int8))
    if not boxes or boxes[0] is None:
        return deep
    # farther than margin_mm from background and cortex = farther than that from their union;
    # walls beyond margin_mm of every CSF voxel do not count, so the CSF box, padded, will do
    box = _padded(boxes[0], (np.ceil(margin_mm / zooms) + 1).astype(int).tolist(), csf.shape)
    wall = background[box] | cortex[box]
    if wall.any():
        deep[box] &= ndimage.distance_transform_edt(~wall, sampling=zooms) > margin_mm
    groups, n = ndimage.label(deep, structure=_FULL)
    if n == 0:
        return deep
    large = np.bincount(groups.ravel(), minlength=n + 1) * voxel_ul >= _MIN_VENTRICLE_UL
    large[0] = False
    return large[groups]


def _near(
    labels: np.ndarray,
    ids: np.ndarray,
    tissue: np.ndarray | None,
    distance_mm: float,
    zooms: np.ndarray,
    *,
    skip_touching: bool = False,
) -> np.ndarray:
    """Return, per lesion, whether it touches ``tissue`` or lies within ``distance_mm`` of it.

    With ``skip_touching`` the tissue voxels touching the lesion (26-neighbours) do not count:
    only tissue beyond them, within ``distance_mm``, does.
    """
    near = np.zeros(ids.size, dtype=bool)
    if tissue is None or not tissue.any():
        return near
    # Within a box padded by distance_mm (and one voxel to see touching), the distances up to
    # distance_mm are exact: a whole-volume distance map would cost seconds at 1 mm.
    pad = np.ceil(distance_mm / zooms).astype(int) + 1
    boxes = ndimage.find_objects(labels)
    for n, lesion_id in enumerate(ids):
        box = boxes[lesion_id - 1]
        if box is None:
            continue
        wide = _padded(box, pad.tolist(), labels.shape)
        wall = tissue[wide]
        if not wall.any():
            continue
        lesion = labels[wide] == lesion_id
        edge = ndimage.binary_dilation(lesion, structure=_FULL)
        if skip_touching:
            wall = wall & ~edge
            if not wall.any():
                continue
        elif (edge & wall).any():
            near[n] = True
            continue
        distance = ndimage.distance_transform_edt(~wall, sampling=zooms)
        near[n] = float(distance[lesion].min()) <= distance_mm + 1e-6
    return near


def _checked_volume(data: np.ndarray, name: str, dtype: type | None = np.float32) -> np.ndarray:
    arr = np.asarray(data) if dtype is None else np.asarray(data, dtype=dtype)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3D array, found {arr.ndim}D shape {arr.shape}")
    return arr


def _checked_instances(instances: np.ndarray) -> np.ndarray:
    arr = np.asarray(instances)
    if arr.ndim != 3:
        raise ValueError(f"instances: expected a 3D array, found {arr.ndim}D shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise ValueError("instances: expected integer labels, found fractional values")
        arr = rounded
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"instances: expected labels >= 0, found {int(arr.min())}")
    return arr


def _checked_affine(affine: np.ndarray) -> np.ndarray:
    arr = np.asarray(affine, dtype=float)
    if arr.shape != (4, 4):
        raise ValueError(f"affine: expected a 4x4 matrix, found shape {arr.shape}")
    return arr


def _voxel_volume_ul(affine: np.ndarray) -> float:
    """Return the voxel volume (µl = mm³) to 12 significant digits.

    The determinant's rounding noise (1.5000000000000002) goes, so volumes print as they are.
    """
    return float(f"{voxel_volume_mm3(affine):.12g}")


def _padded(
    box: tuple[slice, ...], pad: int | Sequence[int], shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """Return ``box`` grown by ``pad`` voxels (per axis, or the same on all), within ``shape``."""
    pads = [int(pad)] * len(box) if isinstance(pad, (int, np.integer)) else [int(p) for p in pad]
    return tuple(
        slice(max(s.start - p, 0), min(s.stop + p, n))
        for s, p, n in zip(box, pads, shape, strict=True)
    )


def _tsv_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "n/a"
        return repr(round(float(value), 4) + 0.0)
    return str(value)
