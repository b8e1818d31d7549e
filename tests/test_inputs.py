"""BIDS discovery and input validation on tiny datasets written on the fly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smoulder.errors import InputError
from smoulder.images import load_image, phase_to_radians, save_nifti
from smoulder.inputs import (
    ANALYSES,
    SessionInputs,
    discover,
    sessions_to_records,
    summarize,
    validate_session,
)

SHAPE = (8, 8, 8)
AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])
ALL_MODALITIES = ("FLAIR", "T1w", "UNIT1", "MP2RAGE", "MEGRE")


# --------------------------------------------------------------------------------------------
# Dataset builder
# --------------------------------------------------------------------------------------------


def write_image(
    path: Path,
    data: np.ndarray | None = None,
    *,
    affine: np.ndarray = AFFINE,
    meta: dict | None = None,
) -> Path:
    """Write a float32 NIfTI (random positive data by default) and, if given, its sidecar."""
    if data is None:
        data = np.random.default_rng(abs(hash(path.name)) % 2**32).uniform(1, 2, SHAPE)
    save_nifti(np.asarray(data, dtype=np.float32), affine, path)
    if meta is not None:
        sidecar(path).write_text(json.dumps(meta))
    return path


def sidecar(path: Path) -> Path:
    return path.with_name(path.name.replace(".nii.gz", ".json"))


def write_header_only(path: Path, header: nib.Nifti1Header) -> Path:
    """Write an image whose header is used as is (nibabel would otherwise fix the affine)."""
    img = nib.Nifti1Image(np.ones(SHAPE, dtype=np.float32), None, header=header)
    nib.save(img, path)
    return path


def base_header() -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    return header


def add_session(
    root: Path,
    subject: str,
    session: str | None = "01",
    *,
    modalities: tuple[str, ...] = ALL_MODALITIES,
    n_echoes: int = 2,
    t1w_entities: str = "",
    field_strength: float | None = 3.0,
) -> Path:
    """Write one session's images (names as the phantom writes them); return its anat folder."""
    ses = f"_ses-{session}" if session else ""
    anat = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    prefix = anat / f"sub-{subject}{ses}_"
    common = {"MagneticFieldStrength": field_strength} if field_strength is not None else {}
    if "FLAIR" in modalities:
        write_image(Path(f"{prefix}FLAIR.nii.gz"), meta=common)
    if "T1w" in modalities:
        write_image(Path(f"{prefix}{t1w_entities}T1w.nii.gz"), meta=common)
    if "UNIT1" in modalities:
        write_image(Path(f"{prefix}UNIT1.nii.gz"), meta=common)
    if "MP2RAGE" in modalities:
        for inv in (1, 2):
            write_image(Path(f"{prefix}inv-{inv}_part-mag_MP2RAGE.nii.gz"), meta=common)
    if "Chimap" in modalities:
        write_image(Path(f"{prefix}Chimap.nii.gz"), np.full(SHAPE, 0.05), meta=common)
    if "MEGRE" in modalities:
        rng = np.random.default_rng(0)
        for echo in range(1, n_echoes + 1):
            meta = {**common, "EchoTime": 0.005 * echo}
            write_image(Path(f"{prefix}echo-{echo}_part-mag_MEGRE.nii.gz"), meta=meta)
            phase = rng.uniform(-np.pi, np.pi, SHAPE)
            write_image(Path(f"{prefix}echo-{echo}_part-phase_MEGRE.nii.gz"), phase, meta=meta)
    return anat


Builder = Callable[..., Path]


@pytest.fixture
def make_bids(tmp_path: Path) -> Builder:
    """Return a builder: ``make_bids({"01": ["01", "02"], "02": [None]}, **add_session_kw)``."""

    def build(subjects: dict[str, list[str | None]] | None = None, **kwargs) -> Path:
        root = tmp_path / "bids"
        root.mkdir(exist_ok=True)
        (root / "dataset_description.json").write_text(
            json.dumps({"Name": "smoulder test", "BIDSVersion": "1.9.0"})
        )
        for subject, sessions in (subjects or {"01": ["01"]}).items():
            for session in sessions:
                add_session(root, subject, session, **kwargs)
        return root

    return build


def one_session(root: Path, **kwargs) -> SessionInputs:
    sessions = discover(root, **kwargs)
    assert len(sessions) == 1
    return sessions[0]


# --------------------------------------------------------------------------------------------
# Bad inputs: each breaks one file of a good session; the one error must name file and finding
# --------------------------------------------------------------------------------------------

PREFIX = "sub-01_ses-01_"


def _prefix(anat: Path) -> str:
    """Return ``sub-XX_ses-YY_`` (or ``sub-XX_``) for the files of the ``anat`` folder."""
    parts = [anat.parent.name] if anat.parent.name.startswith("sub-") else []
    if not parts:
        parts = [anat.parent.parent.name, anat.parent.name]
    return "_".join(parts) + "_"


def _truncate(anat: Path) -> None:
    path = anat / f"{_prefix(anat)}FLAIR.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _garbage(anat: Path) -> None:
    (anat / f"{_prefix(anat)}T1w.nii.gz").write_bytes(b"this is not an image\n" * 20)


def _four_d(anat: Path) -> None:
    write_image(anat / f"{_prefix(anat)}UNIT1.nii.gz", np.ones((*SHAPE, 2)))


def _nan(anat: Path) -> None:
    data = np.ones(SHAPE)
    data[0, 0, :5] = np.nan
    write_image(anat / f"{_prefix(anat)}FLAIR.nii.gz", data)


def _inf(anat: Path) -> None:
    data = np.ones(SHAPE)
    data[1, 1, :2] = np.inf
    write_image(anat / f"{_prefix(anat)}T1w.nii.gz", data)


def _zero_size(anat: Path) -> None:
    write_image(anat / f"{_prefix(anat)}FLAIR.nii.gz", np.ones((8, 0, 8)))


def _singular_affine(anat: Path) -> None:
    header = base_header()
    singular = np.eye(4)
    singular[:3, 2] = [1.0, 0.0, 0.0]  # third axis parallel to the first
    header.set_sform(singular, code=1)
    write_header_only(anat / f"{_prefix(anat)}T1w.nii.gz", header)


def _zero_voxel(anat: Path) -> None:
    header = base_header()
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    write_header_only(anat / f"{_prefix(anat)}UNIT1.nii.gz", header)


def _no_orientation(anat: Path) -> None:
    header = base_header()
    header["sform_code"] = 0
    header["qform_code"] = 0
    write_header_only(anat / f"{_prefix(anat)}FLAIR.nii.gz", header)


def _phase_scanner_units(anat: Path) -> None:
    phase = np.random.default_rng(1).integers(0, 4096, SHAPE).astype(np.float32)
    phase.flat[0], phase.flat[1] = 0, 4095
    write_image(anat / f"{_prefix(anat)}echo-1_part-phase_MEGRE.nii.gz", phase)


def _phase_degrees(anat: Path) -> None:
    phase = np.random.default_rng(1).uniform(-180, 180, SHAPE).astype(np.float32)
    write_image(anat / f"{_prefix(anat)}echo-1_part-phase_MEGRE.nii.gz", phase)


def _missing_echo_time(anat: Path) -> None:
    for part in ("mag", "phase"):
        path = sidecar(anat / f"{_prefix(anat)}echo-2_part-{part}_MEGRE.nii.gz")
        meta = json.loads(path.read_text())
        del meta["EchoTime"]
        path.write_text(json.dumps(meta))


def _echo_time_ms(anat: Path) -> None:
    path = sidecar(anat / f"{_prefix(anat)}echo-2_part-mag_MEGRE.nii.gz")
    path.write_text(json.dumps({"EchoTime": 10.0, "MagneticFieldStrength": 3.0}))
    sidecar(anat / f"{_prefix(anat)}echo-2_part-phase_MEGRE.nii.gz").unlink()


def _missing_field_strength(anat: Path) -> None:
    for path in anat.glob("*MEGRE.json"):
        meta = json.loads(path.read_text())
        del meta["MagneticFieldStrength"]
        path.write_text(json.dumps(meta))


def _echo_count_mismatch(anat: Path) -> None:
    (anat / f"{_prefix(anat)}echo-2_part-phase_MEGRE.nii.gz").unlink()


def _echo_grid_mismatch(anat: Path) -> None:
    write_image(anat / f"{_prefix(anat)}echo-2_part-mag_MEGRE.nii.gz", np.ones((8, 8, 9)))


BAD_FILES = [
    # id, how to break the session, file named, text found, modality made unusable
    ("truncated-gzip", _truncate, "FLAIR.nii.gz", "truncated", "flair"),
    ("garbage-nii-gz", _garbage, "T1w.nii.gz", "not a gzip file", "t1w"),
    ("4d", _four_d, "UNIT1.nii.gz", "4D shape (8, 8, 8, 2)", "unit1"),
    ("nan", _nan, "FLAIR.nii.gz", "5 NaN voxels", "flair"),
    ("inf", _inf, "T1w.nii.gz", "2 Inf voxels", "t1w"),
    ("zero-size", _zero_size, "FLAIR.nii.gz", "(8, 0, 8) (zero size)", "flair"),
    ("singular-affine", _singular_affine, "T1w.nii.gz", "singular affine", "t1w"),
    ("zero-voxel-size", _zero_voxel, "UNIT1.nii.gz", "voxel sizes (1, 1, 0)", "unit1"),
    ("no-sform-qform", _no_orientation, "FLAIR.nii.gz", "qform_code = 0", "flair"),
    ("phase-degrees", _phase_degrees, "echo-1_part-phase_MEGRE", "pi / 180", "megre_phase"),
    ("no-echo-time", _missing_echo_time, "echo-2_part-mag_MEGRE", "no EchoTime", "megre_mag"),
    ("echo-time-ms", _echo_time_ms, "echo-2_part-mag_MEGRE", "EchoTime 10", "megre_mag"),
    ("no-field", _missing_field_strength, "echo-1_part-mag", "MagneticFieldStrength", "megre_mag"),
    ("echo-count", _echo_count_mismatch, "echo-2_part-mag_MEGRE", "1 phase", "megre_phase"),
    ("echo-grid", _echo_grid_mismatch, "echo-2_part-mag_MEGRE", "shape (8, 8, 9)", "megre_mag"),
]


@pytest.mark.parametrize(
    ("breaker", "file_named", "found", "unusable"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_file_gives_one_line_error(
    make_bids: Builder, breaker, file_named: str, found: str, unusable: str
) -> None:
    root = make_bids()
    breaker(root / "sub-01" / "ses-01" / "anat")
    checked = validate_session(one_session(root))
    assert len(checked.errors) == 1, checked.errors
    error = checked.errors[0]
    assert "\n" not in error
    assert file_named in error and found in error, error
    assert "expected" in error
    assert unusable in checked.unusable
    # everything else in the session was still checked and stays usable
    assert set(checked.usable) | set(checked.unusable) == set(checked.found)


def test_scanner_unit_phase_is_accepted(make_bids: Builder) -> None:
    """12-bit scanner units are converted by QSM (smoulder.images.phase_to_radians)."""
    root = make_bids()
    _phase_scanner_units(root / "sub-01" / "ses-01" / "anat")
    checked = validate_session(one_session(root))
    assert not checked.errors and "qsm_reconstruction" in checked.analyses


def test_echo_count_mismatch_names_both_parts(make_bids: Builder) -> None:
    root = make_bids(n_echoes=3)
    _echo_count_mismatch(root / "sub-01" / "ses-01" / "anat")
    checked = validate_session(one_session(root))
    (error,) = checked.errors
    assert "3 magnitude" in error and "2 phase" in error
    assert "echo-3_part-phase_MEGRE" in error and "echo-3_part-mag_MEGRE" in error
    assert "prl" not in checked.analyses and "qsm_reconstruction" not in checked.analyses


BAD_DATASETS = [
    # id, discover keyword arguments, texts the message must hold
    ("no-participant", {"participant_labels": ["sub-99"]}, ["sub-99", "available", "sub-01"]),
    ("no-session", {"session_labels": ["05"]}, ["ses-05", "ses-01"]),
]


@pytest.mark.parametrize(
    ("kwargs", "texts"), [c[1:] for c in BAD_DATASETS], ids=[c[0] for c in BAD_DATASETS]
)
def test_missing_label_lists_available(make_bids: Builder, kwargs: dict, texts: list[str]) -> None:
    root = make_bids({"01": ["01"], "02": ["01"]}, modalities=("FLAIR",))
    with pytest.raises(InputError) as info:
        discover(root, **kwargs)
    message = str(info.value)
    assert message.startswith(str(root))
    for text in texts:
        assert text in message, message


def test_session_label_on_dataset_without_sessions(make_bids: Builder) -> None:
    root = make_bids({"01": [None]}, modalities=("FLAIR",))
    with pytest.raises(InputError, match="ses-01.*no sessions"):
        discover(root, session_labels=["ses-01"])


def test_not_a_bids_dataset(tmp_path: Path) -> None:
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(InputError, match="found no dataset_description.json") as info:
        discover(tmp_path)
    assert str(info.value).startswith(str(tmp_path))
    with pytest.raises(InputError, match="no such folder"):
        discover(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# Good datasets
# --------------------------------------------------------------------------------------------


def test_good_session_is_complete(make_bids: Builder) -> None:
    root = make_bids(n_echoes=3)
    s = one_session(root)
    assert (s.subject, s.session) == ("01", "01")
    assert s.flair is not None and s.flair.name == f"{PREFIX}FLAIR.nii.gz"
    assert s.mp2rage_inv1 is not None and "inv-1" in s.mp2rage_inv1.name
    assert s.mp2rage_inv2 is not None and "inv-2" in s.mp2rage_inv2.name
    assert [p.name for p in s.megre_phase] == [
        f"{PREFIX}echo-{e}_part-phase_MEGRE.nii.gz" for e in (1, 2, 3)
    ]
    assert s.echo_times_s == pytest.approx([0.005, 0.010, 0.015])
    assert s.field_strength_t == 3.0
    checked = validate_session(s)
    assert checked.errors == []
    assert checked.analyses == list(ANALYSES)
    assert s.errors == []  # validation returns a copy


def test_bad_session_does_not_spoil_the_other_subject(make_bids: Builder) -> None:
    root = make_bids({"01": ["01", "02"], "02": ["01"]})
    _nan(root / "sub-02" / "ses-01" / "anat")
    _missing_echo_time(root / "sub-02" / "ses-01" / "anat")  # second problem, same session
    sessions = [validate_session(s) for s in discover(root)]
    assert [(s.subject, s.session) for s in sessions] == [("01", "01"), ("01", "02"), ("02", "01")]
    assert [len(s.errors) for s in sessions] == [0, 0, 2]
    bad = sessions[2]
    assert "lesion_segmentation" not in bad.analyses and "cord_csa" in bad.analyses


def test_labels_with_or_without_prefix(make_bids: Builder) -> None:
    root = make_bids({"01": ["01", "02"], "02": ["01"]}, modalities=("T1w",))
    picked = discover(root, participant_labels=["sub-02", "01"], session_labels=["ses-02"])
    assert [(s.subject, s.session) for s in picked] == [("01", "02")]


def test_single_session_dataset_and_derivatives_ignored(make_bids: Builder) -> None:
    root = make_bids({"01": [None]}, modalities=("FLAIR", "T1w"))
    truth = root / "derivatives" / "truth"
    add_session(truth, "01", None, modalities=("FLAIR",))
    add_session(truth, "07", "01", modalities=("FLAIR",))
    add_session(root / "work", "08", None, modalities=("FLAIR",))
    s = one_session(root)
    assert s.session is None and s.label == "sub-01"
    assert s.flair is not None and s.flair.parent == root / "sub-01" / "anat"


def test_t1w_with_acq_label_is_found(make_bids: Builder) -> None:
    root = make_bids(modalities=("T1w",), t1w_entities="acq-mprage_")
    s = one_session(root)
    assert s.t1w is not None and s.t1w.name == f"{PREFIX}acq-mprage_T1w.nii.gz"
    assert s.analyses == ["atrophy", "cord_csa"]


def test_choice_among_candidates_is_deterministic_and_recorded(make_bids: Builder) -> None:
    root = make_bids(modalities=("T1w",), t1w_entities="acq-mprage_run-1_")
    anat = root / "sub-01" / "ses-01" / "anat"
    write_image(anat / f"{PREFIX}run-2_T1w.nii.gz")
    write_image(anat / f"{PREFIX}run-1_T1w.nii.gz")
    s = one_session(root)
    assert s.t1w is not None and s.t1w.name == f"{PREFIX}run-1_T1w.nii.gz"
    assert any("3 T1w acquisitions" in w and "run-1_T1w" in w for w in s.warnings)


def test_sidecar_metadata_is_inherited(make_bids: Builder) -> None:
    root = make_bids(modalities=("MEGRE",), field_strength=None)
    (root / "MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": 7}))
    checked = validate_session(one_session(root))
    assert checked.errors == []
    assert checked.field_strength_t == 7.0


def test_echoes_sorted_numerically(make_bids: Builder) -> None:
    root = make_bids(modalities=("MEGRE",), n_echoes=10)
    s = one_session(root)
    assert [p.name.split("_")[2] for p in s.megre_mag][-2:] == ["echo-9", "echo-10"]
    assert s.echo_times_s == pytest.approx([0.005 * e for e in range(1, 11)])


@pytest.mark.parametrize(
    ("modalities", "analyses"),
    [
        (("FLAIR",), ["lesion_segmentation", "atrophy"]),
        (("T1w",), ["atrophy", "cord_csa"]),
        (("UNIT1", "MP2RAGE"), ["atrophy", "cord_csa"]),
        (("FLAIR", "Chimap"), ["lesion_segmentation", "prl", "atrophy"]),
        (("MEGRE",), ["qsm_reconstruction"]),
        (("FLAIR", "T1w", "MEGRE"), list(ANALYSES)),
        ((), []),
    ],
)
def test_analyses_follow_modalities(
    make_bids: Builder, modalities: tuple[str, ...], analyses: list[str]
) -> None:
    root = make_bids(modalities=modalities)
    if not modalities:
        (root / "sub-01" / "ses-01" / "anat").mkdir(parents=True)
        (root / "sub-01" / "ses-01" / "anat" / f"{PREFIX}dummy.txt").write_text("")
    checked = validate_session(one_session(root))
    assert checked.errors == []
    assert checked.analyses == analyses


def test_magnitude_only_megre_allows_no_qsm(make_bids: Builder) -> None:
    root = make_bids(modalities=("FLAIR", "MEGRE"))
    for path in (root / "sub-01" / "ses-01" / "anat").glob("*part-phase*"):
        path.unlink()
    checked = validate_session(one_session(root))
    assert checked.errors == []
    assert checked.analyses == ["lesion_segmentation", "atrophy"]
    assert any("without phase" in w for w in checked.warnings)


def test_summary_and_records(make_bids: Builder) -> None:
    root = make_bids({"01": ["01"], "02": ["01"], "03": ["01"]})
    _inf(root / "sub-03" / "ses-01" / "anat")
    sessions = [validate_session(s) for s in discover(root)]
    text = summarize(sessions)
    for subject in ("sub-01", "sub-02", "sub-03"):
        assert subject in text
    assert "3 session(s), 1 error(s)" in text
    assert "sub-03_ses-01_T1w.nii.gz: expected finite voxel values" in text
    assert "MEGRE(2 mag, 2 phase)" in text
    records = sessions_to_records(sessions)
    assert json.loads(json.dumps(records)) == records
    assert [r["n_errors"] for r in records] == [0, 0, 1]
    assert records[0]["echo_times_s"] == pytest.approx([0.005, 0.01])


def test_validate_header_only(make_bids: Builder) -> None:
    root = make_bids(modalities=("FLAIR", "T1w"))
    _truncate(root / "sub-01" / "ses-01" / "anat")
    _four_d(root / "sub-01" / "ses-01" / "anat")
    s = one_session(root)
    header_only = validate_session(s, read_data=False).errors
    assert len(header_only) == 1 and "UNIT1" in header_only[0]  # truncation needs the data
    assert len(validate_session(s).errors) == 2


# --------------------------------------------------------------------------------------------
# images.py loaders
# --------------------------------------------------------------------------------------------


def test_load_image_drops_trailing_singletons(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.nii.gz", np.ones((*SHAPE, 1)))
    img = load_image(path)
    assert img.shape == SHAPE
    assert np.allclose(img.affine, AFFINE)
    data = np.asarray(img.dataobj)  # the voxels, not only the header
    assert data.dtype == np.float32 and data.shape == SHAPE
    assert load_image(path, ndim=None).shape == (*SHAPE, 1)


def test_load_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="absent.nii.gz: expected a NIfTI file.*no such file"):
        load_image(tmp_path / "absent.nii.gz")


def test_load_image_allow_nan(tmp_path: Path) -> None:
    data = np.ones(SHAPE)
    data[0, 0, 0] = np.nan
    path = write_image(tmp_path / "qsm.nii.gz", data)
    assert np.isnan(np.asarray(load_image(path, allow_nan=True).dataobj)).sum() == 1
    with pytest.raises(InputError, match="1 NaN voxels of 512"):
        load_image(path)


def test_phase_to_radians_tolerance_and_refusal() -> None:
    kept = np.array([-np.pi - 5e-4, 0.0, np.pi + 5e-4])
    np.testing.assert_allclose(phase_to_radians(kept, "p.nii.gz"), kept, rtol=1e-6)
    with pytest.raises(InputError, match=r"p.nii.gz: .*-4000.5 to 4095.*data / 4096 \* pi"):
        phase_to_radians(np.array([-4000.5, 4095.0]), "p.nii.gz")  # not integers


def test_written_files_get_the_usual_mode_not_a_private_one(tmp_path: Path) -> None:
    """Atomic writes go through a private temporary file; the result must not stay 0600."""
    import os

    from smoulder.images import _umask

    path = save_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), tmp_path / "x.nii.gz")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
