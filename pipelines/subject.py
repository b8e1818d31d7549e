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

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from smoulder.derivatives import DerivativesWriter
from smoulder.pipelines.interfaces import HalfwayRegister, JacobianMaps, derivatives_node
from smoulder.pipelines.session import REFERENCE, reference_entities, step_memory_gb


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
    output_dir: str | Path,
    bids_dir: str | Path,
    engine: str,
    device: str,
    pairs: str = "baseline",
    transform: str = "deformable",
    resolution_mm: float | None = None,
    seed: int = 0,
    omp_nthreads: int = 1,
    volume_gb: float = 0.0,
    name: str = "longitudinal_wf",
) -> pe.Workflow:
    """Return the longitudinal workflow of one subject with two or more sessions.

    Args:
        subject: subject label (without ``sub-``).
        sessions: session labels (at least two).
        output_dir: the BIDS-App output folder.
        bids_dir: the input BIDS dataset.
        engine: registration engine, resolved (``greedy``, ``torch`` or ``ants``).
        device: ``cpu`` or ``cuda``, resolved; ``cuda`` with ``torch`` makes GPU nodes.
        pairs: ``baseline`` or ``consecutive`` (see :func:`session_pairs`).
        transform: ``deformable``, ``affine`` or ``rigid``.
        resolution_mm: estimate the registration on images coarsened to this voxel size (mm);
            ``None``: on the images as they are. The outputs keep each session's grid.
        seed: registration seed.
        omp_nthreads: threads per registration on the CPU.
        volume_gb: size of one float32 reference volume, for the memory estimates.
        name: workflow name.

    Inputs (``inputnode``):
        reference_<session>: each session's conformed reference (from its session workflow).
    """
    if len(sessions) < 2:
        raise ValueError(f"init_subject_wf: expected two or more sessions, found {list(sessions)}")
    # absolute: Nipype runs every node in its own folder
    output_dir, bids_dir = Path(output_dir).absolute(), Path(bids_dir).absolute()
    writer = DerivativesWriter(output_dir, raw_dir=bids_dir)
    use_gpu = device == "cuda"

    def reference(session: str) -> Path:
        return writer.path(
            reference_entities(subject, session), suffix=REFERENCE, extension=".nii.gz"
        )

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=[f"reference_{s}" for s in sessions]), name="inputnode"
    )
    for a, b in session_pairs(sessions, mode=pairs):
        pair = f"{a}_{b}"
        sa, sb = f"ses{a}", f"ses{b}"
        later = {"sub": subject, "ses": b}
        derived = [reference(a), reference(b)]
        halfway = pe.Node(
            HalfwayRegister(
                transform=transform,
                resolution_mm=resolution_mm or 0.0,
                engine=engine,
                device=device,
                seed=seed,
                use_gpu=use_gpu,
                num_threads=omp_nthreads,
            ),
            name=f"halfway_{pair}",
            n_procs=1 if use_gpu else omp_nthreads,
            mem_gb=step_memory_gb("halfway", volume_gb),
        )
        jacobian = pe.Node(
            JacobianMaps(), name=f"jacobian_{pair}", mem_gb=step_memory_gb("jacobian", volume_gb)
        )
        ds_a_onto_b = derivatives_node(
            f"ds_xfm_{a}_to_{b}",
            output_dir=output_dir,
            raw_dir=bids_dir,
            entities={**later, "from": sa, "to": sb, "mode": "image"},
            suffix="xfm",
            sources=derived,
            spatial_reference=reference(b),
            metadata={
                "Description": f"{transform} halfway registration of ses-{a} and ses-{b} "
                f"({REFERENCE}); ITK displacement field on the ses-{b} reference grid, "
                f"resampling ses-{a} images onto it"
            },
        )
        ds_b_onto_a = derivatives_node(
            f"ds_xfm_{b}_to_{a}",
            output_dir=output_dir,
            raw_dir=bids_dir,
            entities={**later, "from": sb, "to": sa, "mode": "image"},
            suffix="xfm",
            sources=derived,
            spatial_reference=reference(a),
            metadata={
                "Description": f"{transform} halfway registration of ses-{a} and ses-{b} "
                f"({REFERENCE}); ITK displacement field on the ses-{a} reference grid, "
                f"resampling ses-{b} images onto it"
            },
        )
        jacobian_meta = (
            f"of the ses-{a} -> ses-{b} point map on the ses-{a} reference grid "
            f"(> 1: local expansion from ses-{a} to ses-{b})"
        )
        ds_det = derivatives_node(
            f"ds_jacobian_{pair}",
            output_dir=output_dir,
            raw_dir=bids_dir,
            entities={**later, "space": sa, "desc": "det"},
            suffix="jacobian",
            sources=derived,
            spatial_reference=reference(a),
            metadata={"Description": f"Jacobian determinant {jacobian_meta}", "Units": "1"},
        )
        ds_logdet = derivatives_node(
            f"ds_logjacobian_{pair}",
            output_dir=output_dir,
            raw_dir=bids_dir,
            entities={**later, "space": sa, "desc": "logdet"},
            suffix="jacobian",
            sources=derived,
            spatial_reference=reference(a),
            metadata={
                "Description": f"natural log of the Jacobian determinant {jacobian_meta}; "
                "determinants below 1e-6 (folds) are clipped there",
                "Units": "1",
            },
        )
        wf.connect([
            (inputnode, halfway, [(f"reference_{a}", "in_a"), (f"reference_{b}", "in_b")]),
            (inputnode, jacobian, [(f"reference_{a}", "reference")]),
            (halfway, jacobian, [("xfm_a_to_b", "in_xfm")]),
            (halfway, ds_a_onto_b, [("xfm_b_to_a", "in_file")]),
            (halfway, ds_b_onto_a, [("xfm_a_to_b", "in_file")]),
            (jacobian, ds_det, [("det_file", "in_file")]),
            (jacobian, ds_logdet, [("logdet_file", "in_file")]),
        ])  # fmt: skip
    return wf
