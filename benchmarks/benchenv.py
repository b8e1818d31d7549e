"""What every benchmark table states about where it ran: the machine and package versions.

Imported by the benchmark scripts, which run as ``python benchmarks/NAME.py`` (so this folder is
on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """Return ``<CPU model>, <N> cores, <RAM> GiB RAM, <OS release>``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {system}"


def versions(packages: tuple[str, ...]) -> str:
    """Return ``pkg version, ...`` for the installed distributions ``packages``."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in packages:
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)
