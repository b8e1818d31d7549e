"""Raters' lesion decisions: the ``sub-<label>_desc-review_lesions.tsv`` table.

One row per (lesion, rater): a later decision by the same rater on the same lesion replaces
the earlier one, decisions of other raters are kept. Writes are atomic (temporary file, then
rename) and serialised by an advisory lock beside the table, so two raters saving at the same
time both keep their rows.
"""

from __future__ import annotations

import csv
import fcntl
import io
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from smoulder.derivatives import bids_name
from smoulder.errors import InputError
from smoulder.images import atomic_path

#: Columns of the review table, in order, with what each may hold ("" = not rated).
COLUMNS: dict[str, tuple[str, ...] | None] = {
    "lesion_id": None,  # integer ≥ 1
    "rater": None,  # free text, required
    "lesion": ("yes", "no", ""),
    "rim": ("definite", "probable", "none", ""),
    "sel": ("yes", "no", ""),
    "note": None,
    "time": None,  # ISO 8601, UTC, set when saved
}


def review_path(subject_dir: str | Path, subject: str) -> Path:
    """Return the review table's path in a subject's derivatives folder.

    Args:
        subject_dir: the subject's folder of the derivatives (``OUT/smoulder/sub-X``).
        subject: the subject's folder name, ``sub-X``.

    Examples:
        >>> review_path("/out/sub-01", "sub-01").name
        'sub-01_desc-review_lesions.tsv'
    """
    entities = {"sub": subject.removeprefix("sub-"), "desc": "review"}
    return Path(subject_dir) / bids_name(entities, suffix="lesions", extension=".tsv")


def validate_row(row: Mapping[str, object], where: str = "review") -> dict[str, str]:
    """Return ``row`` as clean strings, or raise :class:`InputError` naming the bad value.

    Examples:
        >>> validate_row({"lesion_id": 3, "rater": "AB", "rim": "probable"})["rim"]
        'probable'
        >>> validate_row({"lesion_id": 3, "rater": "AB", "rim": "maybe"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        smoulder.errors.InputError: review: expected rim one of ... or empty, found 'maybe'
    """
    out: dict[str, str] = {}
    for key, allowed in COLUMNS.items():
        value = row.get(key, "")
        text = "" if value is None else str(value)
        text = " ".join(text.replace("\t", " ").splitlines()).strip()  # one TSV cell
        if allowed is not None and text not in allowed:
            choices = ", ".join(a for a in allowed if a) + " or empty"
            raise InputError(where, expected=f"{key} one of {choices}", found=repr(text))
        out[key] = text
    if not out["lesion_id"].isdigit() or int(out["lesion_id"]) < 1:
        raise InputError(where, expected="lesion_id an integer >= 1", found=repr(out["lesion_id"]))
    if not out["rater"]:
        raise InputError(where, expected="a rater ID", found="an empty rater")
    if len(out["note"]) > 2000:
        raise InputError(where, expected="a note of at most 2000 characters", found="a longer one")
    return out


def read_review(path: str | Path) -> list[dict[str, str]]:
    """Return the rows of a review table (empty when it does not exist).

    Raises:
        InputError: the file lacks the table's columns or holds an invalid value.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return parse_review(text, str(path))


def parse_review(text: str, where: str = "review") -> list[dict[str, str]]:
    """Return the validated rows of review-table ``text`` (TSV with a header line)."""
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    missing = [c for c in ("lesion_id", "rater") if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(
            where,
            expected=f"a TSV with columns {', '.join(COLUMNS)}",
            found=f"columns {reader.fieldnames}",
        )
    rows = []
    for n, row in enumerate(reader, start=2):
        rows.append(
            validate_row({k: (v if v != "n/a" else "") for k, v in row.items()}, f"{where}:{n}")
        )
    return rows


def format_review(rows: Iterable[Mapping[str, str]]) -> str:
    """Return ``rows`` as TSV text (header first, rows by lesion then rater)."""
    lines = ["\t".join(COLUMNS)]
    for row in sorted(rows, key=lambda r: (int(r["lesion_id"]), r["rater"])):
        lines.append("\t".join(row.get(k, "") for k in COLUMNS))
    return "\n".join(lines) + "\n"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merge_review(path: str | Path, rows: Iterable[Mapping[str, object]]) -> list[dict[str, str]]:
    """Add or replace ``rows`` in the table at ``path`` (atomic, locked); return all rows.

    A row replaces the saved one with the same ``lesion_id`` and ``rater``; every other saved
    row is kept. Rows without a ``time`` get the current time.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "sub-01_desc-review_lesions.tsv"
        >>> _ = merge_review(p, [{"lesion_id": 1, "rater": "A", "lesion": "yes"}])
        >>> _ = merge_review(p, [{"lesion_id": 1, "rater": "B", "lesion": "no"}])
        >>> rows = merge_review(p, [{"lesion_id": 1, "rater": "A", "lesion": "no"}])
        >>> [(r["rater"], r["lesion"]) for r in rows]
        [('A', 'no'), ('B', 'no')]
    """
    path = Path(path)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    new = [validate_row({**row, "time": row.get("time") or now}) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        saved = {(r["lesion_id"], r["rater"]): r for r in read_review(path)}
        for row in new:
            saved[(row["lesion_id"], row["rater"])] = row
        merged = list(saved.values())
        with atomic_path(path) as tmp:
            tmp.write_text(format_review(merged), encoding="utf-8")
    return sorted(merged, key=lambda r: (int(r["lesion_id"]), r["rater"]))
