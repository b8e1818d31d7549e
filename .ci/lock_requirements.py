"""Write requirements/lock.txt and requirements/test.txt: the pins of the installed closure.

Every recipe that installs smoulder (``make install`` for CI, containers/build_rootfs.sh for the
image built here, containers/Dockerfile, containers/smoulder.def) installs from these files, so
the tests, the image and a user's container run the same versions. Regenerate after changing a
dependency in pyproject.toml and installing it into the environment:

    .venv/bin/python .ci/lock_requirements.py            # writes requirements/*.txt
    .venv/bin/python .ci/lock_requirements.py --check    # exit 1 when the files are stale

The closure is taken of the distributions installed in *this* interpreter (markers evaluated
for it: CPython 3.11 on Linux x86-64 here), not resolved afresh: the pins are the versions the
test suite last passed with. A torch local label (``2.13.0+cpu``) is dropped, so the same line
is met by the CPU build and by a CUDA build (``2.13.0+cu128``) taken from PyTorch's index.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
TEST_LOCK = ROOT / "requirements" / "test.txt"

HEADER = """\
# Pinned runtime closure of smoulder ({python}, Linux x86-64); written by
# .ci/lock_requirements.py from the environment the test suite passed in: do not edit by hand.
# Installed by: make install (CI), containers/build_rootfs.sh, containers/Dockerfile,
# containers/smoulder.def. smoulder itself is installed after it with --no-deps.
#
# torch==2.13.0 is met by any build of that version; each recipe installs the build first:
#   make install            the CPU wheel (pip finds it via find-links, or PyPI's torch==2.13.0);
#                           a torch already in .venv (a GPU user's CUDA build) is kept
#   build_rootfs.sh         the local CPU wheel copied into the image (TORCH_WHEEL)
#   Dockerfile, smoulder.def  PyTorch's index (TORCH_INDEX): .../whl/cu128 (default) or .../whl/cpu;
#                           a CUDA build adds nvidia-* and triton wheels, pinned by torch itself
"""
TEST_HEADER = """\
# Pins of the test extra (pytest, ruff, mypy, fireants, selenium) beyond requirements/lock.txt;
# written by .ci/lock_requirements.py. make install installs both files together.
"""


def _closure(requirements: list[Requirement], env: dict[str, str]) -> dict[str, str]:
    """Return ``{canonical name: installed version}`` of the requirements and their dependencies."""
    pins: dict[str, str] = {}
    todo = [(r, "") for r in requirements]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in ("", *sorted(req.extras)):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                sys.exit(f"{req.name} is required but not installed: pip install the project first")
            pins[name] = dist.version
            todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return pins


def _lines(pins: dict[str, str]) -> str:
    """Return ``name==version`` lines, sorted; local version labels (``+cpu``) dropped."""
    return "".join(f"{n}=={v.split('+')[0]}\n" for n, v in sorted(pins.items()))


def render() -> tuple[str, str]:
    """Return the text of lock.txt and test.txt for the running interpreter."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = {key: str(value) for key, value in default_environment().items()}
    runtime = _closure([Requirement(r) for r in project["dependencies"]], env)
    test = _closure([Requirement(r) for r in project["optional-dependencies"]["test"]], env)
    extra = {n: v for n, v in test.items() if n not in runtime}
    python = f"CPython {sys.version_info.major}.{sys.version_info.minor}"
    return HEADER.format(python=python) + _lines(runtime), TEST_HEADER + _lines(extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    texts = dict(zip((LOCK, TEST_LOCK), render(), strict=True))
    if args.check:
        stale = [
            str(p.relative_to(ROOT))
            for p, t in texts.items()
            if not p.is_file() or p.read_text() != t
        ]
        print("stale: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    for path, text in texts.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)} ({text.count('==')} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
