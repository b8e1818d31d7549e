"""Shared fixtures: a low-resolution phantom generated once per test session."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from smoulder.phantom.dataset import generate_dataset
from smoulder.phantom.generate import PhantomConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: The phantom most tests read: 1 subject × 2 sessions at 3 mm (a few seconds on 2 cores).
FAST_PHANTOM = PhantomConfig(resolution_mm=3.0, lesions=10, new_lesions_per_session=2, seed=3)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the root of a generated fast phantom dataset (read-only for tests)."""
    return generate_dataset(tmp_path_factory.mktemp("phantom"), FAST_PHANTOM)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Return ../shared/data, skipping the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def label_map_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a folder holding one SynthSeg label map (``training_seg_01``): enough to train on."""
    folder = tmp_path_factory.mktemp("label_maps")
    name = "training_seg_01.nii.gz"
    (folder / name).symlink_to(shared_data / "synthseg_label_maps" / name)
    return folder


class Capture:
    """Collect what runs print, read like ``capsys`` (a module-scoped fixture cannot use it):
    patch ``sys.stdout`` and ``sys.stderr`` with ``out`` and ``err``."""

    def __init__(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()

    def readouterr(self) -> SimpleNamespace:
        """Return what was printed since the last call (``out``, ``err``) and forget it."""
        out, err = self.out.getvalue(), self.err.getvalue()
        for buf in (self.out, self.err):
            buf.seek(0)
            buf.truncate()
        return SimpleNamespace(out=out, err=err)
