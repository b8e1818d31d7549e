"""The one writer of smoulder's outputs: ``<OUTPUT_DIR>/smoulder`` as BIDS derivatives.

Every file goes through the atomic writers of :mod:`smoulder.images`, so an output exists under
its final name only when complete. :func:`bids_name` is the only place that turns entities into
a file name; :meth:`DerivativesWriter.path` the only place that decides the folder.

Output names (``<s>``, ``<y>``: subject and session labels; ``A``/``B``: an earlier and a later
session of one subject)::

    sub-<s>/ses-<y>/anat/
      sub-<s>_ses-<y>_desc-preproc_FLAIR.nii.gz              session reference (RAS, float32)
      sub-<s>_ses-<y>_from-T1w_to-FLAIR_mode-image_xfm.mat   ITK rigid: T1w onto the reference
      sub-<s>_ses-<y>_space-FLAIR_desc-preproc_T1w.nii.gz    T1w resampled onto the reference
      (the same for UNIT1, and for MEGRE with ``echo-1_part-mag``)
    sub-<s>/ses-<B>/anat/
      sub-<s>_ses-<B>_from-sesA_to-sesB_mode-image_xfm.nii.gz  ITK displacement field on the
                                                  ses-B reference grid: resamples A onto B
      sub-<s>_ses-<B>_from-sesB_to-sesA_mode-image_xfm.nii.gz  the other way, on the A grid
      sub-<s>_ses-<B>_space-sesA_desc-det_jacobian.nii.gz      Jacobian determinant of the
                                                  A → B map on the A grid (> 1: expansion)
      sub-<s>_ses-<B>_space-sesA_desc-logdet_jacobian.nii.gz   its logarithm

Longitudinal files sit in the later session's folder (the change *at* that session, measured
from session A) so that every file has a ``ses`` entity and any number of sessions stays
unambiguous; ``from``/``to``/``space`` carry ``ses<label>`` (BIDS labels are alphanumeric).
Every image has a JSON sidecar with ``Sources`` and, where its grid is another file's,
``SpatialReference`` (BIDS URIs: ``bids:raw:`` for the input dataset, ``bids::`` for this one).
"""

from __future__ import annotations

import csv
import platform
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from smoulder import __version__
from smoulder.images import atomic_path, save_json, save_text, save_tsv
from smoulder.inputs import MODALITY_NAMES

BIDS_VERSION = "1.10.0"
PIPELINE = "smoulder"

#: Entities smoulder writes, in the order BIDS puts them in a file name (raw-data entities, then
#: the derivative ones).
ENTITIES = (
    "sub",
    "ses",
    "acq",
    "ce",
    "rec",
    "run",
    "echo",
    "inv",
    "part",
    "from",
    "to",
    "mode",
    "space",
    "res",
    "label",
    "desc",
)
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_SUFFIX = re.compile(r"^[A-Za-z0-9]+$")


def bids_name(entities: Mapping[str, str | int | None], *, suffix: str, extension: str) -> str:
    """Return the BIDS file name of ``entities`` (short keys; ``None`` values left out).

    Args:
        entities: ``{"sub": "01", "ses": "02", "from": "T1w", ...}``; keys from
            :data:`ENTITIES`, values alphanumeric labels (or integers for ``echo``, ``run``...).
        suffix: the BIDS suffix (``FLAIR``, ``xfm``, ``mask``...).
        extension: with its leading dot (``.nii.gz``, ``.mat``, ``.tsv``).

    Raises:
        ValueError: an unknown entity, a label that is not alphanumeric, no ``sub``, or a bad
            suffix or extension.

    Examples:
        >>> bids_name({"ses": "01", "sub": "01", "from": "T1w", "to": "FLAIR", "mode": "image"},
        ...           suffix="xfm", extension=".mat")
        'sub-01_ses-01_from-T1w_to-FLAIR_mode-image_xfm.mat'
        >>> bids_name({"sub": "01", "echo": 1, "part": "mag", "space": "FLAIR", "desc": "preproc"},
        ...           suffix="MEGRE", extension=".nii.gz")
        'sub-01_echo-1_part-mag_space-FLAIR_desc-preproc_MEGRE.nii.gz'
        >>> bids_name({"sub": "0_1"}, suffix="T1w", extension=".nii.gz")
        Traceback (most recent call last):
        ...
        ValueError: entity sub: expected an alphanumeric label, found '0_1'
    """
    unknown = sorted(set(entities) - set(ENTITIES))
    if unknown:
        raise ValueError(f"unknown BIDS entities {unknown} (known: {', '.join(ENTITIES)})")
    if entities.get("sub") is None:
        raise ValueError("a BIDS file name needs a 'sub' entity")
    parts = []
    for key in ENTITIES:
        value = entities.get(key)
        if value is None:
            continue
        label = str(value)
        if not _LABEL.match(label):
            raise ValueError(f"entity {key}: expected an alphanumeric label, found {label!r}")
        parts.append(f"{key}-{label}")
    if not _SUFFIX.match(suffix):
        raise ValueError(f"suffix: expected an alphanumeric BIDS suffix, found {suffix!r}")
    if not extension.startswith(".") or "/" in extension:
        raise ValueError(f"extension: expected a leading dot (.nii.gz), found {extension!r}")
    return "_".join([*parts, suffix]) + extension


def is_bids_label(text: str) -> bool:
    """Return whether ``text`` is a BIDS label (alphanumeric), as :func:`bids_name` requires.

    Examples:
        >>> is_bids_label("01"), is_bids_label("01_old"), is_bids_label("")
        (True, False, False)
    """
    return bool(_LABEL.match(text))


def extension_of(path: str | Path) -> str:
    """Return the extension of ``path`` with its dot, ``.nii.gz`` counting as one.

    Examples:
        >>> extension_of("a/sub-01_T1w.nii.gz"), extension_of("x.mat")
        ('.nii.gz', '.mat')
    """
    name = Path(path).name
    for double in (".nii.gz", ".tsv.gz"):
        if name.endswith(double):
            return double
    return Path(name).suffix


#: Columns of the per-session inputs table, with their meaning.
INPUT_COLUMNS: dict[str, str] = {
    "participant_id": "subject label",
    "session_id": "session label (n/a for single-session datasets)",
    "found": "modalities found",
    "analyses": "analyses the inputs allow",
    "n_errors": "number of input errors (the session is skipped where its inputs are unusable)",
    "errors": "the error messages, separated by ' | '",
}


class DerivativesWriter:
    """Names and writes smoulder's derivatives under ``<output_dir>/smoulder``.

    Args:
        output_dir: the BIDS-App output folder; files go to ``<output_dir>/smoulder``.
        raw_dir: the input BIDS dataset, for ``bids:raw:`` URIs in ``Sources``.
    """

    def __init__(self, output_dir: str | Path, raw_dir: str | Path | None = None) -> None:
        self.root = Path(output_dir).absolute() / PIPELINE
        # resolved, as discovery resolves the dataset's paths (symbolic links)
        self.raw_dir = Path(raw_dir).resolve() if raw_dir is not None else None
        #: Names this run's files in ``logs/``: UTC time and a random suffix, so that runs
        #: started in the same second (one job per subject on a cluster) do not collide.
        self.started = datetime.now(timezone.utc)
        self.stamp = self.started.strftime("%Y%m%dT%H%M%SZ") + f"-{_token()}"

    @property
    def logs(self) -> Path:
        """Return the folder of run logs, configurations and provenance records."""
        return self.root / "logs"

    # -- dataset level
    def save_description(
        self, models: dict[str, str] | None = None, analyses: Sequence[str] = ()
    ) -> Path:
        """Return the path of ``dataset_description.json`` (GeneratedBy with versions).

        ``GeneratedBy`` names smoulder's version and ``Models`` the version of every trained
        model the run used (empty while no step uses one); ``DatasetLinks`` maps ``raw`` to
        the input dataset so that the ``bids:raw:`` URIs of ``Sources`` resolve;
        ``HowToAcknowledge`` is the methods paragraph with the references of the tools,
        templates, data and models of the run's ``analyses`` (:mod:`smoulder.citation`).
        """
        from smoulder.citation import methods_text

        generated: dict[str, Any] = {
            "Name": PIPELINE,
            "Version": __version__,
            "CodeURL": "https://github.com/smoulder-ms/smoulder",
            "Models": dict(models or {}),
        }
        description: dict[str, Any] = {
            "Name": "smoulder derivatives",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [generated],
            "HowToAcknowledge": methods_text(__version__, dict(models or {}), list(analyses)),
        }
        if self.raw_dir is not None:
            description["DatasetLinks"] = {"raw": self.raw_dir.as_uri()}
        return save_json(description, self.root / "dataset_description.json")

    def save_config(self, cfg: dict[str, Any], *, argv: list[str]) -> Path:
        """Return the path of the resolved configuration saved for this run (with provenance)."""
        from smoulder.config import dump

        text = dump(cfg)
        save_text(text, self.logs / f"config-{self.stamp}.yaml")
        save_json(self._provenance(argv), self.provenance_path)
        return save_text(text, self.logs / "config.yaml")

    @property
    def provenance_path(self) -> Path:
        """Return the path of this run's provenance record."""
        return self.logs / f"provenance-{self.stamp}.json"

    def save_provenance(self, run: dict[str, Any], *, argv: list[str]) -> Path:
        """Return the path of this run's provenance record, completed with ``run``.

        ``run`` holds what only the end of a run knows (device, plugin, per-node timings,
        failures); the command and versions written by :meth:`save_config` are kept.
        """
        return save_json({**self._provenance(argv), **run}, self.provenance_path)

    def _provenance(self, argv: list[str]) -> dict[str, Any]:
        return {
            "command": argv,
            "run": self.stamp,
            "started": self.started.isoformat(timespec="seconds"),
            "smoulder": __version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": _package_versions(),
        }

    # -- per-session and per-subject files
    def path(
        self,
        entities: Mapping[str, str | int | None],
        *,
        suffix: str,
        extension: str,
        datatype: str = "anat",
    ) -> Path:
        """Return where the derivative with these entities goes (``sub-X/[ses-Y/]anat/...``)."""
        folder = self.root / f"sub-{entities['sub']}"
        if entities.get("ses") is not None:
            folder = folder / f"ses-{entities['ses']}"
        return folder / datatype / bids_name(entities, suffix=suffix, extension=extension)

    def uri(self, path: str | Path) -> str:
        """Return a BIDS URI for ``path``: ``bids::`` here, ``bids:raw:`` in the input dataset.

        Paths elsewhere are returned as ``file://`` URIs.
        """
        target = Path(path).absolute()
        for prefix, base in (("bids::", self.root), ("bids:raw:", self.raw_dir)):
            if base is not None and target.is_relative_to(base):
                return prefix + target.relative_to(base).as_posix()
        return target.as_uri()

    def save_derivative(
        self,
        in_file: str | Path,
        entities: Mapping[str, str | int | None],
        *,
        suffix: str,
        sources: Sequence[str | Path] = (),
        spatial_reference: str | Path | None = None,
        metadata: Mapping[str, Any] | None = None,
        sidecar: bool = True,
    ) -> Path:
        """Return the derivative path after copying ``in_file`` there with its JSON sidecar.

        Args:
            in_file: the file to publish (its extension is kept).
            entities: see :func:`bids_name`.
            suffix: the BIDS suffix.
            sources: files the output was made from (paths; written as BIDS URIs).
            spatial_reference: the file whose voxel grid the output is on.
            metadata: more sidecar fields (``Description``, units...).
            sidecar: write the JSON sidecar; ``False`` for a file whose sidecar another output
                of the same name writes (a ``dseg`` image's lookup table).
        """
        in_file = Path(in_file)
        out = self.path(entities, suffix=suffix, extension=extension_of(in_file))
        with atomic_path(out) as tmp:
            shutil.copyfile(in_file, tmp)
        if not sidecar:
            return out
        fields: dict[str, Any] = dict(metadata or {})
        if sources:
            fields["Sources"] = [self.uri(p) for p in sources]
        if spatial_reference is not None:
            fields["SpatialReference"] = self.uri(spatial_reference)
        save_json(fields, out.with_name(out.name[: -len(extension_of(out))] + ".json"))
        return out

    # -- inputs
    def save_subject_inputs(self, subject: str, records: list[dict[str, Any]]) -> Path:
        """Return the path of the subject's inputs table (one row per session).

        Beside it: the table's column dictionary (``sub-X_inputs.json``) and every detail of
        the checks (``sub-X_desc-checks_inputs.json``, ``{"Sessions": [...]}``; a mapping, as
        pybids reads every JSON file of a dataset as metadata).
        """
        rows = [_input_row(r) for r in records]
        folder = self.root / f"sub-{subject}"
        path = folder / bids_name({"sub": subject}, suffix="inputs", extension=".tsv")
        save_json(
            {k: {"Description": v} for k, v in INPUT_COLUMNS.items()}, path.with_suffix(".json")
        )
        details = bids_name({"sub": subject, "desc": "checks"}, suffix="inputs", extension=".json")
        save_json({"Sessions": records}, folder / details)
        return save_tsv(rows, path)

    def gather_inputs(self, participants: list[str] | None = None) -> Path:
        """Return the path of the cohort inputs table gathered from every subject's table."""
        rows: list[dict[str, str]] = []
        for table in sorted(self.root.glob("sub-*/sub-*_inputs.tsv")):
            subject = table.parent.name[len("sub-") :]
            if participants and subject not in participants:
                continue
            with table.open() as fh:
                rows.extend(csv.DictReader(fh, delimiter="\t"))
        if not rows:
            from smoulder.errors import InputError

            raise InputError(
                self.root,
                expected="per-subject tables from the participant level (sub-*/sub-*_inputs.tsv)",
                found="none; run 'participant' first",
            )
        save_json(
            {k: {"Description": v} for k, v in INPUT_COLUMNS.items()},
            self.root / "group_inputs.json",
        )
        return save_tsv(rows, self.root / "group_inputs.tsv")

    def save_cohort(self, participants: list[str] | None = None) -> list[Path]:
        """Return the paths of the cohort tables (with dictionaries) and ``cohort.html``.

        One row per session (``group_sessions.tsv``) and per interval
        (``group_intervals.tsv``) with every marker the subjects' tables hold
        (:func:`smoulder.cohort.cohort_tables`), and the cohort page linking each subject's
        report.
        """
        from smoulder.cohort import cohort_tables
        from smoulder.report.cohort import cohort_page

        tables = cohort_tables(self.root, participants)
        written = []
        for name, rows, dictionary in (
            ("group_sessions", tables.sessions, tables.session_dictionary),
            ("group_intervals", tables.intervals, tables.interval_dictionary),
        ):
            written.append(save_tsv(rows, self.root / f"{name}.tsv", columns=list(dictionary)))
            written.append(save_json(dictionary, self.root / f"{name}.json"))
        reports = [p.stem for p in self.root.glob("sub-*.html")]
        written.append(save_text(cohort_page(tables, reports), self.root / "cohort.html"))
        return written

    def save_inputs_report(self, records: list[dict[str, Any]]) -> Path:
        """Return the path of an HTML page listing each session's inputs, analyses and errors."""
        from smoulder.report.pages import inputs_page

        page = inputs_page([input_summary(r) for r in records])
        return save_text(page, self.root / "inputs.html")

    def save_run_report(
        self,
        rows: Sequence[Mapping[str, Any]],
        failures: Sequence[str],
        *,
        nodes: Sequence[Any] = (),
        latest: bool = True,
    ) -> Path:
        """Return the path of the run's report: what each session produced and what failed.

        ``logs/report-<stamp>.html`` keeps each run's; ``report.html`` shows the latest run that
        processed something (``latest``): a rerun that had nothing to do (every subject
        complete and current, or locked by another run) leaves the page of the run that did
        the work, and returns its own page under ``logs/``. The other arguments are those of
        :func:`smoulder.report.pages.run_page`.
        """
        import json

        from smoulder.report.pages import run_page

        description = self.root / "dataset_description.json"
        methods = ""
        if description.is_file():
            methods = str(json.loads(description.read_text()).get("HowToAcknowledge", ""))
        page = run_page(rows, failures, run=self.stamp, nodes=nodes, methods=methods)
        kept = save_text(page, self.logs / f"report-{self.stamp}.html")
        if not latest and (self.root / "report.html").is_file():
            return kept
        return save_text(page, self.root / "report.html")


def _token() -> str:
    import secrets

    return secrets.token_hex(3)


def input_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """Return what the inputs table and page show of one session's inputs record.

    Args:
        record: :meth:`smoulder.inputs.SessionInputs.to_record` of the session.

    Returns:
        ``subject`` (``sub-X``), ``session`` (``ses-Y`` or ``n/a``), ``found`` (modality
        names; MEGRE with its numbers of magnitude and phase images), ``analyses``,
        ``n_errors``, ``errors`` and ``warnings``.

    Examples:
        >>> record = {"subject": "01", "session": None, "flair": "f.nii.gz", "megre_mag": ["m"],
        ...           "analyses": [], "n_errors": 0, "errors": [], "warnings": []}
        >>> s = input_summary(record)
        >>> s["subject"], s["session"], s["found"]
        ('sub-01', 'n/a', ['FLAIR', 'MEGRE(1 mag, 0 phase)'])
    """
    found = [name for key, name in MODALITY_NAMES.items() if record.get(key)]
    if record.get("megre_mag"):
        found.append(
            f"MEGRE({len(record['megre_mag'])} mag, {len(record.get('megre_phase') or [])} phase)"
        )
    return {
        "subject": f"sub-{record['subject']}",
        "session": f"ses-{record['session']}" if record.get("session") else "n/a",
        "found": found,
        "analyses": list(record["analyses"]),
        "n_errors": record["n_errors"],
        "errors": list(record["errors"]),
        "warnings": list(record.get("warnings", [])),
    }


def _input_row(record: dict[str, Any]) -> dict[str, Any]:
    """Return the inputs-table row (:data:`INPUT_COLUMNS`) of one session's record."""
    s = input_summary(record)
    return {
        "participant_id": s["subject"],
        "session_id": s["session"],
        "found": " ".join(s["found"]),
        "analyses": " ".join(s["analyses"]) or "n/a",
        "n_errors": s["n_errors"],
        "errors": " | ".join(s["errors"]) or "n/a",
    }


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "numpy",
        "scipy",
        "nibabel",
        "nipype",
        "pybids",
        "torch",
        "monai",
        "antspyx",
        "nilearn",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
