"""Benchmark: time and memory of `smoulder phantom` (1 subject × 2 sessions) at 1 and 3 mm.

    python benchmarks/phantom.py --out DIR [--quick]

Each case runs the real command line in a child process (so peak RSS is the command's own) and
checks the truth it wrote: PBVC error against the request and cord CSA. There is no peer tool
that generates such data, so the table holds smoulder only. --quick runs the 3 mm case.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_case(resolution_mm: float, workdir: Path) -> dict[str, object]:
    out = workdir / f"phantom-{resolution_mm:g}mm"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "smoulder.cli",
        "phantom",
        str(out),
        "--resolution",
        str(resolution_mm),
        "--subjects",
        "1",
        "--sessions",
        "2",
        "--quiet",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    # the largest child so far: cases run from the smallest to the largest
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with (out / "derivatives/truth/sub-01/sub-01_desc-atrophy_truth.tsv").open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    record = {
        "method": "smoulder-phantom",
        "case": f"1 subject x 2 sessions, {resolution_mm:g} mm",
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "res_mm": resolution_mm,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_kb / 1024, 0),
        "pbvc_error_pct": round(abs(float(rows[1]["pbvc_per_year_pct"]) + 0.5), 4),
        "cord_csa_mm2": float(rows[0]["cord_csa_mm2"]),
        "dataset_mb": round(size_mb, 1),
    }
    shutil.rmtree(out, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="3 mm only (seconds)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    resolutions = [3.0] if args.quick else [3.0, 1.0]
    with tempfile.TemporaryDirectory() as tmp:
        records = [run_case(r, Path(tmp)) for r in resolutions]
    (args.out / "phantom.json").write_text(json.dumps(records, indent=2) + "\n")
    keys = list(records[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in records]
    (args.out / "phantom.md").write_text(
        "# smoulder phantom: generation time\n\n" + "\n".join(lines) + "\n\n"
        "Target (issue 2): 1 subject x 2 sessions at 1 mm in under 120 s on 2 cores.\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
