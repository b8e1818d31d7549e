"""Lesion identities across sessions: one ID per lesion for the whole subject.

Every session's lesion instances are brought onto the within-subject grid
(:mod:`smoulder.longitudinal.space`, label-aware interpolation) and matched session to session
on the bipartite graph of their overlaps:

- each later instance joins the earlier lesion it overlaps most (its *parent*);
- an earlier lesion keeps its ID on the largest of its children; its other children are
  *split* pieces with new IDs that name it (``split_from``);
- an earlier lesion with no child that still overlaps a later instance has *merged* into the
  lesion that instance belongs to (``merged_into``; the receiving lesion lists it in
  ``merged_from``);
- an earlier lesion with no overlap is *resolved*; a later instance with no overlap starts a
  new ID (whether it is a *new* lesion is decided on the images: :mod:`smoulder.longitudinal.
  change`).

The result is a persistent label map per session on the grid and the lineage of every ID.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Lineage:
    """What happened to one lesion ID at one session (relative to the session before).

    Attributes:
        instances: the session's own lesion instance IDs that form it (empty: absent).
        event: ``first`` (present at the first session), ``appeared`` (no earlier overlap),
            ``continued``, ``split`` (a piece of ``split_from`` or the part that kept its ID
            while others split off), ``merged`` (merged into ``merged_into``: absent now),
            ``resolved`` (absent, no overlap), ``absent`` (not yet there or gone before).
        split_from: the ID this piece split off from (0: none).
        merged_into: the ID this lesion merged into (0: none).
        merged_from: IDs that merged into this one at this session.
    """

    instances: list[int] = field(default_factory=list)
    event: str = "absent"
    split_from: int = 0
    merged_into: int = 0
    merged_from: list[int] = field(default_factory=list)


@dataclass
class Tracks:
    """Persistent lesion IDs over a subject's sessions.

    Attributes:
        labels: per session, the persistent-ID map on the within-subject grid (0: background).
        lineage: ``lineage[lesion_id][k]``: the :class:`Lineage` of that ID at session ``k``.
    """

    labels: list[np.ndarray]
    lineage: dict[int, list[Lineage]]

    @property
    def ids(self) -> list[int]:
        """Return every persistent ID, ascending."""
        return sorted(self.lineage)

    def present(self, lesion_id: int, k: int) -> bool:
        """Return whether ``lesion_id`` exists at session ``k``."""
        return bool(self.lineage[lesion_id][k].instances)


def overlaps(earlier: np.ndarray, later: np.ndarray) -> dict[tuple[int, int], int]:
    """Return ``{(earlier label, later label): overlapping voxels}`` for labels > 0.

    Examples:
        >>> overlaps(np.array([1, 1, 2, 0]), np.array([5, 0, 5, 6]))
        {(1, 5): 1, (2, 5): 1}
    """
    both = (earlier > 0) & (later > 0)
    pairs, counts = np.unique(
        np.stack([earlier[both].astype(np.int64), later[both].astype(np.int64)]),
        axis=1,
        return_counts=True,
    )
    return {(int(a), int(b)): int(c) for (a, b), c in zip(pairs.T, counts, strict=True)}


def track_lesions(instances: Sequence[np.ndarray], *, min_overlap_voxels: int = 1) -> Tracks:
    """Return persistent lesion IDs for session instance maps on one grid (time order).

    Args:
        instances: per session, its lesion instance labels on the within-subject grid.
        min_overlap_voxels: overlaps smaller than this do not link two lesions.

    Examples:
        >>> a = np.array([1, 1, 0, 2, 2, 0, 0])
        >>> b = np.array([7, 7, 7, 7, 0, 0, 9])   # 1 and 2 merge; 9 appears
        >>> t = track_lesions([a, b])
        >>> t.labels[1].tolist(), t.lineage[2][1].event, t.lineage[2][1].merged_into
        ([1, 1, 1, 1, 0, 0, 3], 'merged', 1)
        >>> t.lineage[1][1].merged_from, t.lineage[3][1].event
        ([2], 'appeared')
    """
    if not instances:
        raise ValueError("track_lesions: expected at least one session, found none")
    n = len(instances)
    lineage: dict[int, list[Lineage]] = {}
    first = np.asarray(instances[0]).astype(np.int64)
    labels = [np.zeros(first.shape, np.int32) for _ in range(n)]
    next_id = 1
    for inst in _labels_of(first):
        lineage[next_id] = [Lineage() for _ in range(n)]
        lineage[next_id][0] = Lineage([inst], "first")
        labels[0][first == inst] = next_id
        next_id += 1
    for k in range(1, n):
        current = np.asarray(instances[k]).astype(np.int64)
        links = {
            pair: c
            for pair, c in overlaps(labels[k - 1], current).items()
            if c >= min_overlap_voxels
        }
        parent: dict[int, int] = {}  # later instance -> earlier ID it overlaps most
        for (pid, inst), _ in sorted(links.items(), key=lambda kv: (-kv[1], kv[0])):
            parent.setdefault(inst, pid)
        sizes = dict(zip(*np.unique(current[current > 0], return_counts=True), strict=True))
        assigned: dict[int, int] = {}  # later instance -> persistent ID
        children: dict[int, list[int]] = {}
        for inst, pid in parent.items():
            children.setdefault(pid, []).append(inst)
        for pid, kids in children.items():
            kids.sort(key=lambda i: (-sizes[i], i))
            assigned[kids[0]] = pid
            entry = lineage[pid][k]
            entry.instances.append(kids[0])
            entry.event = "split" if len(kids) > 1 else "continued"
            for piece in kids[1:]:
                lineage[next_id] = [Lineage() for _ in range(n)]
                lineage[next_id][k] = Lineage([piece], "split", split_from=pid)
                assigned[piece] = next_id
                next_id += 1
        for inst in _labels_of(current):
            if inst not in assigned:
                lineage[next_id] = [Lineage() for _ in range(n)]
                lineage[next_id][k] = Lineage([inst], "appeared")
                assigned[inst] = next_id
                next_id += 1
        for pid in _labels_of(labels[k - 1]):
            if pid in children:
                continue
            touching = sorted(
                ((c, inst) for (p, inst), c in links.items() if p == pid), reverse=True
            )
            if touching:
                into = assigned[touching[0][1]]
                lineage[pid][k] = Lineage(event="merged", merged_into=into)
                lineage[into][k].merged_from.append(pid)
            else:
                lineage[pid][k] = Lineage(event="resolved")
        lut = np.zeros(int(current.max()) + 1 if current.size else 1, np.int32)
        for inst, lid in assigned.items():
            lut[inst] = lid
        labels[k] = lut[np.where(current > 0, current, 0)]
    for entries in lineage.values():
        for entry in entries:
            entry.instances.sort()
    return Tracks(labels, lineage)


def _labels_of(data: np.ndarray) -> list[int]:
    """Return the positive labels of ``data``, ascending."""
    return [int(v) for v in np.unique(data) if v > 0]
