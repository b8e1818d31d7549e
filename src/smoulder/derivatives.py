"""The one writer of smoulder's outputs: ``<OUTPUT_DIR>/smoulder`` as BIDS derivatives.

Every file goes through the atomic writers of :mod:`smoulder.images`, so an output exists under
its final name only when complete.
"""

from __future__ import annotations

import csv
import html
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from smoulder import __version__
from smoulder.images import save_json, save_text, save_tsv

BIDS_VERSION = "1.10.0"
PIPELINE = "smoulder"

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
    """Names and writes smoulder's derivatives under ``<output_dir>/smoulder``."""

    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir) / PIPELINE

    # -- dataset level
    def save_description(self, models: dict[str, str] | None = None) -> Path:
        """Return the path of ``dataset_description.json`` (GeneratedBy with versions)."""
        generated: dict[str, Any] = {
            "Name": PIPELINE,
            "Version": __version__,
            "CodeURL": "https://github.com/smoulder-ms/smoulder",
        }
        if models:
            generated["Models"] = models
        return save_json(
            {
                "Name": "smoulder derivatives",
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": [generated],
            },
            self.root / "dataset_description.json",
        )

    def save_config(self, cfg: dict[str, Any], *, argv: list[str]) -> Path:
        """Return the path of the resolved configuration saved for this run (with provenance)."""
        from smoulder.config import dump

        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        logs = self.root / "logs"
        text = dump(cfg)
        save_text(text, logs / f"config-{stamp}.yaml")
        save_json(
            {
                "command": argv,
                "started": stamp,
                "smoulder": __version__,
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "packages": _package_versions(),
            },
            logs / f"provenance-{stamp}.json",
        )
        return save_text(text, logs / "config.yaml")

    # -- inputs
    def save_subject_inputs(self, subject: str, records: list[dict[str, Any]]) -> Path:
        """Return the path of the subject's inputs table (one row per session)."""
        rows = [_input_row(r) for r in records]
        path = self.root / f"sub-{subject}" / f"sub-{subject}_inputs.tsv"
        save_json(
            {k: {"Description": v} for k, v in INPUT_COLUMNS.items()}, path.with_suffix(".json")
        )
        save_json(records, self.root / f"sub-{subject}" / f"sub-{subject}_inputs.json")
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

    def save_inputs_report(self, records: list[dict[str, Any]]) -> Path:
        """Return the path of an HTML page listing each session's inputs, analyses and errors."""
        rows = []
        for r in records:
            status = "fail" if r["n_errors"] else "pass"
            errors = "".join(f"<li>{html.escape(e)}</li>" for e in r["errors"])
            warnings = "".join(f"<li>{html.escape(w)}</li>" for w in r["warnings"])
            rows.append(
                f"<tr class='{status}'><td>sub-{html.escape(r['subject'])}</td>"
                f"<td>{html.escape(_ses(r))}</td><td>{html.escape(', '.join(_found(r)))}</td>"
                f"<td>{html.escape(', '.join(r['analyses']))}</td><td>{status}</td>"
                f"<td><ul>{errors}{warnings}</ul></td></tr>"
            )
        page = (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<title>smoulder inputs</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
            ".fail{background:#fde2e2}.pass{background:#e6f5e6}</style></head><body>"
            f"<h1>smoulder {html.escape(__version__)}: inputs</h1>"
            f"<p>{len(records)} session(s); "
            f"{sum(1 for r in records if r['n_errors'])} with errors.</p>"
            "<table><thead><tr><th>subject</th><th>session</th><th>found</th><th>analyses</th>"
            "<th>status</th><th>messages</th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table></body></html>\n"
        )
        return save_text(page, self.root / "inputs.html")


def _ses(record: dict[str, Any]) -> str:
    return f"ses-{record['session']}" if record.get("session") else "n/a"


def _found(record: dict[str, Any]) -> list[str]:
    names = {
        "flair": "FLAIR",
        "t1w": "T1w",
        "unit1": "UNIT1",
        "mp2rage_inv1": "inv-1",
        "mp2rage_inv2": "inv-2",
        "chimap": "Chimap",
    }
    found = [label for key, label in names.items() if record.get(key)]
    if record.get("megre_mag"):
        found.append(
            f"MEGRE({len(record['megre_mag'])} mag, {len(record.get('megre_phase') or [])} phase)"
        )
    return found


def _input_row(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "participant_id": f"sub-{record['subject']}",
        "session_id": _ses(record),
        "found": " ".join(_found(record)),
        "analyses": " ".join(record["analyses"]) or "n/a",
        "n_errors": record["n_errors"],
        "errors": " | ".join(record["errors"]) or "n/a",
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
