"""The command line, in-process, and the configuration it resolves."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smoulder import config as cfgmod
from smoulder.cli import main
from smoulder.errors import ConfigError


def copy_phantom(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("derivatives"))
    return dst


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_help_is_light() -> None:
    """``--help`` must not import numpy, nibabel or torch (it has to answer at once)."""
    code = (
        "import sys; from smoulder.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('numpy', 'nibabel', 'torch', 'nipype', 'bids') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    assert "participant" in out.stdout and "phantom" in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["phantom", "--help"], ["validate", "--help"]])
def test_help_exits_zero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_validate_good_dataset(phantom_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(phantom_dir)]) == 0
    out = capsys.readouterr().out
    assert "sub-01" in out and "0 error(s)" in out


def test_participant_continues_past_a_corrupt_session(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bids = copy_phantom(phantom_dir, tmp_path / "bids")
    bad = bids / "sub-01/ses-02/anat/sub-01_ses-02_FLAIR.nii.gz"
    truncate(bad)
    out = tmp_path / "out"
    # no co-registration: this test is about the inputs
    settings = write(tmp_path / "settings.yaml", "registration:\n  session:\n    modalities: []\n")
    argv = [
        str(bids),
        str(out),
        "participant",
        "--fast",
        "--nprocs",
        "1",
        "-w",
        str(tmp_path / "w"),
    ]
    status = main([*argv, "--config", str(settings)])
    assert status == 1
    printed = capsys.readouterr().out
    assert "sub-01_ses-02_FLAIR.nii.gz" in printed
    assert "skipped: FLAIR unusable" in printed  # the session is left out of the workflow
    assert (out / "smoulder/sub-01/ses-01/anat/sub-01_ses-01_desc-preproc_FLAIR.nii.gz").exists()
    root = out / "smoulder"
    with (root / "sub-01" / "sub-01_inputs.tsv").open() as fh:
        rows = {r["session_id"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert rows["ses-01"]["n_errors"] == "0"
    assert rows["ses-02"]["n_errors"] != "0" and "FLAIR" in rows["ses-02"]["errors"]
    assert "fail" in (root / "inputs.html").read_text()
    saved = yaml.safe_load((root / "logs" / "config.yaml").read_text())
    assert saved["execution"]["nprocs"] == 1
    assert (root / "dataset_description.json").exists()
    assert not list(root.rglob("*.part*")), "temporary files were left behind"
    assert main([str(bids), str(out), "group"]) == 0
    assert (root / "group_inputs.tsv").exists()


def test_unknown_participant_label(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [str(phantom_dir), str(tmp_path / "o"), "participant", "--participant-label", "99"]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "99" in err and "01" in err


def test_group_without_participant_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path), str(tmp_path / "o"), "group"]) == 2
    assert "participant" in capsys.readouterr().err


def test_phantom_command(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    status = main(
        [
            "phantom",
            str(out),
            "--fast",
            "--resolution",
            "4",
            "--sessions",
            "1",
            "--lesions",
            "3",
            "-q",
        ]
    )
    assert status == 0
    assert (out / "dataset_description.json").exists()
    assert (out / "sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz").exists()


def test_phantom_rejects_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["phantom", str(tmp_path / "x"), "--resolution", "0.01"]) == 2
    assert "resolution_mm" in capsys.readouterr().err


def test_gzip_truncation_detected(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bids = copy_phantom(phantom_dir, tmp_path / "bids")
    path = bids / "sub-01/ses-01/anat/sub-01_ses-01_echo-2_part-phase_MEGRE.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 1000]))
    assert (
        main(["validate", str(bids), "--participant-label", "sub-01", "--session-label", "01"]) == 1
    )
    assert "echo-2_part-phase" in capsys.readouterr().out


# ------------------------------------------------------------------- configuration


def test_precedence_defaults_fast_file_cli(tmp_path: Path) -> None:
    preset = write(
        tmp_path / "site.yaml", "execution:\n  nprocs: 3\n  device: cpu\nphantom:\n  lesions: 5\n"
    )
    cfg = cfgmod.resolve(config_file=preset, fast=True, overrides={"execution": {"nprocs": 7}})
    assert cfg.execution.nprocs == 7  # command line wins
    assert cfg.execution.device == "cpu"  # file beats default
    assert cfg.phantom.lesions == 5  # file beats fast
    assert cfg.phantom.resolution_mm == 3.0  # fast beats default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("execution:\n  nprocz: 2\n", "nprocz", id="unknown key"),
        pytest.param(
            "registration:\n  session:\n    foo: 1\n",
            r"unknown configuration key 'registration\.session\.foo' \(known: metric, ",
            id="unknown nested key",
        ),
        pytest.param(
            "execution:\n  device: tpu\n",
            "execution.device: expected one of auto, cpu, cuda, found 'tpu'",
            id="choice",
        ),
        pytest.param("execution:\n  nprocs: -1\n", "nprocs", id="bound"),
        pytest.param(
            "registration:\n  session:\n    modalities: T1w\n",
            "registration.session.modalities: expected a list drawn from T1w, UNIT1, MEGRE",
            id="list",
        ),
        pytest.param("- just\n- a list\n", "mapping", id="not a mapping"),
        pytest.param("execution: [unclosed\n", "YAML", id="syntax"),
    ],
)
def test_bad_config_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfgmod.resolve(config_file=write(tmp_path / "bad.yaml", text))


def test_shipped_presets_resolve() -> None:
    for name in cfgmod.preset_names():
        cfgmod.resolve(config_file=name)
    with pytest.raises(ConfigError, match="presets"):
        cfgmod.resolve(config_file="no-such-preset")


def test_config_is_typed_frozen_and_saved_as_its_yaml() -> None:
    cfg = cfgmod.resolve(fast=True)
    assert cfg.registration.session.modalities == ("T1w", "UNIT1", "MEGRE")  # lists: tuples
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.execution.nprocs = 2  # type: ignore[misc]
    merged = cfgmod.merge(cfgmod.load_yaml("default"), cfgmod.load_yaml("fast"))
    assert cfgmod.dump(cfg) == yaml.safe_dump(merged, sort_keys=False)  # the same text as before


def test_dataset_description_says_how_to_acknowledge(tmp_path: Path) -> None:
    from smoulder.citation import REFERENCES
    from smoulder.derivatives import DerivativesWriter

    writer = DerivativesWriter(tmp_path / "out")
    path = writer.save_description({"smoulder_seg": "0.4.0"}, ["lesion_segmentation", "atrophy"])
    text = json.loads(path.read_text())["HowToAcknowledge"]
    assert "smoulder_seg 0.4.0" in text and REFERENCES["nipype"].doi in text
    assert REFERENCES["siena"].doi in text and REFERENCES["synthseg"].doi in text
    assert REFERENCES["sel"].doi not in text  # no longitudinal analysis in this run
