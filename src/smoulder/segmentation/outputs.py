"""The files a segmentation writes: the one list that the command, the pipeline and its sink share.

Each output has a key (the name of the pipeline's ``Segment`` output), the BIDS entities it adds
beyond ``sub``/``ses``, its suffix and extension, and a description. :func:`file_name` gives the
name written by :func:`smoulder.segmentation.command.write_outputs` after its prefix; the
pipeline's derivatives sink names the published copy from the same entries with
:func:`smoulder.derivatives.bids_name`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Output:
    """One file of a session's segmentation."""

    key: str
    entities: dict[str, str] = field(default_factory=dict)
    suffix: str = "dseg"
    extension: str = ".nii.gz"
    description: str = ""


#: Every segmentation output, in the order they are written.
OUTPUTS: tuple[Output, ...] = (
    Output("brain_mask", {"desc": "brain"}, "mask", ".nii.gz", "brain (parenchyma) mask"),
    Output("dseg", {}, "dseg", ".nii.gz", "tissue classes"),
    Output("dseg_tsv", {}, "dseg", ".tsv", "index and name of each tissue class"),
    Output("probseg_csf", {"label": "CSF"}, "probseg", ".nii.gz", "CSF probability"),
    Output(
        "probseg_gm",
        {"label": "GM"},
        "probseg",
        ".nii.gz",
        "grey-matter (cortical and deep) probability",
    ),
    Output("probseg_wm", {"label": "WM"}, "probseg", ".nii.gz", "white-matter probability"),
    Output("probseg_lesion", {"label": "lesion"}, "probseg", ".nii.gz", "lesion probability"),
    Output(
        "lesions",
        {"desc": "lesions"},
        "dseg",
        ".nii.gz",
        "lesion instances, one index per lesion",
    ),
    Output("lesions_tsv", {"desc": "lesions"}, "dseg", ".tsv", "index and name of each lesion"),
    Output("lesion_stats", {"desc": "lesions"}, "stats", ".tsv", "one row per lesion"),
)

#: The outputs by key.
BY_KEY: dict[str, Output] = {o.key: o for o in OUTPUTS}


def file_name(key: str, prefix: str = "") -> str:
    """Return the file name of output ``key`` after ``prefix`` (entities in BIDS order).

    Examples:
        >>> file_name("brain_mask", "seg_")
        'seg_desc-brain_mask.nii.gz'
        >>> file_name("dseg_tsv")
        'dseg.tsv'
        >>> file_name("probseg_gm", "sub-01_")
        'sub-01_label-GM_probseg.nii.gz'
    """
    out = BY_KEY[key]
    # BIDS order of the entities used here: label before desc
    parts = [f"{k}-{out.entities[k]}" for k in ("label", "desc") if k in out.entities]
    return prefix + "_".join([*parts, out.suffix]) + out.extension
