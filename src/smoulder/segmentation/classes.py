"""The tissue classes of a segmentation, and the one table of what each named tissue contains.

The network and the class map (``_dseg``) use :data:`CLASSES`; every volume, probability map and
report figure named after a tissue sums the classes :data:`TISSUES` lists for it. White matter
exists in two meanings, kept apart by name: ``WM`` is normal-appearing white matter (lesions
excluded), as the ``_label-WM_probseg`` map holds it; ``WM_lesions_filled`` counts the lesions
as white matter, as atrophy measures do (SIENAX, SAMSEG) so that a new lesion is not read as
white-matter loss.
"""

from __future__ import annotations

#: Output classes of the segmentation network and indices of the class map, in channel order.
CLASSES: tuple[str, ...] = ("background", "CSF", "cortical_GM", "deep_GM", "WM", "lesion")
#: Index of the lesion class.
LESION = CLASSES.index("lesion")

#: Named tissues → the classes of :data:`CLASSES` each one sums.
TISSUES: dict[str, tuple[str, ...]] = {
    "brain": ("cortical_GM", "deep_GM", "WM", "lesion"),  # parenchyma
    "GM": ("cortical_GM", "deep_GM"),
    "cortical_GM": ("cortical_GM",),
    "deep_GM": ("deep_GM",),
    "WM": ("WM",),
    "WM_lesions_filled": ("WM", "lesion"),
    "CSF": ("CSF",),
    "lesion": ("lesion",),
}


def class_indices(tissue: str) -> tuple[int, ...]:
    """Return the class-map indices that make up ``tissue`` (a key of :data:`TISSUES`).

    Raises:
        KeyError: an unknown tissue name, with the known ones.

    Examples:
        >>> class_indices("GM")
        (2, 3)
        >>> class_indices("WM_lesions_filled")
        (4, 5)
    """
    try:
        parts = TISSUES[tissue]
    except KeyError:
        raise KeyError(f"unknown tissue {tissue!r}; known: {', '.join(TISSUES)}") from None
    return tuple(CLASSES.index(c) for c in parts)
