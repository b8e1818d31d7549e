"""The columns of the atrophy tables, with their descriptions and units (JSON dictionaries).

``SESSION_COLUMNS``: one session's cross-sectional row (``sub-X_ses-Y_desc-atrophy_stats``).
``SUBJECT_COLUMNS``: the subject's table (``sub-X_desc-atrophy_stats``): every session's row
and, on each later session, the changes since the session before (``_interval_``) and since
the first (``_from_baseline_``) with their yearly rates and classes.
"""

from __future__ import annotations

from smoulder.longitudinal.activity import column_dictionary

__all__ = ["SESSION_COLUMNS", "SUBJECT_COLUMNS", "column_dictionary"]

_CLASS = (
    "pathological (yearly rate at or below the published cut-off) | normal | "
    "no published cut-off | n/a"
)

#: A session's cross-sectional measures: name → (description, units).
SESSION_COLUMNS: dict[str, tuple[str, str | None]] = {
    "brain_ml": ("brain parenchyma (grey and white matter, lesions) of the class map", "ml"),
    "gm_ml": ("grey matter, cortical and deep", "ml"),
    "cortical_gm_ml": ("cortical grey matter", "ml"),
    "deep_gm_ml": ("deep grey matter", "ml"),
    "wm_lesions_filled_ml": ("white matter with the lesions counted as white matter", "ml"),
    "lesion_ml": ("lesions", "ml"),
    "csf_ml": ("cerebrospinal fluid", "ml"),
    "icv_ml": ("intracranial volume: brain + CSF", "ml"),
    "bpf": ("brain parenchymal fraction: brain / intracranial volume", "1"),
    "head_scale": ("volume scaling to the standard head (standard_icv_ml / icv_ml)", "1"),
    "nbv_ml": ("normalised brain volume: brain x head_scale (SIENAX-like)", "ml"),
    "cord_csa_mm2": (
        "upper cervical cord cross-sectional area, angle-corrected, slab mean",
        "mm^2",
    ),
    "cord_status": ("measured | not measurable", None),
    "cord_reason": ("why the cord was (not) measured, with the distances involved", None),
    "cord_contrast": ("T1 (cord brighter than CSF) | T2", None),
    "cord_level": ("reference of the slab: anchor | brain mask | no anchor", None),
    "cord_slab_start_mm": ("slab start below the anchor, along the centreline", "mm"),
    "cord_slab_end_mm": ("slab end below the anchor, along the centreline", "mm"),
    "cord_slices": ("slices averaged", None),
    "cord_angle_deg": ("mean angle between the cord and the slice normal", "degree"),
    "cord_image": ("image the cord was measured on: T1w | UNIT1 | FLAIR", None),
    "cord_flag": ("FLAIR only (no T1w): weakest cord/CSF contrast | none", None),
}

_CHANGES: dict[str, tuple[str, str | None]] = {}
_SPANS = (("interval", "since the session before"), ("from_baseline", "since the first session"))
for _span, _words in _SPANS:
    _CHANGES.update({
        f"pbvc_{_span}_pct": (f"percentage brain volume change {_words} (pbvc_method)", "%"),
        f"pbvc_jacobian_{_span}_pct": (
            f"PBVC {_words}: Jacobian integration over the joint brain on the within-subject grid",
            "%",
        ),
        f"pbvc_boundary_shift_{_span}_pct": (
            f"PBVC {_words}: brain edge motion (SIENA's principle), self-calibrated", "%"
        ),
        f"gm_change_{_span}_pct": (
            f"grey-matter volume change {_words}: Jacobian integration over the joint "
            "grey-matter map (one segmentation propagated)", "%",
        ),
        f"cord_csa_change_{_span}_pct": (
            f"cord area change {_words}, both measured at the subject's common level", "%"
        ),
    })  # fmt: skip

#: The subject's table: session label and time, the session columns, the changes and rates.
SUBJECT_COLUMNS: dict[str, tuple[str, str | None]] = {
    "session": ("session label", None),
    "years_from_baseline": ("time since the first session", "year"),
    **SESSION_COLUMNS,
    **_CHANGES,
    "pbvc_per_year_pct": ("PBVC since the first session per year", "%/year"),
    "pbvc_class": (
        f"{_CLASS}; whole-brain cut-off -0.4 %/year (De Stefano et al., JNNP 2016)",
        None,
    ),
    "gm_per_year_pct": ("grey-matter change since the first session per year", "%/year"),
    "gm_class": (_CLASS, None),
    "cord_csa_per_year_pct": ("cord area change since the first session per year", "%/year"),
    "cord_csa_class": (_CLASS, None),
    "pbvc_method": ("the PBVC estimator of pbvc_*: jacobian | boundary_shift", None),
}

#: Scan-rescan uncertainty of each change (percentage points per interval): the mean
#: |measured - true| change of smoulder on the 1-mm phantom's two rescan pairs (new noise, bias
#: field and head position: PBVC 0.006, grey matter 0.72, cord 0.23; a changed voxel size,
#: 1 against 1.25 mm: 0.54, 1.27, 0.43), ``benchmarks/atrophy.py``, 2026-12-07.
SCAN_RESCAN: dict[str, float] = {"pbvc": 0.27, "gm": 0.99, "cord_csa": 0.33}
#: Where :data:`SCAN_RESCAN` comes from.
SCAN_RESCAN_SOURCE = "1-mm phantom rescans, benchmarks/results/atrophy.md"
