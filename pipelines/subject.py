"""The subject workflow: what needs two or more sessions of one subject.

Methods (atrophy adds its nodes here):

1. Pairs of sessions (every later session with the first, or each with the one before) are
   registered symmetrically through a halfway space, deformably by default
   (:func:`smoulder.registration.engines.halfway`), FLAIR to FLAIR (the sessions' conformed
   references). Each direction is published as one ITK displacement field.
2. The Jacobian determinant of the earlier → later map, and its logarithm, on the earlier
   session's grid (> 1: local expansion from the earlier to the later session).
3. The within-subject space where lesions are compared: for two sessions the halfway space of
   step 1 (no second registration), for three or more an unbiased template
   (:func:`smoulder.longitudinal.space.subject_template`). Each session's map from it is
   published (``from-longitudinal``).
5. Atrophy (:func:`smoulder.atrophy.subject.subject_atrophy`), when segmentation runs, on its
   own within-subject registration of the references coarsened to ``atrophy.registration_mm``
   (else the space of step 3): PBVC by Jacobian integration and by boundary shift, grey-matter
   change over the joint grey-matter map, and the cord area at one level for all sessions,
   published as ``sub-X_desc-atrophy_stats.tsv``.
4. Lesion activity (:func:`smoulder.longitudinal.activity.lesion_activity`), when segmentation
   runs: one ID per lesion for the subject, its fate per interval (new, enlarging, stable,
   shrinking, resolved, merged, split) decided on both sessions' images, slowly expanding
   lesions with the subject's noise floor, and the rim calls of the sessions' lesion tables;
   published as ``sub-X_desc-lesions_longitudinal.tsv`` (lesion × session),
   ``sub-X_desc-activity_longitudinal.tsv`` (per interval) and maps on the within-subject grid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nipype.interfaces.utility import IdentityInterface, Merge, Select
from nipype.pipeline import engine as pe

from smoulder.pipelines.interfaces import (
    HalfwayRegister,
    JacobianMaps,
    LesionActivity,
    SubjectAtrophy,
    SubjectTemplate,
)
from smoulder.pipelines.session import REFERENCE, SESSION_OUTPUTS, WorkflowContext

if TYPE_CHECKING:
    from smoulder.config import AtrophySettings, LongitudinalRegistration, LongitudinalSettings

#: Space label of the within-subject grid in derivative names.
WITHIN_SUBJECT = "longitudinal"

#: Name of the subject's longitudinal workflow in the graph (and of its work-directory folder).
SUBJECT_WF = "subject_wf"


def session_order(sessions: Sequence[str]) -> list[str]:
    """Return session labels in time order as their labels give it (numbers compared as numbers).

    Examples:
        >>> session_order(["10", "2", "1"])
        ['1', '2', '10']
        >>> session_order(["m12", "m6", "baseline"])
        ['baseline', 'm6', 'm12']
    """

    def key(label: str) -> list[tuple[int, int | str]]:
        return [(0, int(t)) if t.isdigit() else (1, t) for t in re.findall(r"\d+|\D+", label)]

    return sorted(sessions, key=key)


def session_pairs(sessions: Sequence[str], *, mode: str = "baseline") -> list[tuple[str, str]]:
    """Return the ``(earlier, later)`` session pairs registered for a subject.

    Args:
        sessions: session labels (any order; see :func:`session_order`).
        mode: ``baseline`` (every later session with the first) or ``consecutive`` (each with
            the one before).

    Examples:
        >>> session_pairs(["01", "02", "03"])
        [('01', '02'), ('01', '03')]
        >>> session_pairs(["03", "01", "02"], mode="consecutive")
        [('01', '02'), ('02', '03')]
        >>> session_pairs(["01"])
        []
    """
    ordered = session_order(sessions)
    if mode == "baseline":
        return [(ordered[0], later) for later in ordered[1:]]
    if mode == "consecutive":
        return list(zip(ordered[:-1], ordered[1:], strict=True))
    raise ValueError(f"session pairs: expected 'baseline' or 'consecutive', found {mode!r}")


def init_subject_wf(
    *,
    subject: str,
    sessions: Sequence[str],
    context: WorkflowContext,
    registration: LongitudinalRegistration,
    activity: LongitudinalSettings | None = None,
    atrophy: AtrophySettings | None = None,
    with_t1: bool = False,
    name: str = SUBJECT_WF,
) -> pe.Workflow:
    """Return the longitudinal workflow of one subject with two or more sessions.

    Args:
        subject: subject label (without ``sub-``).
        sessions: session labels (at least two).
        context: the run's folders, engine, device, seed, threads and reference volume size.
        registration: the longitudinal registration settings: ``pairs`` (``baseline`` or
            ``consecutive``, see :func:`session_pairs`), ``transform`` (``deformable``,
            ``affine`` or ``rigid``), ``resolution_mm`` (estimate the registration on images
            coarsened to this voxel size; ``None``: on the images as they are; the outputs keep
            each session's grid).
        activity: the lesion-activity settings (the configuration's ``longitudinal``
            section); ``None``: no lesion activity (segmentation off).
        atrophy: the atrophy settings; ``None``: no within-subject PBVC, grey-matter and cord
            change (segmentation off).
        with_t1: every session has a T1w (or UNIT1) on its FLAIR grid (the lesions' T1 change).
        name: workflow name.

    Inputs (``inputnode``):
        <output>_<session>: each session workflow's outputs (:data:`SESSION_OUTPUTS`).
    """
    if len(sessions) < 2:
        raise ValueError(f"init_subject_wf: expected two or more sessions, found {list(sessions)}")
    ordered = session_order(sessions)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=[f"{o}_{s}" for s in ordered for o in SESSION_OUTPUTS]),
        name="inputnode",
    )
    # with segmentation, the within-subject grids cover the first session's brain and a
    # margin, not the neck and the air around the head
    segmented = activity is not None or atrophy is not None
    halfways = {
        (a, b): _add_pair(wf, inputnode, context, registration, subject, a, b, segmented)
        for a, b in session_pairs(sessions, mode=registration.pairs)
    }
    with_activity = activity is not None and activity.enabled
    own_space = atrophy is not None and atrophy.registration_mm is not None
    if not with_activity and (atrophy is None or own_space):
        if atrophy is not None:
            _add_atrophy(wf, inputnode, None, context, subject, ordered, atrophy, with_t1)
        return wf
    if len(ordered) == 2:
        space, field = halfways[ordered[0], ordered[1]], "space_files"
    else:
        template = _add_template(wf, inputnode, context, registration, ordered, segmented)
        space, field = template, "space_files"
    if with_activity:
        assert activity is not None
        _add_activity(wf, inputnode, (space, field), context, subject, ordered, activity, with_t1)
    if atrophy is not None:
        _add_atrophy(wf, inputnode, (space, field), context, subject, ordered, atrophy, with_t1)
    return wf


def _add_pair(
    wf: pe.Workflow,
    inputnode: pe.Node,
    context: WorkflowContext,
    settings: LongitudinalRegistration,
    subject: str,
    a: str,
    b: str,
    segmented: bool = False,
) -> pe.Node:
    """Return the halfway registration of sessions ``a`` and ``b`` (earlier, later), after
    adding it, its Jacobian maps (on ``a``'s grid) and their sinks; ``segmented``: its grid
    covers ``a``'s brain mask and a margin."""
    pair = f"{a}_{b}"
    halfway = pe.Node(
        HalfwayRegister(
            transform=settings.transform,
            resolution_mm=settings.resolution_mm or 0.0,
            labels=[a, b],
            finest=settings.finest,
            **context.registration_inputs(),
        ),
        name=f"halfway_{pair}",
        n_procs=context.n_procs,
        mem_gb=context.memory_gb("halfway"),
    )
    jacobian = pe.Node(
        JacobianMaps(), name=f"jacobian_{pair}", mem_gb=context.memory_gb("jacobian")
    )
    wf.connect([
        (inputnode, halfway, [(f"reference_{a}", "in_a"), (f"reference_{b}", "in_b")]),
        (inputnode, jacobian, [(f"reference_{a}", "reference")]),
        (halfway, jacobian, [("xfm_a_to_b", "in_xfm")]),
    ])  # fmt: skip
    if segmented:
        wf.connect(inputnode, f"brain_mask_{a}", halfway, "region_a")
    references = {s: context.reference_file(subject, s) for s in (a, b)}
    later = {"sub": subject, "ses": b}
    # each direction is published on the grid of the session it resamples onto
    for src, dst, output in ((a, b, "xfm_b_to_a"), (b, a, "xfm_a_to_b")):
        sink = context.sink(
            f"ds_xfm_{src}_to_{dst}",
            entities={**later, "from": f"ses{src}", "to": f"ses{dst}", "mode": "image"},
            suffix="xfm",
            sources=list(references.values()),
            spatial_reference=references[dst],
            metadata={
                "Description": f"{settings.transform} halfway registration of ses-{a} and "
                f"ses-{b} ({REFERENCE}); ITK displacement field on the ses-{dst} reference "
                f"grid, resampling ses-{src} images onto it"
            },
        )
        wf.connect(halfway, output, sink, "in_file")
    _add_jacobian_sinks(wf, jacobian, context, later, a, b, references)
    return halfway


def _add_template(
    wf: pe.Workflow,
    inputnode: pe.Node,
    context: WorkflowContext,
    settings: LongitudinalRegistration,
    sessions: Sequence[str],
    segmented: bool = False,
) -> pe.Node:
    """Return the within-subject template node of three or more sessions (time order);
    ``segmented``: its grid covers the first session's brain mask and a margin."""
    template = pe.Node(
        SubjectTemplate(
            labels=list(sessions),
            transform=settings.transform,
            finest=settings.finest,
            resolution_mm=settings.resolution_mm or 0.0,
            **context.registration_inputs(),
        ),
        name="template",
        n_procs=context.n_procs,
        mem_gb=context.memory_gb("halfway", volumes=len(sessions)),
    )
    refs = pe.Node(Merge(len(sessions)), name="merge_references", run_without_submitting=True)
    for k, s in enumerate(sessions, start=1):
        wf.connect(inputnode, f"reference_{s}", refs, f"in{k}")
    wf.connect(refs, "out", template, "in_files")
    if segmented:
        wf.connect(inputnode, f"brain_mask_{sessions[0]}", template, "region")
    return template


#: The lesion-activity inputs fed from the session workflows: (session output, input).
_ACTIVITY_INPUTS = (
    ("reference", "flair_files"),
    ("lesions", "lesion_files"),
    ("probseg_lesion", "lesion_probseg_files"),
    ("probseg_wm", "wm_probseg_files"),
    ("brain_mask", "brain_mask_files"),
    ("lesion_stats", "lesion_stats_files"),
)


def _add_activity(
    wf: pe.Workflow,
    inputnode: pe.Node,
    space: tuple[pe.Node, str],
    context: WorkflowContext,
    subject: str,
    sessions: Sequence[str],
    settings: LongitudinalSettings,
    with_t1: bool,
) -> None:
    """Add the lesion-activity node, its inputs from every session, and its sinks."""
    from dataclasses import asdict

    node = pe.Node(
        LesionActivity(
            labels=list(sessions),
            bids_dir=str(context.bids_dir),
            subject=subject,
            settings=asdict(settings),
        ),
        name="lesion_activity",
        mem_gb=context.memory_gb("jacobian", volumes=2 * len(sessions)),
    )
    wf.connect(space[0], space[1], node, "space_files")
    inputs = _ACTIVITY_INPUTS + ((("t1", "t1_files"),) if with_t1 else ())
    for output, field in inputs:
        merge = pe.Node(Merge(len(sessions)), name=f"merge_{output}", run_without_submitting=True)
        for k, s in enumerate(sessions, start=1):
            wf.connect(inputnode, f"{output}_{s}", merge, f"in{k}")
        wf.connect(merge, "out", node, field)
    references = [context.reference_file(subject, s) for s in sessions]
    tables = (
        ("lesions", "lesions", "lesion x session: persistent lesion IDs, fates, SEL, rims"),
        ("intervals", "activity", "per interval: new, enlarging, SEL and PRL counts"),
    )
    for key, desc, text in tables:
        sink = context.sink(
            f"ds_{key}_longitudinal",
            entities={"sub": subject, "desc": desc},
            suffix="longitudinal",
            sources=references,
            metadata={"Description": text},
        )
        wf.connect([(node, sink, [(f"{key}_table", "in_file"), (f"{key}_metadata", "metadata")])])
    _add_activity_map_sinks(wf, node, context, subject, sessions, references)
    for k, s in enumerate(sessions):
        pick = pe.Node(Select(index=[k]), name=f"pick_space_{s}", run_without_submitting=True)
        sink = context.sink(
            f"ds_xfm_longitudinal_to_{s}",
            entities={"sub": subject, "ses": s, "from": WITHIN_SUBJECT, "to": f"ses{s}",
                      "mode": "image"},
            suffix="xfm",
            sources=list(references),
            metadata={"Description": f"ITK displacement field on the within-subject grid "
                      f"mapping its points to ses-{s} points: resamples ses-{s} images onto "
                      "the grid of the longitudinal maps"},
        )  # fmt: skip
        wf.connect(
            [(space[0], pick, [("session_maps", "inlist")]), (pick, sink, [("out", "in_file")])]
        )


#: The atrophy inputs fed from the session workflows: (session output, input).
_ATROPHY_INPUTS = (
    ("reference", "flair_files"),
    ("probseg_gm", "gm_probseg_files"),
    ("probseg_wm", "wm_probseg_files"),
    ("probseg_lesion", "lesion_probseg_files"),
    ("atrophy_stats", "stats_files"),
)


def _add_atrophy(
    wf: pe.Workflow,
    inputnode: pe.Node,
    space: tuple[pe.Node, str] | None,
    context: WorkflowContext,
    subject: str,
    sessions: Sequence[str],
    settings: AtrophySettings,
    with_t1: bool,
) -> None:
    """Add the within-subject atrophy node, its inputs from every session, and its sink."""
    from dataclasses import asdict

    node = pe.Node(
        SubjectAtrophy(
            labels=list(sessions),
            bids_dir=str(context.bids_dir),
            subject=subject,
            settings=asdict(settings),
            **context.registration_inputs(),
        ),
        name="atrophy",
        n_procs=context.n_procs,
        mem_gb=context.memory_gb("halfway", volumes=len(sessions)),
    )
    if settings.registration_mm is None and space is not None:  # the lesion-activity space
        wf.connect(space[0], space[1], node, "space_files")
    inputs = _ATROPHY_INPUTS + ((("t1", "t1_files"),) if with_t1 else ())
    for output, field in inputs:
        merge = pe.Node(
            Merge(len(sessions)), name=f"merge_atrophy_{output}", run_without_submitting=True
        )
        for k, s in enumerate(sessions, start=1):
            wf.connect(inputnode, f"{output}_{s}", merge, f"in{k}")
        wf.connect(merge, "out", node, field)
    sink = context.sink(
        "ds_atrophy_stats",
        entities={"sub": subject, "desc": "atrophy"},
        suffix="stats",
        sources=[context.reference_file(subject, s) for s in sessions],
        metadata={
            "Description": "per session: volumes and cord area; per interval: PBVC, grey-"
            "matter and cord area change within the subject, yearly rates and classes"
        },
    )
    wf.connect([(node, sink, [("stats", "in_file"), ("metadata", "metadata")])])


def _add_activity_map_sinks(
    wf: pe.Workflow,
    node: pe.Node,
    context: WorkflowContext,
    subject: str,
    sessions: Sequence[str],
    references: Sequence[Path],
) -> None:
    """Add the sinks of the activity maps on the within-subject grid (one file per session or
    per interval, named by its later session)."""
    later = list(sessions[1:])
    kinds = (
        ("label_files", sessions, "lesions", "dseg",
         "persistent lesion IDs (the longitudinal table's lesion_id)"),
        ("change_files", later, "change", "mask",
         "new and enlarging lesion voxels since the session before"),
        ("expansion_files", later, "expansion", "map",
         "local volume change since the session before (Jacobian ratio), %/year (%/interval "
         "without dates)"),
        ("sel_files", later, "SEL", "mask",
         "candidates of the lesions called slowly expanding, since their first session"),
    )  # fmt: skip
    for output, labels, desc, suffix, text in kinds:
        for k, s in enumerate(labels):
            pick = pe.Node(
                Select(index=[k]), name=f"pick_{output}_{s}", run_without_submitting=True
            )
            sink = context.sink(
                f"ds_{desc.lower()}_{s}_longitudinal",
                entities={"sub": subject, "ses": s, "space": WITHIN_SUBJECT, "desc": desc},
                suffix=suffix,
                sources=list(references),
                metadata={"Description": text},
            )
            wf.connect([(node, pick, [(output, "inlist")]), (pick, sink, [("out", "in_file")])])


def _add_jacobian_sinks(
    wf: pe.Workflow,
    jacobian: pe.Node,
    context: WorkflowContext,
    later: dict[str, Any],
    a: str,
    b: str,
    references: dict[str, Path],
) -> None:
    """Add the sinks of the Jacobian determinant of the ``a`` → ``b`` map and of its log."""
    about = (
        f"of the ses-{a} -> ses-{b} point map on the ses-{a} reference grid "
        f"(> 1: local expansion from ses-{a} to ses-{b})"
    )
    determinant = f"Jacobian determinant {about}"
    for node, desc, description in (
        ("jacobian", "det", determinant),
        (
            "logjacobian",
            "logdet",
            f"natural log of the {determinant}; determinants below 1e-6 (folds) are clipped there",
        ),
    ):
        sink = context.sink(
            f"ds_{node}_{a}_{b}",
            entities={**later, "space": f"ses{a}", "desc": desc},
            suffix="jacobian",
            sources=list(references.values()),
            spatial_reference=references[a],
            metadata={"Description": description, "Units": "1"},
        )
        wf.connect(jacobian, f"{desc}_file", sink, "in_file")
