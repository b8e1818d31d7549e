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
4. QSM of the multi-echo GRE on its own grid, inside the brain mask mapped into GRE space
   (:func:`smoulder.qsm.masks.session_masks`, :func:`smoulder.qsm.reconstruct.reconstruct`),
   or the session's ready susceptibility map used as is; either resampled onto the FLAIR.
5. Derivatives: the conformed reference, each transform (ITK ``.mat``), each resampled image and
   the segmentation and QSM outputs, on the FLAIR grid unless named otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from smoulder.derivatives import DerivativesWriter
from smoulder.pipelines.interfaces import (
    QSM,
    AssessLesions,
    Conform,
    CoRegister,
    FillLesions,
    MapChimap,
    Segment,
    SessionAtrophy,
    derivatives_node,
)
from smoulder.segmentation.outputs import OUTPUTS

if TYPE_CHECKING:
    import os

    from smoulder.config import (
        AtrophySettings,
        QSMSettings,
        RimsSettings,
        SegmentationSettings,
        SessionRegistration,
    )

#: The modality every other image of a session is aligned to.
REFERENCE = "FLAIR"

#: What a session workflow's ``outputnode`` gives the subject's longitudinal workflow (all on the
#: session's FLAIR grid; all but ``reference`` only when segmentation runs, ``t1`` only with a
#: T1w or UNIT1).
SESSION_OUTPUTS = [
    "reference", "lesions", "probseg_lesion", "probseg_wm", "brain_mask", "t1", "lesion_stats",
    "probseg_gm", "atrophy_stats",
]  # fmt: skip

#: The segmentation's outputs the session workflow hands on (same names on both sides).
_SEGMENTATION_OUTPUTS = ("lesions", "probseg_lesion", "probseg_wm", "brain_mask", "probseg_gm")

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


@dataclass(frozen=True)
class WorkflowContext:
    """What every workflow of a run shares: its folders, engine, device, seed and resources.

    Args:
        output_dir: the BIDS-App output folder (made absolute: Nipype runs every node in its own
            folder).
        bids_dir: the input BIDS dataset, for the ``Sources`` of sidecars (made absolute).
        engine: registration engine, resolved (``greedy``, ``torch``, ``fireants`` or ``ants``).
        device: ``cpu`` or ``cuda``, resolved; ``cuda`` makes the device steps GPU nodes.
        seed: registration seed.
        omp_nthreads: threads per step on the CPU.
        volume_gb: size of one float32 reference volume, for the memory estimates.

    Examples:
        >>> ctx = WorkflowContext("out", "bids", engine="torch", device="cuda", omp_nthreads=4)
        >>> ctx.output_dir.is_absolute(), ctx.n_procs
        (True, 1)
        >>> ctx.reference_file("01", "02").name
        'sub-01_ses-02_desc-preproc_FLAIR.nii.gz'
    """

    output_dir: Path
    bids_dir: Path
    engine: str
    device: str
    seed: int = 0
    omp_nthreads: int = 1
    volume_gb: float = 0.0

    def __post_init__(self) -> None:
        # absolute: Nipype runs every node in its own folder
        object.__setattr__(self, "output_dir", Path(self.output_dir).absolute())
        object.__setattr__(self, "bids_dir", Path(self.bids_dir).absolute())

    @property
    def use_gpu(self) -> bool:
        """Return whether the device steps run on the GPU."""
        return self.device == "cuda"

    @property
    def n_procs(self) -> int:
        """Return the processors a device step takes: one GPU slot, else its CPU threads."""
        return 1 if self.use_gpu else self.omp_nthreads

    def memory_gb(self, step: str, *, volumes: int = 1) -> float:
        """Return the memory estimate of ``step`` on ``volumes`` reference volumes."""
        return step_memory_gb(step, self.volume_gb * volumes)

    def device_inputs(self) -> dict[str, Any]:
        """Return the inputs of a device step: ``device``, ``use_gpu`` and ``num_threads``."""
        return {"device": self.device, "use_gpu": self.use_gpu, "num_threads": self.omp_nthreads}

    def registration_inputs(self) -> dict[str, Any]:
        """Return the inputs of a registration step: engine and seed, then the device's."""
        return {"engine": self.engine, "seed": self.seed, **self.device_inputs()}

    def reference_file(self, subject: str, session: str | None) -> Path:
        """Return the path of a session's published reference (its conformed FLAIR)."""
        writer = DerivativesWriter(self.output_dir, raw_dir=self.bids_dir)
        entities = reference_entities(subject, session)
        return writer.path(entities, suffix=REFERENCE, extension=".nii.gz")

    def sink(
        self,
        name: str,
        *,
        entities: dict[str, Any],
        suffix: str,
        sources: Sequence[str | os.PathLike[str]],
        spatial_reference: str | os.PathLike[str] | None = None,
        metadata: dict[str, Any] | None = None,
        sidecar: bool = True,
    ) -> pe.Node:
        """Return a node publishing its ``in_file`` under this run's output folder."""
        return derivatives_node(
            name,
            output_dir=self.output_dir,
            raw_dir=self.bids_dir,
            entities=entities,
            suffix=suffix,
            sources=list(sources),
            spatial_reference=spatial_reference,
            metadata=metadata,
            sidecar=sidecar,
        )


@dataclass(frozen=True)
class _SessionFiles:
    """One session's labels, input images and published reference, which its sinks cite."""

    subject: str
    session: str | None
    images: dict[str, Path]
    reference_file: Path

    @property
    def entities(self) -> dict[str, Any]:
        """Return the session's entities, ``sub`` and ``ses``."""
        return {"sub": self.subject, "ses": self.session}

    @property
    def sources(self) -> list[Path]:
        """Return every input image of the session."""
        return list(self.images.values())


def init_session_wf(
    *,
    subject: str,
    session: str | None,
    images: Mapping[str, str | Path],
    context: WorkflowContext,
    registration: SessionRegistration,
    segmentation: SegmentationSettings | None = None,
    qsm: QSMSettings | None = None,
    megre_echoes: tuple[list[Path], list[Path]] | None = None,
    chimap: str | Path | None = None,
    rims: RimsSettings | None = None,
    mp2rage: tuple[Path, Path] | None = None,
    atrophy: AtrophySettings | None = None,
    name: str = "session_wf",
) -> pe.Workflow:
    """Return the workflow of one session.

    Args:
        subject: subject label (without ``sub-``).
        session: session label (without ``ses-``), ``None`` in a dataset without sessions.
        images: input files by modality: ``FLAIR`` (required), and any of ``T1w``, ``UNIT1``,
            ``MEGRE`` (the echo-1 magnitude). Only the modalities given get nodes.
        context: the run's folders, engine, device, seed, threads and reference volume size.
        registration: the co-registration settings: ``transform`` (``rigid`` or ``affine``),
            ``metric`` (``mi`` or ``ncc``), ``resolution_mm`` (estimate the transforms on images
            coarsened to this voxel size; ``None``: on the images as they are).
        segmentation: ``model`` (bundle folder, ``None``: shipped), ``min_lesion_ul`` and
            ``refine``; the segmentation step is absent when this is ``None``.
        qsm: ``method`` (``tv`` or ``tkd``) and ``reference``; QSM runs when this is given, the
            session has ``megre_echoes`` and a co-registered MEGRE, and segmentation runs (its
            brain mask).
        megre_echoes: ``(magnitudes, phases)`` of every echo of the session's GRE.
        chimap: a ready susceptibility map of the session: used as is (resampled onto the
            FLAIR) instead of reconstructing QSM, when ``qsm`` is given.
        rims: ``enabled``, ``model`` (rim bundle folder, ``None``: shipped) and ``input``
            (``auto``, ``qsm`` or ``phase``); ``None``: no rim assessment. The lesion step
            (rims where the session has susceptibility data, T1 black holes, qT1) runs whenever
            segmentation does and publishes the lesion table.
        mp2rage: the MP2RAGE INV1 and INV2 images (their sidecars hold the sequence
            parameters): quantitative T1 per lesion from the UNIT1.
        atrophy: with segmentation, the session's volumes and cord area (``desc-atrophy``).
        name: workflow name.

    Outputs (``outputnode``, :data:`SESSION_OUTPUTS`):
        reference: the conformed FLAIR (the session's reference grid).
        lesions, probseg_lesion, probseg_wm, brain_mask: the segmentation's, when it runs.
        t1: the T1w (else the UNIT1) on the FLAIR grid, when there is one.
        lesion_stats: the lesion table with the rim and tissue columns, when segmentation runs.
    """
    if REFERENCE not in images:
        raise ValueError(f"init_session_wf: expected a {REFERENCE} image, found {sorted(images)}")
    files = _SessionFiles(
        subject,
        session,
        # absolute: Nipype runs every node in its own folder
        images={modality: Path(path).absolute() for modality, path in images.items()},
        reference_file=context.reference_file(subject, session),
    )
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=[m.lower() for m in images]), name="inputnode")
    for modality, path in files.images.items():
        setattr(inputnode.inputs, modality.lower(), str(path))
    outputnode = pe.Node(IdentityInterface(fields=SESSION_OUTPUTS), name="outputnode")
    conform_ref = pe.Node(
        Conform(), name=f"conform_{REFERENCE.lower()}", mem_gb=context.memory_gb("conform")
    )
    ds_reference = context.sink(
        f"ds_{REFERENCE.lower()}",
        entities=reference_entities(subject, session),
        suffix=REFERENCE,
        sources=[files.images[REFERENCE]],
        metadata={"Description": "session reference: RAS+ voxel axes, float32, not resampled"},
    )
    wf.connect([
        (inputnode, conform_ref, [(REFERENCE.lower(), "in_file")]),
        (conform_ref, ds_reference, [("out_file", "in_file")]),
        (conform_ref, outputnode, [("out_file", "reference")]),
    ])  # fmt: skip

    coregs = {
        modality: _add_coregistration(
            wf, inputnode, conform_ref, context, files, modality, registration
        )
        for modality in files.images
        if modality != REFERENCE
    }
    if segmentation is None:
        return wf
    seg = _add_segmentation(wf, conform_ref, coregs, context, files, segmentation)
    assess = _add_lesion_assessment(wf, conform_ref, coregs, seg, context, files, rims, mp2rage)
    wf.connect([
        (seg, outputnode, [(name, name) for name in _SEGMENTATION_OUTPUTS]),
        (assess, outputnode, [("lesion_stats", "lesion_stats")]),
    ])  # fmt: skip
    if atrophy is not None and atrophy.enabled:  # its stats: the subject's atrophy input
        _add_atrophy(wf, conform_ref, coregs, seg, context, files, atrophy, outputnode)
    for t1 in ("T1w", "UNIT1"):
        if t1 in coregs:
            wf.connect(coregs[t1], "out_file", outputnode, "t1")
            break
    gre: dict[str, Any] = {}  # the susceptibility inputs of the lesion step
    if megre_echoes is not None and "MEGRE" in coregs:
        gre["magnitude_files"], gre["phase_files"] = (
            [str(Path(p).absolute()) for p in group] for group in megre_echoes
        )
    if qsm is not None and chimap is not None:
        _add_ready_chimap(wf, conform_ref, coregs.get("MEGRE"), context, files, Path(chimap))
        gre["chimap"] = gre["chimap_sidecar"] = str(Path(chimap).absolute())
    elif qsm is not None and megre_echoes is not None and "MEGRE" in coregs:
        node = _add_qsm(wf, conform_ref, coregs["MEGRE"], seg, context, files, megre_echoes, qsm)
        wf.connect([(node, assess, [("chimap", "chimap"), ("qsm_mask", "qsm_mask")])])
        gre["chimap_sidecar"] = gre["phase_files"][-1]
    if rims is not None and rims.enabled and gre:
        for key, value in gre.items():
            setattr(assess.inputs, key, value)
        phase = rims.input == "phase" and bool(gre.get("phase_files"))
        qsm_input = "chimap_sidecar" in gre and not phase
        _add_rims_input_sink(wf, assess, context, files, qsm=qsm_input)
    return wf


def _add_coregistration(
    wf: pe.Workflow,
    inputnode: pe.Node,
    conform_ref: pe.Node,
    context: WorkflowContext,
    files: _SessionFiles,
    modality: str,
    settings: SessionRegistration,
) -> pe.Node:
    """Return the node registering ``modality`` to the reference, after adding it and its sinks.

    Its own conform step feeds it; the transform and the resampled image are published.
    """
    key = modality.lower()
    extra, suffix = MODALITY_ENTITIES[modality]
    transform, metric = settings.transform, settings.metric
    conform = pe.Node(Conform(), name=f"conform_{key}", mem_gb=context.memory_gb("conform"))
    coreg = pe.Node(
        CoRegister(
            transform=transform,
            metric=metric,
            resolution_mm=settings.resolution_mm or 0.0,
            **context.registration_inputs(),
        ),
        name=f"coreg_{key}",
        n_procs=context.n_procs,
        mem_gb=context.memory_gb("coregister"),
    )
    sources = [files.images[modality], files.images[REFERENCE]]
    ds_xfm = context.sink(
        f"ds_{key}_xfm",
        entities={**files.entities, "from": modality, "to": REFERENCE, "mode": "image"},
        suffix="xfm",
        sources=sources,
        metadata={
            "Description": f"{transform} transform ({metric.upper()}) resampling the "
            f"{modality} onto the {REFERENCE}; ITK convention (maps {REFERENCE} points to "
            f"{modality} points)",
        },
    )
    ds_moved = context.sink(
        f"ds_{key}_space_{REFERENCE.lower()}",
        entities={**files.entities, **extra, "space": REFERENCE, "desc": "preproc"},
        suffix=suffix,
        sources=sources,
        spatial_reference=files.reference_file,
        metadata={"Description": f"{modality} resampled onto the {REFERENCE} (linear)"},
    )
    wf.connect([
        (inputnode, conform, [(key, "in_file")]),
        (conform_ref, coreg, [("out_file", "fixed_file")]),
        (conform, coreg, [("out_file", "moving_file")]),
        (coreg, ds_xfm, [("out_xfm", "in_file")]),
        (coreg, ds_moved, [("out_file", "in_file")]),
    ])  # fmt: skip
    return coreg


def _add_segmentation(
    wf: pe.Workflow,
    conform_ref: pe.Node,
    coregs: dict[str, pe.Node],
    context: WorkflowContext,
    files: _SessionFiles,
    settings: SegmentationSettings,
) -> pe.Node:
    """Return the segmentation node (FLAIR + T1w, else UNIT1), after adding it and its sinks."""
    seg = pe.Node(
        Segment(
            model=str(settings.model or ""),
            min_lesion_ul=float(settings.min_lesion_ul),
            min_lesion_voxels=int(settings.min_lesion_voxels),
            refine=bool(settings.refine),
            **context.device_inputs(),
        ),
        name="segment",
        n_procs=context.n_procs,
        mem_gb=context.memory_gb("segment"),
    )
    wf.connect(conform_ref, "out_file", seg, "flair_file")
    for t1 in ("T1w", "UNIT1"):
        if t1 in coregs:
            wf.connect(coregs[t1], "out_file", seg, "t1_file")
            break
    if "T1w" in coregs:  # the lesion-filled T1w: for tissue volumes unbiased by lesions
        _add_lesion_filling(wf, coregs["T1w"], seg, context, files)
    for out in OUTPUTS:
        if out.key == "lesion_stats":  # published by the lesion step, with its columns
            continue
        meta: dict[str, Any] = {"Description": out.description}
        sink = context.sink(
            f"ds_{out.key}",
            entities={**files.entities, **out.entities},
            suffix=out.suffix,
            sources=files.sources,
            spatial_reference=None if out.extension == ".tsv" else files.reference_file,
            metadata=meta,
            sidecar=not out.lookup_table,
        )
        wf.connect(seg, out.key, sink, "in_file")
    return seg


def _add_lesion_assessment(
    wf: pe.Workflow,
    conform_ref: pe.Node,
    coregs: dict[str, pe.Node],
    seg: pe.Node,
    context: WorkflowContext,
    files: _SessionFiles,
    rims: RimsSettings | None,
    mp2rage: tuple[Path, Path] | None,
) -> pe.Node:
    """Return the lesion step (rims, T1 black holes, qT1), after adding it and the lesion
    table's sink; the caller connects the susceptibility inputs."""
    from smoulder.segmentation.outputs import BY_KEY

    node = pe.Node(
        AssessLesions(
            rims=bool(rims is not None and rims.enabled),
            model=str((rims.model if rims else None) or ""),
            input_kind=rims.input if rims else "auto",
            subject=files.subject,
            session=files.session or "",
            **context.device_inputs(),
        ),
        name="assess_lesions",
        n_procs=context.n_procs,
        mem_gb=context.memory_gb("segment"),
    )
    out = BY_KEY["lesion_stats"]
    sink = context.sink(
        "ds_lesion_stats",
        entities={**files.entities, **out.entities},
        suffix=out.suffix,
        sources=files.sources,
    )
    wf.connect([
        (conform_ref, node, [("out_file", "flair_file")]),
        (seg, node, [("lesions", "lesions"), ("lesion_stats", "lesion_stats"),
                     ("brain_mask", "brain_mask"), ("probseg_wm", "wm_probseg"),
                     ("probseg_gm", "gm_probseg")]),
        (node, sink, [("lesion_stats", "in_file"), ("metadata", "metadata")]),
    ])  # fmt: skip
    for t1 in ("T1w", "UNIT1"):
        if t1 in coregs:
            wf.connect(coregs[t1], "out_file", node, "t1_file")
            break
    if "UNIT1" in coregs and mp2rage is not None:
        wf.connect(coregs["UNIT1"], "out_file", node, "unit1_file")
        node.inputs.mp2rage_files = [str(Path(p).absolute()) for p in mp2rage]
    if "MEGRE" in coregs:
        wf.connect(coregs["MEGRE"], "out_xfm", node, "xfm")
    return node


def _add_rims_input_sink(
    wf: pe.Workflow,
    assess: pe.Node,
    context: WorkflowContext,
    files: _SessionFiles,
    *,
    qsm: bool,
) -> None:
    """Publish the susceptibility image the rims were assessed on (GRE grid, paramagnetic
    positive): ``desc-rims_Chimap`` (QSM) or ``part-phase_desc-rims_MEGRE`` (filtered phase),
    and the classified patches (``desc-rims_patches.npz``)."""
    sink = context.sink(
        "ds_rims_input",
        entities={**files.entities, "desc": "rims"} if qsm else
        {**files.entities, "part": "phase", "desc": "rims"},
        suffix="Chimap" if qsm else "MEGRE",
        sources=files.sources,
        metadata={
            "Description": "the image the lesions' rims were assessed on, on the GRE's own "
            "grid, paramagnetic positive (see SignConvention in the lesion table's sidecar)",
            "Units": "ppm" if qsm else "rad",
        },
    )  # fmt: skip
    patches = context.sink(
        "ds_rims_patches",
        entities={**files.entities, "desc": "rims"},
        suffix="patches",
        sources=files.sources,
        metadata={
            "Description": "the classifier's patch and rule-based measures of every assessed "
            "lesion (a rim shard: `smoulder train rims RUN --ratings TSV --shards OUT` "
            "fine-tunes on them); labels 0 until rated"
        },
    )
    wf.connect([
        (assess, sink, [("rims_input", "in_file")]),
        (assess, patches, [("patches", "in_file")]),
    ])  # fmt: skip


def _add_atrophy(
    wf: pe.Workflow,
    conform_ref: pe.Node,
    coregs: dict[str, pe.Node],
    seg: pe.Node,
    context: WorkflowContext,
    files: _SessionFiles,
    settings: AtrophySettings,
    outputnode: pe.Node,
) -> None:
    """Add the session's atrophy step (volumes, cord area), its sinks and its output."""
    from dataclasses import asdict

    node = pe.Node(
        SessionAtrophy(settings=asdict(settings)),
        name="atrophy",
        mem_gb=context.memory_gb("jacobian"),
    )
    wf.connect([
        (conform_ref, node, [("out_file", "flair_file")]),
        (seg, node, [("dseg", "dseg"), ("dseg_tsv", "dseg_tsv"), ("brain_mask", "brain_mask")]),
    ])  # fmt: skip
    for t1 in ("T1w", "UNIT1"):
        if t1 in coregs:
            node.inputs.t1_name = t1
            wf.connect(coregs[t1], "out_file", node, "t1_file")
            break
    ds_stats = context.sink(
        "ds_atrophy_stats",
        entities={**files.entities, "desc": "atrophy"},
        suffix="stats",
        sources=files.sources,
    )
    wf.connect([(node, ds_stats, [("stats", "in_file"), ("metadata", "metadata")])])
    for output, entities, suffix, text in (
        ("cord_probseg", {"label": "cord"}, "probseg", "spinal cord fraction (partial volume)"),
        ("cord_mask", {"desc": "cord"}, "mask", "spinal cord mask (fraction >= 0.5)"),
        ("centreline", {"desc": "cordcentreline"}, "stats",
         "cord centreline per slice: world centre and tangent, distance below the anchor, "
         "angle-corrected area"),
    ):  # fmt: skip
        sink = context.sink(
            f"ds_{output}",
            entities={**files.entities, **entities},
            suffix=suffix,
            sources=files.sources,
            spatial_reference=None if suffix == "stats" else files.reference_file,
            metadata={"Description": text},
        )
        wf.connect(node, output, sink, "in_file")
    wf.connect(node, "stats", outputnode, "atrophy_stats")


def _add_lesion_filling(
    wf: pe.Workflow,
    coreg_t1w: pe.Node,
    seg: pe.Node,
    context: WorkflowContext,
    files: _SessionFiles,
) -> None:
    """Add the T1w with its lesions filled by white matter, and its sink."""
    fill = pe.Node(FillLesions(), name="fill_lesions", mem_gb=context.memory_gb("conform"))
    ds_fill = context.sink(
        "ds_t1w_lesionfilled",
        entities={**files.entities, "space": REFERENCE, "desc": "lesionfilled"},
        suffix="T1w",
        sources=files.sources,
        spatial_reference=files.reference_file,
        metadata={
            "Description": "T1w on the FLAIR grid, lesion voxels replaced by "
            "normal-appearing white matter drawn from around each lesion"
        },
    )
    wf.connect([
        (coreg_t1w, fill, [("out_file", "t1_file")]),
        (seg, fill, [("lesions", "lesions"), ("dseg", "dseg")]),
        (fill, ds_fill, [("out_file", "in_file")]),
    ])  # fmt: skip


def _add_ready_chimap(
    wf: pe.Workflow,
    conform_ref: pe.Node,
    coreg: pe.Node | None,
    context: WorkflowContext,
    files: _SessionFiles,
    chimap: Path,
) -> None:
    """Add the session's ready ``_Chimap``, used as is, on the FLAIR grid."""
    chimap = chimap.absolute()
    node = pe.Node(MapChimap(chimap=str(chimap)), name="map_chimap")
    ds = context.sink(
        "ds_chimap_flair",
        entities={**files.entities, "space": REFERENCE},
        suffix="Chimap",
        sources=[str(chimap)],
        spatial_reference=files.reference_file,
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
    context: WorkflowContext,
    files: _SessionFiles,
    echoes: tuple[list[Path], list[Path]],
    settings: QSMSettings,
) -> pe.Node:
    """Return the QSM node of the session's GRE (native grid), after adding it, its copy on the
    FLAIR grid and their sinks."""
    mags, phases = ([str(Path(p).absolute()) for p in group] for group in echoes)
    node = pe.Node(
        QSM(
            magnitude_files=mags,
            phase_files=phases,
            method=str(settings.method),
            **context.device_inputs(),
        ),
        name="qsm",
        n_procs=context.n_procs,
        mem_gb=context.memory_gb("segment", volumes=len(mags)),
    )
    sources = [*mags, *phases]
    ds_chi = context.sink("ds_chimap", entities=files.entities, suffix="Chimap", sources=sources)
    ds_chi_flair = context.sink(
        "ds_chimap_flair",
        entities={**files.entities, "space": REFERENCE},
        suffix="Chimap",
        sources=sources,
        spatial_reference=files.reference_file,
    )
    wf.connect([
        (conform_ref, node, [("out_file", "flair_file")]),
        (coreg, node, [("out_xfm", "xfm")]),
        (seg, node, [("brain_mask", "brain_mask")]),
        (node, ds_chi, [("chimap", "in_file"), ("parameters", "metadata")]),
        (node, ds_chi_flair, [("chimap_flair", "in_file"), ("parameters", "metadata")]),
    ])  # fmt: skip
    if settings.reference == "csf":
        wf.connect(seg, "probseg_csf", node, "csf_probseg")
    return node
