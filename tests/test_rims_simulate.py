"""Training lesions cut from a phantom session: one QSM and one phase patch per truth lesion."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from smoulder.rims.simulate import draw_acquisition, session_patches
from smoulder.rims.train import load_shards, write_shard


def _truth_rims(phantom: Path) -> dict[int, int]:
    table = phantom / "derivatives" / "truth" / "sub-01" / "sub-01_desc-lesions_truth.tsv"
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return {int(r["lesion_id"]): int(r["rim"] == "yes") for r in rows}


def test_session_patches_follow_the_truth_and_round_trip(phantom_dir: Path, tmp_path: Path) -> None:
    patches = session_patches(phantom_dir, subject="fast")
    truth = _truth_rims(phantom_dir)
    assert len(patches) > 0 and len(patches) % 2 == 0  # a QSM and a phase patch per lesion
    assert patches.patches.shape[1:] == (4, 24, 24, 24)
    assert set(patches.input_kind) == {"qsm", "phase"}
    for lesion, label in zip(patches.lesion_id, patches.labels, strict=True):
        assert truth[int(lesion)] == int(label)
    # the mask channel holds the lesion, centred in the patch
    mask = patches.patches[:, 3].astype(np.float32)
    assert (mask.max(axis=(1, 2, 3)) > 0.5).all()
    assert (mask[:, 10:14, 10:14, 10:14].max(axis=(1, 2, 3)) > 0.5).all()
    back = load_shards([write_shard(patches, tmp_path / "shard.npz")])
    assert np.array_equal(back.labels, patches.labels)
    assert np.allclose(back.patches, patches.patches.astype(np.float16), equal_nan=True)


def test_acquisitions_are_drawn_within_their_ranges() -> None:
    draws = [draw_acquisition(np.random.default_rng(seed)) for seed in range(200)]
    assert {d.b0_tesla for d in draws} == {3.0, 7.0}
    assert {len(d.echo_times_ms) for d in draws} == {1, 2, 3, 4, 5}
    assert all(15.0 <= d.snr <= 50.0 for d in draws)
    assert all(d.echo_times_ms[0] >= 3.0 and d.echo_times_ms[-1] <= 28.0 for d in draws)


def test_simulated_shards_resume_and_keep_off_the_held_out_seeds(tmp_path: Path) -> None:
    """An existing shard is kept (a rerun resumes), and benchmark seeds are refused."""
    from smoulder.rims.simulate import FIRST_HELD_OUT_SEED, simulate_shard, simulate_shards

    done = tmp_path / "shard-00007.npz"
    done.write_bytes(b"made by an earlier run")
    assert simulate_shards(tmp_path, [7]) == [done]
    assert done.read_bytes() == b"made by an earlier run"
    with pytest.raises(ValueError, match=str(FIRST_HELD_OUT_SEED)):
        simulate_shard(FIRST_HELD_OUT_SEED, tmp_path)
