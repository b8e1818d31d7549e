"""The session workflow: one subject's session, from its input images to its derivatives.

Methods, as they stand (later steps add their nodes here):

1. Every image is checked and conformed: voxel axes reoriented to RAS+, stored as float32,
   without interpolation (:func:`smoulder.images.conform`).
2. The FLAIR is the session reference. The T1w, the UNIT1 and the echo-1 magnitude of the
   multi-echo GRE, when present, are each registered to it (rigid, mutual information by
   default; :func:`smoulder.registration.engines.register`) and resampled onto its grid once.
3. Brain, tissue and lesion segmentation of the FLAIR, with the T1w (else the UNIT1) resampled
   onto it when present (:func:`smoulder.segmentation.inference.segment`): brain mask, tissue
   classes and probabilities, numbered lesions and the per-lesion table.
4. Derivatives: the conformed reference, each transform (ITK ``.mat``), each resampled image and
   the segmentation outputs, all on the FLAIR grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from smoulder.derivatives import DerivativesWriter
from smoulder.pipelines.interfaces import (
    QSM,
    Conform,
    CoRegister,
    FillLesions,
    MapChimap,
    Segment,
    derivatives_node,
)

#: The modality every other image of a session is aligned to.
REFERENCE = "FLAIR"

#: Entities and suffix of each modality's published image (the MEGRE is its echo-1 magnitude).
MODALITY_ENTITIES: dict[str, tuple[dict[str, Any], str]] = {
    "FLAIR": ({}, "FLAIR"),
    "T1w": ({}, "T1w"),
    "UNIT1": ({}, "UNIT1"),
    "MEGRE": ({"echo": 1, "part": "mag"}, "MEGRE"),
}

#: Memory of each step in GB: a base plus a multiple of one float32 reference volume. Fitted
#: (with ~15 % margin) to the peaks ``--resource-monitor`` measured on the phantom at 3 mm and
#: 1 mm (0.04 GB volumes), CPU engines: conform 0.10/0.15, co-registration 0.81/0.97, greedy
#: halfway 0.49/1.60, Jacobian maps 0.64/0.75 GB.
MEMORY_GB = {
    "conform": (0.15, 3.0),
    "coregister": (0.9, 6.0),
    "halfway": (0.5, 35.0),
    "jacobian": (0.7, 6.0),
    "segment": (1.5, 20.0),
}

#: Segmentation derivatives: Segment output → (entities beyond sub/ses, suffix, description).
SEGMENT_DERIVATIVES: dict[str, tuple[dict[str, Any], str, str]] = {
    "brain_mask": ({"desc": "brain"}, "mask", "brain (parenchyma) mask"),
    "dseg": ({}, "dseg", "tissue classes"),
    "dseg_tsv": ({}, "dseg", "index and name of each tissue class"),
    "probseg_csf": ({"label": "CSF"}, "probseg", "CSF probability"),
    "probseg_gm": ({"label": "GM"}, "probseg", "grey-matter (cortical and deep) probability"),
    "probseg_wm": ({"label": "WM"}, "probseg", "white-matter probability"),
    "probseg_lesion": ({"label": "lesion"}, "probseg", "lesion probability"),
    "lesions": ({"desc": "lesions"}, "dseg", "lesion instances, one index per lesion"),
    "lesions_tsv": ({"desc": "lesions"}, "dseg", "index and name of each lesion"),
    "lesion_stats": ({"desc": "lesions"}, "stats", "one row per lesion"),
}


def step_memory_gb(step: str, volume_gb: float) -> float:
    """Return the memory estimate of ``step`` for a reference volume of ``volume_gb``.

    Examples:
        >>> round(step_memory_gb("coregister", 0.04), 2)
        1.14
    """
    base, per_volume = MEMORY_GB[step]
    return base + per_volume * volume_gb


def reference_entities(subject: str, session: str | None) -> dict[str, Any]:
    """Return the entities of a session's published reference image (suffix :data:`REFERENCE`)."""
    return {"sub": subject, "ses": session, "desc": "preproc"}


def init_session_wf(
    *,
    subject: str,
    session: str | None,
    images: Mapping[str, str | Path],
    output_dir: str | Path,
    bids_dir: str | Path,
    engine: str,
    device: str,
    transform: str = "rigid",
    metric: str = "mi",
    resolution_mm: float | None = None,
    seed: int = 0,
    omp_nthreads: int = 1,
    volume_gb: float = 0.0,
    segmentation: Mapping[str, Any] | None = None,
    qsm: Mapping[str, Any] | None = None,
    megre_echoes: tuple[list[Path], list[Path]] | None = None,
    chimap: str | Path | None = None,
    name: str = "session_wf",
) -> pe.Workflow:
    """Return the workflow of one session.

    Args:
        subject: subject label (without ``sub-``).
        session: session label (without ``ses-``), ``None`` in a dataset without sessions.
        images: input files by modality: ``FLAIR`` (required), and any of ``T1w``, ``UNIT1``,
            ``MEGRE`` (the echo-1 magnitude). Only the modalities given get nodes.
        output_dir: the BIDS-App output folder.
        bids_dir: the input BIDS dataset (for the ``Sources`` of sidecars).
        engine: registration engine, resolved (``greedy``, ``torch`` or ``ants``).
        device: ``cpu`` or ``cuda``, resolved; ``cuda`` makes registrations GPU nodes.
        transform: co-registration model, ``rigid`` or ``affine``.
        metric: co-registration metric, ``mi`` or ``ncc``.
        resolution_mm: estimate the transforms on images coarsened to this voxel size (mm);
            ``None``: on the images as they are.
        seed: registration seed.
        omp_nthreads: threads per registration on the CPU.
        volume_gb: size of one float32 reference volume, for the memory estimates.
        segmentation: ``model`` (bundle folder, ``None``: shipped), ``min_lesion_ul`` and
            ``refine``; the segmentation step is absent when this is ``None``.
        qsm: ``method`` (``tv`` or ``tkd``); QSM runs when this is given, the session has
            ``megre_echoes`` and a co-registered MEGRE, and segmentation runs (its brain mask).
        megre_echoes: ``(magnitudes, phases)`` of every echo of the session's GRE.
        chimap: a ready susceptibility map of the session: used as is (resampled onto the
            FLAIR) instead of reconstructing QSM, when ``qsm`` is given.
        name: workflow name.

    Outputs (``outputnode``):
        reference: the conformed FLAIR (the session's reference grid).
    """
    if REFERENCE not in images:
        raise ValueError(f"init_session_wf: expected a {REFERENCE} image, found {sorted(images)}")
    # absolute: Nipype runs every node in its own folder
    output_dir, bids_dir = Path(output_dir).absolute(), Path(bids_dir).absolute()
    images = {modality: Path(path).absolute() for modality, path in images.items()}
    writer = DerivativesWriter(output_dir, raw_dir=bids_dir)
    ses = {"sub": subject, "ses": session}
    use_gpu = device == "cuda"
    reg_procs = 1 if use_gpu else omp_nthreads

    wf = pe.Workflow(name=name)
    fields = [m.lower() for m in images]
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    for modality, path in images.items():
        setattr(inputnode.inputs, modality.lower(), str(path))
    outputnode = pe.Node(IdentityInterface(fields=["reference"]), name="outputnode")

    conform_ref = pe.Node(
        Conform(), name=f"conform_{REFERENCE.lower()}", mem_gb=step_memory_gb("conform", volume_gb)
    )
    reference_file = writer.path(
        reference_entities(subject, session), suffix=REFERENCE, extension=".nii.gz"
    )
    ds_reference = derivatives_node(
        f"ds_{REFERENCE.lower()}",
        output_dir=output_dir,
        raw_dir=bids_dir,
        entities=reference_entities(subject, session),
        suffix=REFERENCE,
        sources=[images[REFERENCE]],
        metadata={"Description": "session reference: RAS+ voxel axes, float32, not resampled"},
    )
    wf.connect([
        (inputnode, conform_ref, [(REFERENCE.lower(), "in_file")]),
        (conform_ref, ds_reference, [("out_file", "in_file")]),
        (conform_ref, outputnode, [("out_file", "reference")]),
    ])  # fmt: skip

    coregs: dict[str, pe.Node] = {}
    for modality in images:
        if modality == REFERENCE:
            continue
        key = modality.lower()
        extra, suffix = MODALITY_ENTITIES[modality]
        conform_mov = pe.Node(
            Conform(), name=f"conform_{key}", mem_gb=step_memory_gb("conform", volume_gb)
        )
        coreg = pe.Node(
            CoRegister(
                transform=transform,
                metric=metric,
                resolution_mm=resolution_mm or 0.0,
                engine=engine,
                device=device,
                seed=seed,
                use_gpu=use_gpu,
                num_threads=omp_nthreads,
            ),
            name=f"coreg_{key}",
            n_procs=reg_procs,
            mem_gb=step_memory_gb("coregister", volume_gb),
        )
        coregs[modality] = coreg
        ds_xfm = derivatives_node(
            f"ds_{key}_xfm",
            output_dir=output_dir,
            raw_dir=bids_dir,
            entities={**ses, "from": modality, "to": REFERENCE, "mode": "image"},
            suffix="xfm",
            sources=[images[modality], images[REFERENCE]],
            metadata={
                "Description": f"{transform} transform ({metric.upper()}) resampling the "
                f"{modality} onto the {REFERENCE}; ITK convention (maps {REFERENCE} points to "
                f"{modality} points)",
            },
        )
        ds_moved = derivatives_node(
            f"ds_{key}_space_{REFERENCE.lower()}",
            output_dir=output_dir,
            raw_dir=bids_dir,
            entities={**ses, **extra, "space": REFERENCE, "desc": "preproc"},
            suffix=suffix,
            sources=[images[modality], images[REFERENCE]],
            spatial_reference=reference_file,
            metadata={"Description": f"{modality} resampled onto the {REFERENCE} (linear)"},
        )
        wf.connect([
            (inputnode, conform_mov, [(key, "in_file")]),
            (conform_ref, coreg, [("out_file", "fixed_file")]),
            (conform_mov, coreg, [("out_file", "moving_file")]),
            (coreg, ds_xfm, [("out_xfm", "in_file")]),
            (coreg, ds_moved, [("out_file", "in_file")]),
        ])  # fmt: skip
    if segmentation is not None:
        _add_segmentation(
            wf, conform_ref, coregs, subject=subject, session=session, output_dir=output_dir,
            bids_dir=bids_dir, device=device, omp_nthreads=omp_nthreads, volume_gb=volume_gb,
            reference_file=reference_file, sources=[images[m] for m in images],
            settings=segmentation,
        )  # fmt: skip
        if qsm is not None and chimap is not None:
            _add_ready_chimap(
                wf, conform_ref, coregs.get("MEGRE"), Path(chimap).absolute(), subject=subject,
                session=session, output_dir=output_dir, bids_dir=bids_dir,
                reference_file=reference_file,
            )  # fmt: skip
        elif qsm is not None and megre_echoes is not None and "MEGRE" in coregs:
            _add_qsm(
                wf, conform_ref, coregs["MEGRE"], wf.get_node("segment"), subject=subject,
                session=session, output_dir=output_dir, bids_dir=bids_dir, device=device,
                omp_nthreads=omp_nthreads, volume_gb=volume_gb, reference_file=reference_file,
                echoes=megre_echoes, settings=qsm,
            )  # fmt: skip
    return wf


def _add_ready_chimap(
    wf: pe.Workflow,
    conform_ref: pe.Node,
    coreg: pe.Node | None,
    chimap: Path,
    *,
    subject: str,
    session: str | None,
    output_dir: Path,
    bids_dir: Path,
    reference_file: Path,
) -> None:
    """Add the session's ready ``_Chimap``, used as is, on the FLAIR grid."""
    node = pe.Node(MapChimap(chimap=str(chimap)), name="map_chimap")
    ds = derivatives_node(
        "ds_chimap_flair",
        output_dir=output_dir,
        raw_dir=bids_dir,
        entities={"sub": subject, "ses": session, "space": REFERENCE},
        suffix="Chimap",
        sources=[str(chimap)],
        spatial_reference=reference_file,
    )
    wf.connect([
        (conform_ref, node, [("out_file", "flair_file")]),
        (node, ds, [("chimap_flair", "in_file"), ("parameters", "metadata")]),
    ])  # fmt: skip
    if coreg is not None:
        wf.connect(coreg, "out_xfm", node, "xfm")


def _add_qsm(
    wf: pe.Workflow,
    conform_ref: pe.Node,
    coreg: pe.Node,
    seg: pe.Node,
    *,
    subject: str,
    session: str | None,
    output_dir: Path,
    bids_dir: Path,
    device: str,
    omp_nthreads: int,
    volume_gb: float,
    reference_file: Path,
    echoes: tuple[list[Path], list[Path]],
    settings: Mapping[str, Any],
) -> None:
    """Add QSM of the session's GRE (native grid) and its copy on the FLAIR grid."""
    use_gpu = device == "cuda"
    mags, phases = ([str(Path(p).absolute()) for p in group] for group in echoes)
    node = pe.Node(
        QSM(
            magnitude_files=mags,
            phase_files=phases,
            method=str(settings.get("method", "tv")),
            device=device,
            use_gpu=use_gpu,
            num_threads=omp_nthreads,
        ),
        name="qsm",
        n_procs=1 if use_gpu else omp_nthreads,
        mem_gb=step_memory_gb("segment", volume_gb * len(mags)),
    )
    sources = [*mags, *phases]
    ses = {"sub": subject, "ses": session}
    ds_chi = derivatives_node(
        "ds_chimap",
        output_dir=output_dir,
        raw_dir=bids_dir,
        entities=ses,
        suffix="Chimap",
        sources=sources,
    )
    ds_chi_flair = derivatives_node(
        "ds_chimap_flair",
        output_dir=output_dir,
        raw_dir=bids_dir,
        entities={**ses, "space": REFERENCE},
        suffix="Chimap",
        sources=sources,
        spatial_reference=reference_file,
    )
    wf.connect([
        (conform_ref, node, [("out_file", "flair_file")]),
        (coreg, node, [("out_xfm", "xfm")]),
        (seg, node, [("brain_mask", "brain_mask")]),
        (node, ds_chi, [("chimap", "in_file"), ("parameters", "metadata")]),
        (node, ds_chi_flair, [("chimap_flair", "in_file"), ("parameters", "metadata")]),
    ])  # fmt: skip
    if settings.get("reference", "csf") == "csf":
        wf.connect(seg, "probseg_csf", node, "csf_probseg")


def _add_segmentation(
    wf: pe.Workflow,
    conform_ref: pe.Node,
    coregs: dict[str, pe.Node],
    *,
    subject: str,
    session: str | None,
    output_dir: Path,
    bids_dir: Path,
    device: str,
    omp_nthreads: int,
    volume_gb: float,
    reference_file: Path,
    sources: list[Path],
    settings: Mapping[str, Any],
) -> None:
    """Add the segmentation node (FLAIR + T1w, else UNIT1, when present) and its sinks."""
    use_gpu = device == "cuda"
    seg = pe.Node(
        Segment(
            model=str(settings.get("model") or ""),
            min_lesion_ul=float(settings.get("min_lesion_ul", 10.0)),
            refine=bool(settings.get("refine", True)),
            device=device,
            use_gpu=use_gpu,
            num_threads=omp_nthreads,
        ),
        name="segment",
        n_procs=1 if use_gpu else omp_nthreads,
        mem_gb=step_memory_gb("segment", volume_gb),
    )
    wf.connect(conform_ref, "out_file", seg, "flair_file")
    for t1 in ("T1w", "UNIT1"):
        if t1 in coregs:
            wf.connect(coregs[t1], "out_file", seg, "t1_file")
            break
    if "T1w" in coregs:  # the lesion-filled T1w: for tissue volumes unbiased by lesions
        fill = pe.Node(
            FillLesions(), name="fill_lesions", mem_gb=step_memory_gb("conform", volume_gb)
        )
        ds_fill = derivatives_node(
            "ds_t1w_lesionfilled",
            output_dir=output_dir,
            raw_dir=bids_dir,
            entities={"sub": subject, "ses": session, "space": REFERENCE, "desc": "lesionfilled"},
            suffix="T1w",
            sources=sources,
            spatial_reference=reference_file,
            metadata={
                "Description": "T1w on the FLAIR grid, lesion voxels replaced by "
                "normal-appearing white matter drawn from around each lesion"
            },
        )
        wf.connect([
            (coregs["T1w"], fill, [("out_file", "t1_file")]),
            (seg, fill, [("lesions", "lesions"), ("dseg", "dseg")]),
            (fill, ds_fill, [("out_file", "in_file")]),
        ])  # fmt: skip
    from smoulder.segmentation.lesions import LESION_COLUMNS

    for trait, (extra, suffix, description) in SEGMENT_DERIVATIVES.items():
        meta: dict[str, Any] = {"Description": description}
        if trait == "lesion_stats":
            meta.update(LESION_COLUMNS)
        sink = derivatives_node(
            f"ds_{trait}",
            output_dir=output_dir,
            raw_dir=bids_dir,
            entities={"sub": subject, "ses": session, **extra},
            suffix=suffix,
            sources=sources,
            spatial_reference=None if trait.endswith(("_tsv", "_stats")) else reference_file,
            metadata=meta,
        )
        wf.connect(seg, trait, sink, "in_file")
