"""Find each session's images in a BIDS dataset and check that smoulder can use them.

:func:`discover` indexes the dataset with pybids (derivatives and any other top-level folder
that is not ``sub-*`` are ignored) and returns one :class:`SessionInputs` per subject and
session. :func:`validate_session` reads every image and its sidecar metadata and records
one-line error messages instead of stopping at the first problem, so that a person can fix
a whole dataset in one pass. :func:`summarize` and :func:`sessions_to_records` report the
result to a person and to a file.

Images looked for (``.nii`` or ``.nii.gz``, any datatype folder)::

    FLAIR      *_FLAIR                  T1w        *_T1w (any acq-)
    UNIT1      *_UNIT1                  MP2RAGE    *_inv-1_part-mag_MP2RAGE, *_inv-2_...
    Chimap     *_Chimap (QSM, ppm)      MEGRE      *_echo-N_part-{mag,phase}_MEGRE

When several files match (runs, ``acq-`` labels), one is chosen deterministically: files
without an ``acq-`` label first, then the lowest run, then the sorted path; the choice is
recorded in ``warnings``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from smoulder.errors import InputError
from smoulder.images import load_image, phase_to_radians

ANALYSES = ("lesion_segmentation", "prl", "qsm_reconstruction", "atrophy", "cord_csa")
"""Every analysis a session can allow, in the order :attr:`SessionInputs.analyses` lists them."""

_SINGLE = ("flair", "t1w", "unit1", "mp2rage_inv1", "mp2rage_inv2", "chimap")
#: How a person reads each single-file modality key (summaries and the inputs table).
MODALITY_NAMES: dict[str, str] = {
    "flair": "FLAIR",
    "t1w": "T1w",
    "unit1": "UNIT1",
    "mp2rage_inv1": "inv-1",
    "mp2rage_inv2": "inv-2",
    "chimap": "Chimap",
}
_NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
# Only sub-* folders hold raw data; derivatives/, work/, sourcedata/, code/ ... are skipped.
_IGNORE = re.compile(r"^/(?!sub-)[^/]+/")
# Entities that tell alternative acquisitions apart (not echo/part/inv, which belong together).
_GROUP_ENTITIES = {
    "acquisition": "acq",
    "ceagent": "ce",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "proc": "proc",
}
_ECHO_RE = re.compile(r"_echo-(\d+)_")
_MAX_ECHO_TIME_S = 1.0  # beyond this the value is surely milliseconds
_AFFINE_ATOL_MM = 1e-3


def session_label(subject: str, session: str | None) -> str:
    """Return ``sub-<subject>[_ses-<session>]``, the BIDS prefix of a session's file names.

    Examples:
        >>> session_label("01", "02"), session_label("01", None)
        ('sub-01_ses-02', 'sub-01')
    """
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


@dataclass
class SessionInputs:
    """The images of one subject and session, what they allow, and what is wrong with them.

    Paths are absolute; ``session`` is ``None`` in a dataset without sessions. ``errors`` and
    ``warnings`` hold one-line messages; ``unusable`` names the modalities (``flair``,
    ``megre_phase`` ...) that failed validation and so count as absent in :attr:`analyses`.
    ``metadata`` maps each image path to its merged (inherited) sidecar metadata.
    """

    subject: str
    session: str | None = None
    flair: Path | None = None
    t1w: Path | None = None
    unit1: Path | None = None
    mp2rage_inv1: Path | None = None
    mp2rage_inv2: Path | None = None
    chimap: Path | None = None
    megre_mag: list[Path] = field(default_factory=list)
    megre_phase: list[Path] = field(default_factory=list)
    echo_times_s: list[float] = field(default_factory=list)
    field_strength_t: float | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        """Return ``sub-<subject>[_ses-<session>]``, the BIDS prefix of this session's files."""
        return session_label(self.subject, self.session)

    @property
    def found(self) -> list[str]:
        """Return the modality keys present on disk (``flair`` ... ``megre_phase``)."""
        keys = [key for key in _SINGLE if getattr(self, key) is not None]
        keys += [key for key in ("megre_mag", "megre_phase") if getattr(self, key)]
        return keys

    @property
    def usable(self) -> list[str]:
        """Return the modality keys present and not marked unusable by validation."""
        return [key for key in self.found if key not in self.unusable]

    @property
    def analyses(self) -> list[str]:
        """Return the analyses (names from :data:`ANALYSES`) that the usable images allow.

        ``lesion_segmentation`` needs FLAIR (T1w/UNIT1 help but are optional); ``prl`` needs
        FLAIR and a susceptibility source (Chimap, or MEGRE magnitude and phase);
        ``qsm_reconstruction`` needs MEGRE magnitude and phase; ``atrophy`` needs T1w, UNIT1 or
        FLAIR; ``cord_csa`` needs T1w or UNIT1.
        """
        have = set(self.usable)
        megre = {"megre_mag", "megre_phase"} <= have
        allowed = {
            "lesion_segmentation": "flair" in have,
            "prl": "flair" in have and ("chimap" in have or megre),
            "qsm_reconstruction": megre,
            "atrophy": bool(have & {"t1w", "unit1", "flair"}),
            "cord_csa": bool(have & {"t1w", "unit1"}),
        }
        return [name for name in ANALYSES if allowed[name]]

    def images(self) -> Iterator[tuple[str, Path]]:
        """Return an iterator of ``(modality key, path)`` over every image of the session."""
        for key in _SINGLE:
            path = getattr(self, key)
            if path is not None:
                yield key, path
        for key in ("megre_mag", "megre_phase"):
            for path in getattr(self, key):
                yield key, path

    def to_record(self) -> dict[str, Any]:
        """Return the session as a JSON-friendly dict (paths as strings)."""
        record: dict[str, Any] = {"subject": self.subject, "session": self.session}
        for key in _SINGLE:
            path = getattr(self, key)
            record[key] = str(path) if path is not None else None
        record["megre_mag"] = [str(p) for p in self.megre_mag]
        record["megre_phase"] = [str(p) for p in self.megre_phase]
        record["echo_times_s"] = [float(t) for t in self.echo_times_s]
        record["field_strength_t"] = self.field_strength_t
        record["analyses"] = self.analyses
        record["unusable"] = list(self.unusable)
        record["n_errors"] = len(self.errors)
        record["errors"] = list(self.errors)
        record["warnings"] = list(self.warnings)
        return record


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def discover(
    bids_dir: str | Path,
    *,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
) -> list[SessionInputs]:
    """Return one :class:`SessionInputs` per selected subject and session, sorted by label.

    Only finds files and reads sidecar metadata; call :func:`validate_session` to check them.

    Args:
        bids_dir: top folder of a BIDS dataset (holding ``dataset_description.json``).
        participant_labels: subjects to keep (``"01"`` or ``"sub-01"``); all when ``None``.
        session_labels: sessions to keep (``"01"`` or ``"ses-01"``); all when ``None``.

    Raises:
        InputError: ``bids_dir`` is not a BIDS dataset, holds no subjects, or a requested
            participant or session label does not exist (the message lists those available).
    """
    root = _check_dataset(bids_dir)
    layout = _make_layout(root)
    available = sorted(layout.get_subjects())
    if not available:
        raise InputError(root, expected="at least one sub-<label> folder", found="no subjects")
    subjects = _select_labels(participant_labels, available, "sub", "participant", root)
    wanted_sessions: set[str] | None = None
    if session_labels is not None:
        present = sorted(layout.get_sessions(subject=subjects))
        wanted_sessions = set(_select_labels(session_labels, present, "ses", "session", root))
    sessions = []
    for subject in subjects:
        labels: list[str | None] = list(sorted(layout.get_sessions(subject=subject))) or [None]
        if wanted_sessions is not None:
            labels = [label for label in labels if label in wanted_sessions]
        sessions += [_discover_session(layout, subject, label) for label in labels]
    return sessions


def _check_dataset(bids_dir: str | Path) -> Path:
    root = Path(bids_dir).expanduser().resolve()
    if not root.is_dir():
        found = "a file" if root.exists() else "no such folder"
        raise InputError(root, expected="a BIDS dataset folder", found=found)
    description = root / "dataset_description.json"
    if not description.is_file():
        hint = "point to the folder that holds dataset_description.json and the sub-* folders"
        if any(root.glob("sub-*")):
            hint = "add a dataset_description.json with at least Name and BIDSVersion"
        raise InputError(
            root,
            expected="a BIDS dataset (dataset_description.json at its top)",
            found="no dataset_description.json",
            hint=hint,
        )
    try:
        content = json.loads(description.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(description, expected="valid JSON", found=str(exc)) from exc
    if not isinstance(content, dict):
        raise InputError(
            description, expected="a JSON object", found=f"a JSON {type(content).__name__}"
        )
    return root


def _make_layout(root: Path) -> Any:
    from bids import BIDSLayout, BIDSLayoutIndexer  # slow import: only when needed

    indexer = BIDSLayoutIndexer(validate=False, ignore=[_IGNORE], index_metadata=True)
    try:
        return BIDSLayout(root, validate=False, indexer=indexer)
    except Exception as exc:  # pybids raises its own types (BIDSValidationError, ValueError ...)
        raise InputError(
            root, expected="a dataset pybids can index", found=f"{type(exc).__name__}: {exc}"
        ) from exc


def _select_labels(
    requested: Sequence[str] | None, available: list[str], prefix: str, kind: str, root: Path
) -> list[str]:
    if requested is None:
        return list(available)
    if isinstance(requested, str):
        requested = [requested]
    wanted = [_strip_prefix(label, prefix) for label in requested]
    missing = [label for label in wanted if label not in available]
    if missing:
        names = ", ".join(f"{prefix}-{label}" for label in missing)
        listed = ", ".join(f"{prefix}-{label}" for label in available)
        found = f"available: {listed}" if available else f"the dataset has no {kind}s"
        raise InputError(
            root, expected=f"{kind} label(s) {names} in the dataset", found=f"no {names}; {found}"
        )
    return sorted(set(wanted), key=wanted.index)


def _strip_prefix(label: str, prefix: str) -> str:
    label = str(label).strip()
    return label[len(prefix) + 1 :] if label.startswith(f"{prefix}-") else label


def _discover_session(layout: Any, subject: str, session: str | None) -> SessionInputs:
    from bids.layout import Query

    s = SessionInputs(subject=subject, session=session)
    query = {
        "subject": subject,
        "session": session if session is not None else Query.NONE,
        "extension": _NIFTI_EXTENSIONS,
    }

    def files(suffix: str) -> list[Any]:
        found = layout.get(suffix=suffix, return_type="object", **query)
        return [f for f in found if f.get_entities().get("part") in (None, "mag", "phase")]

    def magnitude(candidates: list[Any]) -> list[Any]:
        return [f for f in candidates if f.get_entities().get("part") in (None, "mag")]

    for key, suffix in (
        ("flair", "FLAIR"),
        ("t1w", "T1w"),
        ("unit1", "UNIT1"),
        ("chimap", "Chimap"),
    ):
        chosen = _choose_group(magnitude(files(suffix)), s, suffix)
        if chosen:
            setattr(s, key, _remember(s, chosen[0]))

    mp2rage = _choose_group(magnitude(files("MP2RAGE")), s, "MP2RAGE")
    for key, inv in (("mp2rage_inv1", "1"), ("mp2rage_inv2", "2")):
        match = [f for f in mp2rage if str(f.get_entities().get("inv")) == inv]
        if match:
            setattr(s, key, _remember(s, match[0]))

    megre = _choose_group(files("MEGRE"), s, "MEGRE")
    by_echo = sorted(megre, key=lambda f: (_echo_number(Path(f.path)) or 0, f.path))
    s.megre_mag = [_remember(s, f) for f in magnitude(by_echo)]
    s.megre_phase = [_remember(s, f) for f in by_echo if f.get_entities().get("part") == "phase"]

    s.echo_times_s, s.field_strength_t, _ = _echo_metadata(s)
    if not s.found:
        s.warnings.append(f"{s.label}: no FLAIR, T1w, MP2RAGE, Chimap or MEGRE image found")
    elif "flair" in s.found and not {"t1w", "unit1"} & set(s.found):
        s.warnings.append(
            f"{s.label}: FLAIR without T1w/UNIT1; lesion segmentation uses FLAIR only"
        )
    return s


def _choose_group(candidates: list[Any], s: SessionInputs, what: str) -> list[Any]:
    """Return the files of the preferred acquisition group, recording the choice in warnings."""
    groups: dict[tuple[tuple[str, str], ...], list[Any]] = {}
    for f in candidates:
        groups.setdefault(_group_key(f.get_entities()), []).append(f)
    if not groups:
        return []
    ordered = sorted(groups, key=lambda key: (_preference(key), min(f.path for f in groups[key])))
    chosen = sorted(groups[ordered[0]], key=lambda f: f.path)
    if len(ordered) > 1:
        names = ["_".join(f"{k}-{v}" for k, v in key) or "no acq/run label" for key in ordered]
        s.warnings.append(
            f"{s.label}: {len(ordered)} {what} acquisitions ({', '.join(names)}); "
            f"using {Path(chosen[0].path).name}"
        )
    return chosen


def _group_key(entities: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(
        (short, str(entities[name]))
        for name, short in _GROUP_ENTITIES.items()
        if entities.get(name) is not None
    )


def _preference(key: tuple[tuple[str, str], ...]) -> tuple[bool, int, int, tuple[Any, ...]]:
    labels = dict(key)
    run = labels.get("run")
    return ("acq" in labels, len(labels), int(run) if run else 0, key)


def _remember(s: SessionInputs, bids_file: Any) -> Path:
    path = Path(bids_file.path)
    s.metadata[str(path)] = dict(bids_file.get_metadata())
    return path


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_session(s: SessionInputs, *, read_data: bool = True) -> SessionInputs:
    """Return a copy of ``s`` whose ``errors`` list every problem found in its images.

    Every image is loaded with :func:`~smoulder.images.load_image` (3D expected, MEGRE one
    file per echo); phase images must be in radians or 12-bit scanner units (QSM converts
    them); MEGRE needs an ``EchoTime`` (seconds) for
    every echo, ``MagneticFieldStrength``, the same echoes for magnitude and phase, and one
    voxel grid for all echoes and parts. A bad file is recorded and the others still checked.
    Modalities with errors are listed in ``unusable`` and drop out of ``analyses``.

    Args:
        s: a session from :func:`discover` (or built by hand).
        read_data: read the voxel data (detects truncation, NaN/Inf, phase units); when
            false only headers and metadata are checked.
    """
    out = replace(s, errors=[], warnings=list(s.warnings), unusable=[])
    grids: dict[Path, tuple[tuple[int, ...], np.ndarray]] = {}
    for key, path in out.images():
        try:
            img = load_image(path, ndim=3, read_data=read_data)
            grids[path] = (tuple(img.shape), np.asarray(img.affine, dtype=float))
            if read_data and key == "megre_phase":
                phase_to_radians(np.asanyarray(img.dataobj), path)  # convertible or named
            if read_data and key == "chimap":
                _check_chimap_units(np.asanyarray(img.dataobj), path, out)
        except InputError as exc:
            _fail(out, (key,), exc)
    if out.megre_mag or out.megre_phase:
        _check_megre(out, grids)
    _check_same_grid(out, ["mp2rage_inv1", "mp2rage_inv2", "unit1"], grids, as_error=False)
    return out


def _fail(s: SessionInputs, keys: Iterable[str], exc: InputError) -> None:
    s.errors.append(str(exc))
    for key in keys:
        if key not in s.unusable:
            s.unusable.append(key)


def _warn(s: SessionInputs, message: str) -> None:
    if message not in s.warnings:
        s.warnings.append(message)


def _check_megre(s: SessionInputs, grids: dict[Path, tuple[tuple[int, ...], np.ndarray]]) -> None:
    both = ("megre_mag", "megre_phase")
    if not s.megre_phase:
        _warn(s, f"{s.label}: MEGRE magnitude without phase; QSM cannot be reconstructed")
    if not s.megre_mag:
        _warn(s, f"{s.label}: MEGRE phase without magnitude; QSM cannot be reconstructed")
    for path in [*s.megre_mag, *s.megre_phase]:
        if _echo_number(path) is None:
            _fail(s, both, InputError(path, expected="an echo-<N> entity", found="none"))
    if s.megre_mag and s.megre_phase:
        mag_echoes = [_echo_number(p) for p in s.megre_mag]
        phase_echoes = [_echo_number(p) for p in s.megre_phase]
        if mag_echoes != phase_echoes:
            _fail(
                s,
                both,
                InputError(
                    s.megre_phase[0].parent,
                    expected=(
                        f"the same echoes in magnitude and phase; {len(s.megre_mag)} magnitude "
                        f"({_names(s.megre_mag)})"
                    ),
                    found=f"{len(s.megre_phase)} phase ({_names(s.megre_phase)})",
                ),
            )
    echo_times, field_strength, problems = _echo_metadata(s)
    for problem in problems:
        _fail(s, both, problem)
    s.echo_times_s = echo_times
    s.field_strength_t = field_strength
    _check_same_grid(s, ["megre_mag", "megre_phase"], grids, as_error=True)


def _echo_metadata(s: SessionInputs) -> tuple[list[float], float | None, list[InputError]]:
    """Return (echo times in s by echo, field strength in T, problems) from the MEGRE sidecars."""
    problems: list[InputError] = []
    phase_by_echo = {_echo_number(p): p for p in s.megre_phase}
    echo_times: list[float] = []
    for mag in s.megre_mag or s.megre_phase:
        phase = phase_by_echo.get(_echo_number(mag))
        values = {p: _metadata(s, p).get("EchoTime") for p in (mag, phase) if p is not None}
        given = {p: v for p, v in values.items() if v is not None}
        if not given:
            problems.append(
                InputError(
                    mag,
                    expected="an EchoTime (seconds) in its JSON sidecar",
                    found="no EchoTime" if sidecar_path(mag).is_file() else "no JSON sidecar",
                )
            )
            continue
        for path, value in given.items():
            problem = _echo_time_problem(path, value)
            if problem:
                problems.append(problem)
        numbers = [v for v in given.values() if _is_number(v)]
        if numbers and max(numbers) - min(numbers) > 1e-6:
            problems.append(
                InputError(
                    phase or mag,
                    expected=f"the EchoTime of {mag.name} ({numbers[0]} s)",
                    found=f"EchoTime {numbers[-1]} s",
                )
            )
        if numbers:
            echo_times.append(float(numbers[0]))
    n_echoes = len(s.megre_mag or s.megre_phase)
    if len(echo_times) == n_echoes and any(
        b <= a for a, b in zip(echo_times[:-1], echo_times[1:], strict=True)
    ):
        problems.append(
            InputError(
                (s.megre_mag or s.megre_phase)[0].parent,
                expected="EchoTime increasing with the echo number",
                found=f"echo times {echo_times} s",
            )
        )
    if len(echo_times) != n_echoes:
        echo_times = []
    field_strength, problem = _field_strength(s)
    if problem and (s.megre_mag or s.megre_phase):
        problems.append(problem)
    return echo_times, field_strength, problems


def _echo_time_problem(path: Path, value: Any) -> InputError | None:
    if not _is_number(value) or value <= 0:
        return InputError(path, expected="EchoTime > 0 in seconds", found=f"EchoTime {value!r}")
    if value > _MAX_ECHO_TIME_S:
        return InputError(
            path,
            expected="EchoTime in seconds",
            found=f"EchoTime {value}",
            hint=f"milliseconds? BIDS wants seconds: write {value / 1000:g}",
        )
    return None


def _field_strength(s: SessionInputs) -> tuple[float | None, InputError | None]:
    paths = [*s.megre_mag, *s.megre_phase] or [path for _, path in s.images()]
    for path in paths:
        value = _metadata(s, path).get("MagneticFieldStrength")
        if value is None:
            continue
        if not _is_number(value) or not 0 < value <= 20:
            return None, InputError(
                path, expected="MagneticFieldStrength in tesla (0-20]", found=repr(value)
            )
        return float(value), None
    if not paths:
        return None, None
    return None, InputError(
        paths[0],
        expected="MagneticFieldStrength (tesla) in its JSON sidecar",
        found="none",
        hint="add it to the sidecar, or once for all files in a top-level <suffix>.json",
    )


def _check_chimap_units(data: np.ndarray, path: Path, s: SessionInputs) -> None:
    values = np.abs(data[np.isfinite(data)])
    if values.size and float(np.percentile(values, 99.9)) > 10:
        _warn(
            s,
            f"{path}: Chimap values reach {float(values.max()):.4g}; expected ppm "
            "(tissue within about ±1); if they are ppb, divide by 1000",
        )


def _check_same_grid(
    s: SessionInputs,
    keys: list[str],
    grids: dict[Path, tuple[tuple[int, ...], np.ndarray]],
    *,
    as_error: bool,
) -> None:
    paths = [(key, path) for key, path in s.images() if key in keys and path in grids]
    if len(paths) < 2:
        return
    ref_key, ref = paths[0]
    ref_shape, ref_affine = grids[ref]
    for key, path in paths[1:]:
        shape, affine = grids[path]
        if shape == ref_shape and np.allclose(affine, ref_affine, atol=_AFFINE_ATOL_MM):
            continue
        if shape != ref_shape:
            found = f"shape {shape}"
        else:
            found = f"an affine differing by up to {np.abs(affine - ref_affine).max():.3g} mm"
        exc = InputError(
            path, expected=f"the voxel grid of {ref.name} (shape {ref_shape})", found=found
        )
        if as_error:
            _fail(s, (ref_key, key), exc)
        else:
            _warn(s, str(exc))


def _metadata(s: SessionInputs, path: Path) -> dict[str, Any]:
    """Return the sidecar metadata of ``path``: from discovery, else its own JSON sidecar."""
    known = s.metadata.get(str(path))
    if known is not None:
        return known
    try:
        content = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def read_sidecar(image: str | Path) -> dict[str, Any]:
    """Return the JSON sidecar beside the image ``image`` (:func:`sidecar_path`); ``{}`` when
    there is none.

    Raises:
        InputError: the sidecar is not a JSON object (its file named).
    """
    side = sidecar_path(Path(image))
    if not side.is_file():
        return {}
    try:
        content = json.loads(side.read_text())
    except ValueError as exc:
        raise InputError(str(side), expected="a JSON sidecar", found=str(exc)) from exc
    if not isinstance(content, dict):
        raise InputError(str(side), expected="a JSON object", found=type(content).__name__)
    return content


def sidecar_path(path: Path) -> Path:
    """Return the path of the JSON sidecar beside the image ``path`` (same name, ``.json``).

    Examples:
        >>> sidecar_path(Path("anat/sub-01_FLAIR.nii.gz")).as_posix()
        'anat/sub-01_FLAIR.json'
        >>> sidecar_path(Path("sub-01_echo-1_part-mag_MEGRE.nii")).name
        'sub-01_echo-1_part-mag_MEGRE.json'
    """
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def _echo_number(path: Path) -> int | None:
    match = _ECHO_RE.search(path.name)
    return int(match.group(1)) if match else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _names(paths: Sequence[Path]) -> str:
    return ", ".join(p.name for p in paths) or "none"


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def summarize(sessions: Sequence[SessionInputs]) -> str:
    """Return a plain-text table of the sessions followed by their error and warning lines.

    Columns: subject, session, modalities found, analyses allowed, number of errors.
    """
    header = ("subject", "session", "found", "analyses", "errors")
    rows = [header]
    for s in sessions:
        rows.append(
            (
                f"sub-{s.subject}",
                f"ses-{s.session}" if s.session else "-",
                _found_text(s),
                ", ".join(s.analyses) or "none",
                str(len(s.errors)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_errors = sum(len(s.errors) for s in sessions)
    lines.append("")
    lines.append(f"{len(sessions)} session(s), {n_errors} error(s)")
    errors = [f"  {s.label}: {e}" for s in sessions for e in s.errors]
    warnings = [f"  {w}" for s in sessions for w in s.warnings]
    if errors:
        lines += ["", "Errors:", *errors]
    if warnings:
        lines += ["", "Warnings:", *warnings]
    return "\n".join(lines) + "\n"


def _found_text(s: SessionInputs) -> str:
    parts = [MODALITY_NAMES[key] for key in _SINGLE if getattr(s, key) is not None]
    if s.megre_mag or s.megre_phase:
        parts.append(f"MEGRE({len(s.megre_mag)} mag, {len(s.megre_phase)} phase)")
    return " ".join(parts) or "nothing"


def sessions_to_records(sessions: Sequence[SessionInputs]) -> list[dict[str, Any]]:
    """Return the sessions as JSON-friendly dicts (see :meth:`SessionInputs.to_record`)."""
    return [s.to_record() for s in sessions]
