"""What a run used and how to cite it: the methods boilerplate and the references.

Every participant run writes :func:`how_to_acknowledge` into its ``dataset_description.json``
(``HowToAcknowledge``) and :func:`methods_text` into its report, naming the tools, templates,
data and models with their versions and DOIs, so that a methods section can be written from
the outputs alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    """One work to cite: a short citation and its DOI."""

    citation: str
    doi: str

    def line(self) -> str:
        """Return ``citation, https://doi.org/DOI``."""
        return f"{self.citation}, https://doi.org/{self.doi}"


#: Every work smoulder's outputs rest on, by key.
REFERENCES: dict[str, Reference] = {
    "nipype": Reference(
        "Gorgolewski et al., Nipype, Frontiers in Neuroinformatics 2011", "10.3389/fninf.2011.00013"
    ),
    "nibabel": Reference("Brett et al., NiBabel (Zenodo)", "10.5281/zenodo.591597"),
    "pytorch": Reference("Paszke et al., PyTorch, NeurIPS 2019", "10.48550/arXiv.1912.01703"),
    "monai": Reference("Cardoso et al., MONAI, arXiv 2022", "10.48550/arXiv.2211.02701"),
    "antsx": Reference(
        "Tustison et al., The ANTsX ecosystem, Scientific Reports 2021",
        "10.1038/s41598-021-87564-6",
    ),
    "greedy": Reference(
        "Yushkevich et al., greedy registration, Alzheimer's & Dementia 2016",
        "10.1016/j.jalz.2016.06.205",
    ),
    "mni152": Reference(
        "Fonov et al., MNI152 2009 templates, NeuroImage 2011", "10.1016/j.neuroimage.2010.07.033"
    ),
    "nilearn": Reference(
        "Abraham et al., nilearn, Frontiers in Neuroinformatics 2014", "10.3389/fninf.2014.00014"
    ),
    "synthseg": Reference(
        "Billot et al., SynthSeg (training label maps), Medical Image Analysis 2023",
        "10.1016/j.media.2023.102789",
    ),
    "open_ms": Reference(
        "Lesjak et al., open MS lesion data (training lesion shapes), Neuroinformatics 2018",
        "10.1007/s12021-017-9348-7",
    ),
    "tv_qsm": Reference(
        "Bilgic et al., fast total-variation QSM, Magnetic Resonance in Medicine 2014",
        "10.1002/mrm.25029",
    ),
    "qsm_challenge": Reference(
        "Marques et al., QSM reconstruction challenge 2.0 (phantom head model), Magnetic "
        "Resonance in Medicine 2021",
        "10.1002/mrm.28716",
    ),
    "mp2rage": Reference(
        "Marques et al., MP2RAGE, NeuroImage 2010", "10.1016/j.neuroimage.2009.10.002"
    ),
    "sel": Reference(
        "Elliott et al., slowly expanding lesions, Multiple Sclerosis Journal 2019",
        "10.1177/1352458518814117",
    ),
    "siena": Reference("Smith et al., SIENA/SIENAX, NeuroImage 2002", "10.1006/nimg.2002.1040"),
    "atrophy_cutoff": Reference(
        "De Stefano et al., pathological brain atrophy cut-offs in MS, J Neurol Neurosurg "
        "Psychiatry 2016",
        "10.1136/jnnp-2014-309903",
    ),
}

#: References of each analysis (names as the input checks list them), beyond the core tools.
ANALYSIS_REFERENCES: dict[str, tuple[str, ...]] = {
    "lesion_segmentation": ("monai", "pytorch", "synthseg", "open_ms", "mni152", "nilearn"),
    "qsm_reconstruction": ("tv_qsm",),
    "prl": ("monai", "pytorch", "mp2rage"),
    "atrophy": ("siena", "atrophy_cutoff"),
    "cord_csa": (),
    "longitudinal": ("greedy", "sel"),
}
#: Always cited: what every run stands on.
CORE_REFERENCES: tuple[str, ...] = ("nipype", "nibabel", "antsx", "greedy")


def references_for(analyses: Sequence[str]) -> list[Reference]:
    """Return the references of a run that did ``analyses`` (core tools first, no repeats).

    Examples:
        >>> [r.doi for r in references_for(["atrophy"])][-2:]
        ['10.1006/nimg.2002.1040', '10.1136/jnnp-2014-309903']
    """
    keys: list[str] = list(CORE_REFERENCES)
    for analysis in analyses:
        for key in ANALYSIS_REFERENCES.get(analysis, ()):
            if key not in keys:
                keys.append(key)
    return [REFERENCES[key] for key in keys]


def methods_text(version: str, models: Mapping[str, str], analyses: Sequence[str]) -> str:
    """Return a methods paragraph for a run of smoulder ``version`` with ``models``.

    Examples:
        >>> text = methods_text("1.0", {"smoulder_seg": "0.4.0"}, ["lesion_segmentation"])
        >>> "smoulder 1.0" in text and "smoulder_seg 0.4.0" in text and "Nipype" in text
        True
    """
    used = ", ".join(f"{name} {v}" for name, v in sorted(models.items())) or "none"
    refs = "; ".join(r.line() for r in references_for(analyses))
    steps = ", ".join(analyses) if analyses else "the input checks only"
    return (
        f"MRI markers of smouldering multiple sclerosis were measured with smoulder {version} "
        f"({steps}), built on Nipype workflows, with trained models {used} (each described by "
        "its model card in the smoulder package). Registration used ANTsPy and greedy; the "
        "segmentation network was trained only on synthetic images (SynthSeg label maps, open MS "
        f"lesion shapes) and refined on each subject's own intensities. References: {refs}."
    )


def how_to_acknowledge(version: str) -> str:
    """Return the ``HowToAcknowledge`` text of the derivatives' ``dataset_description.json``."""
    return (
        f"Please cite smoulder {version} and the works listed in the report's methods section "
        "(the tools, templates, data and models this run used, with their DOIs)."
    )
