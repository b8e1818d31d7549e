"""The containers install what CI tests: one lock file, every dependency pinned, a full wheel.

``make install`` (CI), ``containers/build_rootfs.sh`` (the image built without a registry),
``containers/Dockerfile`` and ``containers/smoulder.def`` all install ``requirements/lock.txt``
and then smoulder with ``--no-deps``. The slow test builds the image and runs ``smoulder demo``
in it beside a host run; it is off unless ``SMOULDER_TEST_CONTAINER=1``: it needs root,
buildah, podman and debootstrap, reaches the Debian mirror and PyPI, and takes minutes (about
5 to build, 2 for each demo on 2 cores), so CI does not build an image by default.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = "requirements/lock.txt"
TEST_LOCK = "requirements/test.txt"
RECIPES = [
    "Makefile",
    "containers/build_rootfs.sh",
    "containers/Dockerfile",
    "containers/smoulder.def",
]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(path: Path) -> dict[str, str]:
    """Return ``{canonical name: version}`` of a lock file's ``name==version`` lines."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: not an exact pin: {line!r}"
            assert canonicalize_name(name) not in pins, f"{path.name}: {name} pinned twice"
            pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_installs_from_the_lock(recipe: str) -> None:
    text = (ROOT / recipe).read_text()
    assert LOCK in text, f"{recipe} does not install {LOCK}"
    # the project itself is installed after the lock without resolving anything anew
    assert "--no-deps" in text, f"{recipe} installs smoulder without --no-deps"


@pytest.mark.parametrize(
    ("requirements", "locks"),
    [
        (PROJECT["project"]["dependencies"], [LOCK]),
        (PROJECT["project"]["optional-dependencies"]["test"], [LOCK, TEST_LOCK]),
    ],
    ids=["runtime", "test"],
)
def test_lock_pins_every_dependency(requirements: list[str], locks: list[str]) -> None:
    pins: dict[str, str] = {}
    for lock in locks:
        pins |= _pins(ROOT / lock)
    for line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency in pyproject.toml but not in {locks}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{locks} pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: "
            "regenerate it with .ci/lock_requirements.py"
        )


def test_test_lock_repeats_no_runtime_pin() -> None:
    # make install installs both files in one pip call: a name in both could disagree
    assert _pins(ROOT / LOCK).keys() & _pins(ROOT / TEST_LOCK).keys() == set()


def test_wheel_holds_every_package_file(tmp_path: Path) -> None:
    # the image installs a wheel, not the editable tree: a file missing from the package list
    # or package-data is there in the tests and absent in the container
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    setuptools = PROJECT["tool"]["setuptools"]
    expected = set()
    for package, folder in setuptools["package-dir"].items():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
        for path in (src / folder).rglob("*"):
            if path.is_file():
                expected.add("/".join((*package.split("."), *path.relative_to(src / folder).parts)))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "wheel"),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    # e.g. "Package 'smoulder.report.static' is absent from the `packages` configuration"
    assert [line for line in build.stderr.splitlines() if "Warning" in line] == []
    (wheel,) = (tmp_path / "wheel").glob("smoulder-*.whl")
    assert expected - set(zipfile.ZipFile(wheel).namelist()) == set()


@pytest.mark.slow
def test_demo_in_image_matches_host(tmp_path: Path) -> None:
    if os.environ.get("SMOULDER_TEST_CONTAINER") != "1":
        pytest.skip("builds an image (root, buildah, minutes): set SMOULDER_TEST_CONTAINER=1")
    missing = [t for t in ("buildah", "podman", "debootstrap") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and buildah, podman, debootstrap (missing: {missing})")
    # SMOULDER_TEST_IMAGE=smoulder:local checks an image already built instead of building one
    image = os.environ.get("SMOULDER_TEST_IMAGE")
    if not image:
        image = "smoulder:test"
        subprocess.run([ROOT / "containers/build_rootfs.sh", ROOT / LOCK, image], check=True)
    subprocess.run(
        [ROOT / "containers/run_demo_in_image.sh", tmp_path / "image", image], check=True
    )
    # the same phantom (its default seed) and the image's single thread, on the host
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    smoulder = Path(sys.executable).parent / "smoulder"
    subprocess.run([smoulder, "demo", tmp_path / "host"], check=True, env=env)
    compare = subprocess.run(
        [
            sys.executable,
            ROOT / "containers/compare_outputs.py",
            tmp_path / "host",
            tmp_path / "image",
        ],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
