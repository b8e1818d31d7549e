"""The files a segmentation writes: the one list that the command, the pipeline and its sink share.

Each output has a key (the name of the pipeline's ``Segment`` output), the BIDS entities it adds
beyond ``sub``/``ses``, its suffix and extension, and a description. :func:`file_name` gives the
name :func:`write_outputs` writes after its prefix; the pipeline's derivatives sink names the
published copy from the same entries with :func:`smoulder.derivatives.bids_name`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import nibabel as nib

    from smoulder.segmentation.inference import SegmentationResult


@dataclass(frozen=True)
class Output:
    """One file of a session's segmentation."""

    key: str
    entities: dict[str, str] = field(default_factory=dict)
    suffix: str = "dseg"
    extension: str = ".nii.gz"
    description: str = ""

    @property
    def lookup_table(self) -> bool:
        """Whether this is the index-to-name table of a ``dseg`` image: it shares the image's
        name and so its JSON sidecar, which the image writes (BIDS derivatives)."""
        return self.suffix == "dseg" and self.extension == ".tsv"


def probseg_key(tissue: str) -> str:
    """Return the key of the probability map of ``tissue`` (``CSF``, ``GM``, ``WM``, ``lesion``).

    Examples:
        >>> probseg_key("GM")
        'probseg_gm'
    """
    return f"probseg_{tissue.lower()}"


def _probseg(tissue: str, description: str) -> Output:
    """Return the output ``_label-<tissue>_probseg.nii.gz``."""
    return Output(probseg_key(tissue), {"label": tissue}, "probseg", ".nii.gz", description)


#: Every segmentation output, in the order they are written.
OUTPUTS: tuple[Output, ...] = (
    Output("brain_mask", {"desc": "brain"}, "mask", ".nii.gz", "brain (parenchyma) mask"),
    Output("dseg", {}, "dseg", ".nii.gz", "tissue classes"),
    Output("dseg_tsv", {}, "dseg", ".tsv", "index and name of each tissue class"),
    _probseg("CSF", "CSF probability"),
    _probseg("GM", "grey-matter (cortical and deep) probability"),
    _probseg("WM", "white-matter probability"),
    _probseg("lesion", "lesion probability"),
    Output("lesions", {"desc": "lesions"}, description="lesion instances, one index per lesion"),
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


#: What the JSON sidecar of each image says beyond its sources, model version and settings.
_IMAGE_SIDECARS: dict[str, dict[str, str]] = {
    "brain_mask": {
        "Type": "Brain",
        "Description": "parenchyma: GM + WM + lesion probability >= 0.5",
    },
    "dseg": {"Description": "tissue classes (argmax)"},
    "lesions": {
        "Description": "lesion instances: 0 outside lesions, 1..N one index per lesion, "
        "numbered by world position (stable across reorientation)"
    },
}


def write_outputs(
    result: SegmentationResult, out: Path, prefix: str, sources: list[str]
) -> list[Path]:
    """Return the images and the lesion table written for a segmentation ``result``.

    Every file of :data:`OUTPUTS` goes into ``out``, named by :func:`file_name` after
    ``prefix``; each image has a JSON sidecar naming its ``sources``, the model version and the
    settings, and the lesion table its column dictionary. Nothing is computed here.
    """
    from smoulder.images import save_tsv
    from smoulder.segmentation.classes import CLASSES
    from smoulder.segmentation.lesions import write_lesion_stats

    out.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {"Sources": sources, "ModelVersion": result.model_version}
    if result.settings:
        common["Settings"] = result.settings

    def image(key: str, img: nib.Nifti1Image, dtype: type, meta: dict[str, str]) -> Path:
        return _write_image(img, out / file_name(key, prefix), dtype, {**common, **meta})

    written = [
        image("brain_mask", result.brain_mask, np.uint8, _IMAGE_SIDECARS["brain_mask"]),
        image("dseg", result.dseg, np.uint8, _IMAGE_SIDECARS["dseg"]),
    ]
    classes = [{"index": i, "name": n} for i, n in enumerate(CLASSES)]
    save_tsv(classes, out / file_name("dseg_tsv", prefix))
    for name, img in result.probseg.items():
        meta = {"Description": f"{name} probability"}
        written.append(image(probseg_key(name), img, np.float32, meta))
    written.append(image("lesions", result.instances, np.int16, _IMAGE_SIDECARS["lesions"]))
    ids = [int(i) for i in np.unique(np.asarray(result.instances.dataobj)) if i > 0]
    lesion_names = [{"index": 0, "name": "background"}]
    lesion_names += [{"index": i, "name": f"lesion-{i}"} for i in ids]
    save_tsv(lesion_names, out / file_name("lesions_tsv", prefix))
    stats = out / file_name("lesion_stats", prefix)
    written.append(write_lesion_stats(result.lesion_rows, stats))
    return written


def _write_image(img: nib.Nifti1Image, path: Path, dtype: type, sidecar: dict[str, Any]) -> Path:
    """Return ``path`` after writing ``img`` there as ``dtype``, with ``sidecar`` beside it."""
    from smoulder.images import save_json, save_nifti

    written = save_nifti(np.asarray(img.dataobj), img.affine, path, dtype=dtype)
    save_json(sidecar, path.with_name(path.name.removesuffix(".nii.gz") + ".json"))
    return written
