"""The participant workflow: every selected subject's sessions, then its longitudinal steps.

Layout of the graph (and of the work directory, Nipype's cache)::

    smoulder_wf/
      sub_<s>_wf/
        ses_<y>_wf/         init_session_wf, one per usable session
        subject_wf/         init_subject_wf, when the subject has two or more usable sessions
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from nipype.pipeline import engine as pe

from smoulder.inputs import SessionInputs, session_label
from smoulder.pipelines.session import (
    REFERENCE,
    SESSION_OUTPUTS,
    WorkflowContext,
    init_session_wf,
)
from smoulder.pipelines.subject import init_subject_wf

if TYPE_CHECKING:
    from smoulder.config import Config

#: The :class:`SessionInputs` attribute holding each modality.
_ATTRIBUTE = {"FLAIR": "flair", "T1w": "t1w", "UNIT1": "unit1", "MEGRE": "megre_mag"}


@dataclass
class SessionPlan:
    """What a session's workflow gets: its images by modality, or why it is skipped."""

    subject: str
    session: str | None
    images: dict[str, Path] = field(default_factory=dict)
    skipped: str | None = None
    #: every echo's magnitude and phase of the GRE, when both are usable (for QSM)
    megre_echoes: tuple[list[Path], list[Path]] | None = None
    chimap: Path | None = None
    #: the MP2RAGE's INV1 and INV2 (their sidecars: quantitative T1), with a usable UNIT1
    mp2rage: tuple[Path, Path] | None = None

    @property
    def label(self) -> str:
        """Return ``sub-<s>[_ses-<y>]``."""
        return session_label(self.subject, self.session)


def plan_sessions(
    sessions: Sequence[SessionInputs], *, modalities: Sequence[str]
) -> list[SessionPlan]:
    """Return one plan per validated session: the usable images, or the reason to skip it.

    A session needs a usable FLAIR (its reference); the other images (``modalities`` among
    T1w, UNIT1, MEGRE — the echo-1 magnitude) join when present and usable, and are left out
    when validation found them unusable.
    """
    plans = []
    for s in sessions:
        plan = SessionPlan(s.subject, s.session)
        usable = set(s.usable)
        if "flair" not in usable:
            plan.skipped = (
                "FLAIR unusable (see the input errors)"
                if s.flair is not None
                else "no FLAIR (the session reference)"
            )
        else:
            for modality in (REFERENCE, *modalities):
                attribute = _ATTRIBUTE[modality]
                if attribute not in usable:
                    continue
                value = getattr(s, attribute)
                plan.images[modality] = Path(value[0] if isinstance(value, list) else value)
            if "chimap" in usable and s.chimap is not None:
                plan.chimap = Path(s.chimap)
            inversions = (s.mp2rage_inv1, s.mp2rage_inv2)
            if {"mp2rage_inv1", "mp2rage_inv2"} <= usable and "UNIT1" in plan.images:
                plan.mp2rage = (Path(inversions[0]), Path(inversions[1]))  # type: ignore[arg-type]
            if {"megre_mag", "megre_phase"} <= usable and "MEGRE" in plan.images:
                plan.megre_echoes = (
                    [Path(p) for p in s.megre_mag],
                    [Path(p) for p in s.megre_phase],
                )
        plans.append(plan)
    return plans


def init_participant_wf(
    *,
    plans: Sequence[SessionPlan],
    cfg: Config,
    output_dir: str | Path,
    bids_dir: str | Path,
    work_dir: str | Path,
    engine: str,
    device: str,
    omp_nthreads: int,
    name: str = "smoulder_wf",
) -> pe.Workflow:
    """Return the workflow over every subject of ``plans`` (skipped sessions left out).

    Args:
        plans: from :func:`plan_sessions`.
        cfg: the resolved configuration (its ``registration``, ``segmentation``, ``qsm`` and
            ``rims`` sections are used).
        output_dir: the BIDS-App output folder.
        bids_dir: the input BIDS dataset.
        work_dir: Nipype's cache; reusing it resumes a run.
        engine: registration engine, resolved (``greedy``, ``torch``, ``fireants`` or ``ants``).
        device: ``cpu`` or ``cuda``, resolved.
        omp_nthreads: threads per registration on the CPU.
        name: workflow name.
    """
    context = WorkflowContext(
        output_dir,
        bids_dir,
        engine=engine,
        device=device,
        seed=cfg.registration.seed,
        omp_nthreads=omp_nthreads,
    )
    wf = pe.Workflow(name=name, base_dir=str(Path(work_dir).absolute()))
    subjects = sorted({p.subject for p in plans if not p.skipped})
    for subject in subjects:
        runnable = [p for p in plans if p.subject == subject and not p.skipped]
        volume_gb = max(_volume_gb(p) for p in runnable)
        wf.add_nodes([_init_sub_wf(subject, runnable, cfg, replace(context, volume_gb=volume_gb))])
    return wf


def _init_sub_wf(
    subject: str, plans: Sequence[SessionPlan], cfg: Config, context: WorkflowContext
) -> pe.Workflow:
    """Return the workflow of one subject: its sessions', then its longitudinal one."""
    sub_wf = pe.Workflow(name=f"sub_{subject}_wf")
    session_wfs = {}
    for plan in plans:
        session_wfs[plan.session] = init_session_wf(
            subject=subject,
            session=plan.session,
            images=plan.images,
            context=context,
            registration=cfg.registration.session,
            segmentation=cfg.segmentation if cfg.segmentation.enabled else None,
            qsm=cfg.qsm if cfg.qsm.enabled else None,
            megre_echoes=plan.megre_echoes,
            chimap=plan.chimap,
            rims=cfg.rims if cfg.rims.enabled else None,
            mp2rage=plan.mp2rage,
            atrophy=cfg.atrophy if cfg.segmentation.enabled else None,
            name=f"ses_{plan.session}_wf" if plan.session else "session_wf",
        )
        sub_wf.add_nodes([session_wfs[plan.session]])
    labels = [s for s in session_wfs if s is not None]
    if len(labels) >= 2:
        segmented = cfg.segmentation.enabled
        with_t1 = all({"T1w", "UNIT1"} & set(p.images) for p in plans if p.session is not None)
        longitudinal = init_subject_wf(
            subject=subject,
            sessions=labels,
            context=context,
            registration=cfg.registration.longitudinal,
            activity=cfg.longitudinal if segmented else None,
            atrophy=cfg.atrophy if segmented and cfg.atrophy.enabled else None,
            with_t1=with_t1,
        )
        atrophy = segmented and cfg.atrophy.enabled
        outputs = [
            o
            for o in SESSION_OUTPUTS
            if o == "reference"
            or (segmented and (o != "t1" or with_t1) and (o != "atrophy_stats" or atrophy))
        ]
        for label in labels:
            for output in outputs:
                sub_wf.connect(
                    session_wfs[label],
                    f"outputnode.{output}",
                    longitudinal,
                    f"inputnode.{output}_{label}",
                )
    return sub_wf


def _volume_gb(plan: SessionPlan) -> float:
    """Return the size in GB of the largest image of the session as float32."""
    import numpy as np

    from smoulder.images import load_image

    shapes = [load_image(p, read_data=False).shape for p in plan.images.values()]
    return max(int(np.prod(shape[:3])) for shape in shapes) * 4 / 1e9
