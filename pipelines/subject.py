"""The subject workflow: what needs two or more sessions of one subject.

Methods, as they stand (lesion matching, SEL, atrophy and the longitudinal tables add their
nodes here):

1. Pairs of sessions (every later session with the first, or each with the one before) are
   registered symmetrically through a halfway space, deformably by default
   (:func:`smoulder.registration.engines.halfway`), FLAIR to FLAIR (the sessions' conformed
   references). Each direction is published as one ITK displacement field.
2. The Jacobian determinant of the earlier → later map, and its logarithm, on the earlier
   session's grid (> 1: local expansion from the earlier to the later session).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from smoulder.pipelines.interfaces import HalfwayRegister, JacobianMaps
from smoulder.pipelines.session import REFERENCE, WorkflowContext

if TYPE_CHECKING:
    from smoulder.config import LongitudinalRegistration

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
        name: workflow name.

    Inputs (``inputnode``):
        reference_<session>: each session's conformed reference (from its session workflow).
    """
    if len(sessions) < 2:
        raise ValueError(f"init_subject_wf: expected two or more sessions, found {list(sessions)}")
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=[f"reference_{s}" for s in sessions]), name="inputnode"
    )
    for a, b in session_pairs(sessions, mode=registration.pairs):
        _add_pair(wf, inputnode, context, registration, subject, a, b)
    return wf


def _add_pair(
    wf: pe.Workflow,
    inputnode: pe.Node,
    context: WorkflowContext,
    settings: LongitudinalRegistration,
    subject: str,
    a: str,
    b: str,
) -> None:
    """Add the halfway registration of sessions ``a`` and ``b`` (earlier, later) and its sinks.

    The Jacobian maps of the ``a`` → ``b`` map are on ``a``'s grid.
    """
    pair = f"{a}_{b}"
    halfway = pe.Node(
        HalfwayRegister(
            transform=settings.transform,
            resolution_mm=settings.resolution_mm or 0.0,
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
