"""``smoulder report OUT`` and ``smoulder review OUT``: the command-line side of the report."""

from __future__ import annotations

import argparse
from pathlib import Path


def _outputs_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Return a parser of a command that reads the participant level's output folder."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "output_dir", type=Path, help="the folder given to 'smoulder BIDS OUT participant'"
    )
    return p


def parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder report``."""
    p = _outputs_parser(
        "smoulder report",
        "(Re)build the per-subject QA reports and the cohort index from the derivatives.",
    )
    p.add_argument("--participant-label", nargs="+", help="subjects (default: all)")
    return p


def derivatives_root(output_dir: Path) -> Path:
    """Return the smoulder derivatives folder of an output folder (``OUT/smoulder`` or OUT)."""
    inner = output_dir / "smoulder"
    return inner if (inner / "dataset_description.json").exists() else output_dir


def build_reports(output_dir: Path, participants: list[str] | None = None) -> list[Path]:
    """Build ``sub-*.html`` and ``index.html``; return the pages written."""
    from smoulder.report.subject import build_index, build_subject_report, collect_sessions

    root = derivatives_root(output_dir)
    subjects = sorted(p.name for p in root.glob("sub-*") if p.is_dir())
    if participants:
        wanted = {s if s.startswith("sub-") else f"sub-{s}" for s in participants}
        subjects = [s for s in subjects if s in wanted]
    known = {s: collect_sessions(root, s) for s in subjects}  # read once, for page and index
    pages = [build_subject_report(root, s, sessions=known[s]) for s in subjects]
    all_subjects = sorted(p.name for p in root.glob("sub-*") if p.is_dir())
    pages.append(build_index(root, all_subjects, known))
    return pages


def run(args: argparse.Namespace) -> int:
    """Run ``smoulder report``."""
    pages = build_reports(args.output_dir, args.participant_label)
    for page in pages:
        print(f"report: {page}")
    return 0


def review_parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder review``."""
    p = _outputs_parser(
        "smoulder review",
        "Serve the reports on this machine and save raters' decisions to "
        "sub-X/sub-X_desc-review_lesions.tsv.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (loopback unless --allow-remote)"
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (no authentication)",
    )
    return p


def run_review(args: argparse.Namespace) -> int:
    """Run ``smoulder review`` until interrupted."""
    from smoulder.report.server import make_server

    root = derivatives_root(args.output_dir)
    server = make_server(root, args.host, args.port, allow_remote=args.allow_remote)
    host, port = server.server_address[:2]
    print(f"serving {root} on http://{host!s}:{port}/index.html (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
