"""The Nipype workflows: graph, GPU slots, and end-to-end runs on a phantom.

The end-to-end runs share one phantom (2 subjects x 2 sessions at 4 mm, co-registering the T1w
and the GRE) and one work directory, in three runs:

1. sub-02 ses-02's FLAIR is truncated (``--skip-data-check`` lets it past the input checks,
   so it fails inside the workflow): every other session finishes and the failure is reported;
2. the file is restored and the same command rerun, with ``--force`` (sub-01 finished, so
   it would be skipped as complete and current): only what did not finish runs;
3. one longitudinal setting (its estimation grid) changes: only the longitudinal steps of the
   subject processed run again.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from smoulder import config as cfgmod
from smoulder.cli import main
from smoulder.errors import ConfigError
from smoulder.images import read_tsv
from smoulder.inputs import discover, validate_session
from smoulder.phantom.dataset import generate_dataset
from smoulder.phantom.generate import PhantomConfig
from smoulder.pipelines.execution import plugin_settings, run_workflow, workflow_nodes
from smoulder.pipelines.participant import init_participant_wf, plan_sessions
from smoulder.rims.train import load_shards
from tests.conftest import Capture

PIPELINE_PHANTOM = PhantomConfig(
    subjects=2, sessions=2, resolution_mm=4.0, lesions=4, new_lesions_per_session=1, seed=5
)
BROKEN = "sub-02/ses-02/anat/sub-02_ses-02_FLAIR.nii.gz"
# the runs test the workflow, not registration accuracy: estimate at 6 mm to keep them quick
SETTINGS = "registration:\n  session:\n    modalities: [T1w, MEGRE]\n    resolution_mm: 6\n"


# ----------------------------------------------------------------------------------- doctests


@pytest.mark.parametrize("module", ["execution", "session", "subject"])
def test_pipelines_doctests(module: str) -> None:
    """``pipelines/`` lies outside ``src/``, so ``--doctest-modules src`` does not reach it."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"smoulder.pipelines.{module}"))
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------- graph


def build(phantom_dir: Path, tmp_path: Path, *, device: str, engine: str, **cfg: Any) -> Any:
    config = cfgmod.resolve(overrides=cfg or None)
    sessions = [validate_session(s, read_data=False) for s in discover(phantom_dir)]
    plans = plan_sessions(sessions, modalities=config.registration.session.modalities)
    return init_participant_wf(
        plans=plans,
        cfg=config,
        output_dir=tmp_path / "out",
        bids_dir=phantom_dir,
        work_dir=tmp_path / "work",
        engine=engine,
        device=device,
        omp_nthreads=2,
    )


def test_graph_has_only_real_steps(phantom_dir: Path, tmp_path: Path) -> None:
    config = {"registration": {"session": {"modalities": ["T1w"]}}}
    nodes = workflow_nodes(build(phantom_dir, tmp_path, device="cpu", engine="greedy", **config))
    steps = sorted(n for n in nodes if ".ds_" not in n)
    assert steps == [
        "sub_01_wf.ses_01_wf.assess_lesions",
        "sub_01_wf.ses_01_wf.atrophy",
        "sub_01_wf.ses_01_wf.conform_flair",
        "sub_01_wf.ses_01_wf.conform_t1w",
        "sub_01_wf.ses_01_wf.coreg_t1w",
        "sub_01_wf.ses_01_wf.fill_lesions",
        "sub_01_wf.ses_01_wf.segment",
        "sub_01_wf.ses_02_wf.assess_lesions",
        "sub_01_wf.ses_02_wf.atrophy",
        "sub_01_wf.ses_02_wf.conform_flair",
        "sub_01_wf.ses_02_wf.conform_t1w",
        "sub_01_wf.ses_02_wf.coreg_t1w",
        "sub_01_wf.ses_02_wf.fill_lesions",
        "sub_01_wf.ses_02_wf.segment",
        "sub_01_wf.subject_wf.atrophy",
        "sub_01_wf.subject_wf.halfway_01_02",
        "sub_01_wf.subject_wf.jacobian_01_02",
        "sub_01_wf.subject_wf.lesion_activity",
    ]
    assert not any(n.is_gpu_node() for n in nodes.values())
    assert nodes["sub_01_wf.ses_01_wf.coreg_t1w"].n_procs == 2


def test_a_ready_chimap_is_used_as_is(phantom_dir: Path, tmp_path: Path) -> None:
    """A session with a ``_Chimap`` maps it onto the FLAIR instead of reconstructing QSM."""
    bids = tmp_path / "bids"
    shutil.copytree(phantom_dir, bids, ignore=shutil.ignore_patterns("derivatives"))
    anat = bids / "sub-01" / "ses-01" / "anat"
    gre = nib.load(anat / "sub-01_ses-01_echo-1_part-mag_MEGRE.nii.gz")
    truth = np.full(gre.shape, 0.05, np.float32)
    nib.save(nib.Nifti1Image(truth, gre.affine), anat / "sub-01_ses-01_Chimap.nii.gz")
    (anat / "sub-01_ses-01_Chimap.json").write_text(json.dumps({"Units": "ppm"}))
    nodes = workflow_nodes(build(bids, tmp_path, device="cpu", engine="greedy"))
    steps = {n.split(".", 1)[1] for n in nodes if ".ds_" not in n and "ses_" in n}
    assert "ses_01_wf.map_chimap" in steps and "ses_01_wf.qsm" not in steps
    assert "ses_02_wf.qsm" in steps and "ses_02_wf.map_chimap" not in steps
    # the rims are assessed on the ready map, and on the reconstructed QSM where there is none
    ready = nodes["sub_01_wf.ses_01_wf.assess_lesions"].inputs
    assert ready.chimap == str(anat / "sub-01_ses-01_Chimap.nii.gz") == ready.chimap_sidecar
    assert "ses_02_wf.assess_lesions" in steps
    # the interface itself, on the files: a constant map stays that constant on the FLAIR
    from smoulder.pipelines.interfaces import MapChimap

    node = MapChimap(
        chimap=str(anat / "sub-01_ses-01_Chimap.nii.gz"),
        flair_file=str(anat / "sub-01_ses-01_FLAIR.nii.gz"),
    )
    cwd = tmp_path / "map"
    cwd.mkdir()
    result = node.run(cwd=str(cwd))
    out = np.asarray(nib.load(result.outputs.chimap_flair).dataobj)
    flair = nib.load(anat / "sub-01_ses-01_FLAIR.nii.gz")
    assert out.shape == flair.shape[:3]
    centre = tuple(n // 2 for n in out.shape)
    assert out[centre] == pytest.approx(0.05, abs=1e-6)
    assert "world space" in result.outputs.parameters["Description"]


def test_gpu_steps_are_marked_for_multiproc(phantom_dir: Path, tmp_path: Path) -> None:
    nodes = workflow_nodes(build(phantom_dir, tmp_path, device="cuda", engine="torch"))
    gpu = sorted(name.split(".")[-1] for name, n in nodes.items() if n.is_gpu_node())
    assert gpu == sorted(
        ["assess_lesions", "coreg_megre", "coreg_t1w", "coreg_unit1", "qsm", "segment"] * 2
        + ["halfway_01_02", "atrophy"]  # the subject's atrophy registers too
    )
    # one GPU slot each: MultiProc counts a GPU node's n_procs against n_gpu_procs
    assert all(n.n_procs == 1 for n in nodes.values() if n.is_gpu_node())


def _span(use_gpu: bool, seconds: float) -> list[float]:
    import time

    start = time.time()
    time.sleep(seconds)
    return [start, time.time()]


def test_gpu_slots_limit_concurrent_gpu_steps(tmp_path: Path) -> None:
    """With 2 processes and 1 GPU slot, GPU steps never overlap; CPU steps still do."""
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe
    from nipype.pipeline.engine.utils import load_resultfile

    wf = pe.Workflow(name="slots", base_dir=str(tmp_path))
    names = []
    for i, gpu in enumerate([True, True, True, False, False]):
        node = pe.Node(
            Function(input_names=["use_gpu", "seconds"], output_names=["span"], function=_span),
            name=f"{'gpu' if gpu else 'cpu'}{i}",
        )
        node.inputs.use_gpu = gpu
        node.inputs.seconds = 0.6
        wf.add_nodes([node])
        names.append(node.name)
    cfg = cfgmod.resolve(overrides={"execution": {"nprocs": 2, "gpu_slots": 1}})
    assert plugin_settings(cfg)[1]["n_gpu_procs"] == 1
    result = run_workflow(wf, cfg, crash_dir=tmp_path / "crash", progress=False)
    assert {r.status for r in result.records} == {"ran"}
    spans = {
        n: load_resultfile(str(tmp_path / "slots" / n / f"result_{n}.pklz")).outputs.span
        for n in names
    }
    gpu = sorted(v for k, v in spans.items() if k.startswith("gpu"))
    assert all(a[1] <= b[0] for a, b in zip(gpu[:-1], gpu[1:], strict=True)), gpu
    everything = sorted(spans.values())
    assert any(a[1] > b[0] for a, b in zip(everything[:-1], everything[1:], strict=True))


def test_stop_on_first_crash_with_a_plugin_file(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both sessions are broken: without the flag both fail; with it the run stops at one."""
    bids = tmp_path / "bids"
    shutil.copytree(phantom_dir, bids, ignore=shutil.ignore_patterns("derivatives"))
    for session in ("01", "02"):
        flair = bids / f"sub-01/ses-{session}/anat/sub-01_ses-{session}_FLAIR.nii.gz"
        flair.write_bytes(gzip.compress(gzip.decompress(flair.read_bytes())[:5000]))
    settings = tmp_path / "settings.yaml"
    settings.write_text("registration:\n  session:\n    modalities: []\n")
    plugin = tmp_path / "plugin.json"
    plugin.write_text(json.dumps({"plugin": "Linear", "plugin_args": {}}))
    argv = [str(bids), str(tmp_path / "out"), "participant", "--skip-data-check"]
    argv += ["--config", str(settings), "--plugin-config", str(plugin)]

    def failed(run: int, *extra: str) -> list[str]:
        assert main([*argv, "-w", str(tmp_path / f"work{run}"), *extra]) == 1
        # the newest record: two quick runs can share a timestamp second in their names
        logs = (tmp_path / "out/smoulder/logs").glob("provenance-*.json")
        provenance = max(logs, key=lambda p: p.stat().st_mtime_ns)
        record = json.loads(provenance.read_text())
        assert record["plugin"] == "Linear"
        return [n["node"] for n in record["nodes"] if n["status"] == "failed"]

    assert len(failed(1)) == 2
    assert len(failed(2, "--stop-on-first-crash")) == 1
    assert "Failures:" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- plugin


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_plugin_config_file(tmp_path: Path, suffix: str) -> None:
    data = {"plugin": "SLURM", "plugin_args": {"sbatch_args": "--mem=8G"}}
    path = tmp_path / f"plugin{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else "plugin: SLURM\n"
                    "plugin_args:\n  sbatch_args: --mem=8G\n")  # fmt: skip
    loaded = cfgmod.load_plugin_config(path)
    assert loaded == data
    cfg = cfgmod.resolve(overrides={"execution": {**loaded, "nprocs": 3}})
    assert plugin_settings(cfg) == ("SLURM", {"sbatch_args": "--mem=8G"})


def test_plugin_config_multiproc_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "mp.yaml"
    path.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 8\n  maxtasksperchild: 1\n")
    loaded = cfgmod.load_plugin_config(path)
    cfg = cfgmod.resolve(overrides={"execution": {**loaded, "nprocs": 2, "mem_gb": 3}})
    name, args = plugin_settings(cfg)
    assert (name, args["n_procs"], args["memory_gb"], args["maxtasksperchild"]) == (
        "MultiProc",
        2,
        3.0,
        1,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("plugin: Magic\n", "Magic"),
        ("plugin: Linear\nextra: 1\n", "extra"),
        ("plugin_args: {}\n", "'plugin'"),
        ("plugin: Linear\nplugin_args: [1]\n", "mapping"),
    ],
)
def test_bad_plugin_config_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        cfgmod.load_plugin_config(path)


def test_bad_registration_setting_named() -> None:
    bad = {"registration": {"longitudinal": {"pairs": "all"}}}
    with pytest.raises(ConfigError, match="registration.longitudinal.pairs"):
        cfgmod.resolve(overrides=bad)


# ----------------------------------------------------------------------------------- conform


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("A", "S", "R"), ("I", "L", "P")])
def test_conform_keeps_world_positions(codes: tuple[str, ...]) -> None:
    from smoulder.images import conform

    rng = np.random.default_rng(0)
    ornt = nib.orientations.axcodes2ornt(codes)
    affine = nib.orientations.inv_ornt_aff(ornt, (5, 6, 7)) @ np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] += [10.0, -5.0, 3.0]
    img = nib.Nifti1Image(rng.integers(0, 1000, (5, 6, 7)).astype(np.int16), affine)
    out = conform(img)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert out.get_data_dtype() == np.float32
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
        world = nib.affines.apply_affine(img.affine, ijk)
        new = np.round(nib.affines.apply_affine(np.linalg.inv(out.affine), world)).astype(int)
        assert out.dataobj[tuple(new)] == img.dataobj[ijk]


@pytest.mark.parametrize("voxel_mm", [2.0, 3.5])
def test_coarsen_keeps_world_positions(voxel_mm: float) -> None:
    """A blob's world centroid does not move when the image is coarsened (oblique grid)."""
    from smoulder.images import coarsen

    angle = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                      [0, 0, 1]]  # fmt: skip
    affine[:3, :3] = affine[:3, :3] @ np.diag([1.0, 1.0, 1.2])
    affine[:3, 3] = [-20.0, 5.0, 3.0]
    ijk = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), axis=-1)
    world = nib.affines.apply_affine(affine, ijk)
    centre = np.array([-8.0, 22.0, 25.0])
    blob = np.exp(-((world - centre) ** 2).sum(-1) / (2 * 4.0**2)).astype(np.float32)

    def centroid(img: nib.Nifti1Image) -> np.ndarray:
        data = np.asarray(img.dataobj)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1)
        points = nib.affines.apply_affine(img.affine, grid)
        return (points * data[..., None]).sum((0, 1, 2)) / data.sum()

    out = coarsen(nib.Nifti1Image(blob, affine), voxel_mm)
    zooms = np.sqrt((out.affine[:3, :3] ** 2).sum(0))
    np.testing.assert_allclose(zooms, voxel_mm, rtol=0.05)
    np.testing.assert_allclose(centroid(out), centre, atol=0.2)


# ----------------------------------------------------------------------------------- QSM masks


def test_session_masks_map_the_brain_into_gre_space() -> None:
    """The hollow brain mask is filled and cut to the head; sure CSF (≥ 0.9) is the reference.

    The FLAIR-grid masks are centred 4 mm left of the GRE's head: the co-registration (FLAIR
    points → GRE points, a 4 mm shift) brings them onto it only when applied the right way.
    """
    from smoulder.qsm.masks import session_masks
    from smoulder.registration.transforms import AffineTransform

    def world_radius_mm(shape: tuple[int, ...], affine: np.ndarray, centre: list[float]) -> Any:
        points = nib.affines.apply_affine(affine, np.stack(np.indices(shape), axis=-1))
        return np.linalg.norm(points - centre, axis=-1)

    gre_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    gre_affine[:3, 3] = -22.0  # voxel 11 at world 0
    r_gre = world_radius_mm((24, 24, 24), gre_affine, [0.0, 0.0, 0.0])
    magnitude = np.where(r_gre < 20, 100.0, 1.0).astype(np.float32)
    gre = nib.Nifti1Image(magnitude, gre_affine)
    flair_affine = np.eye(4)
    flair_affine[:3, 3] = -24.0
    r_flair = world_radius_mm((48, 48, 48), flair_affine, [-4.0, 0.0, 0.0])
    brain = nib.Nifti1Image(((r_flair >= 6) & (r_flair < 24)).astype(np.uint8), flair_affine)
    csf = nib.Nifti1Image(np.where(r_flair < 6, 0.95, 0.5).astype(np.float32), flair_affine)
    shift = np.eye(4)
    shift[0, 3] = 4.0  # a FLAIR point p is the GRE point p + 4 mm (x)

    mask, reference = session_masks(magnitude, gre, brain, AffineTransform(shift), csf_probseg=csf)
    assert reference is not None and mask.shape == reference.shape == (24, 24, 24)
    assert mask[11, 11, 11] and reference[11, 11, 11]  # the ventricles, filled back in
    assert mask[15, 11, 11] and not reference[15, 11, 11]  # 8 mm from the centre: tissue
    assert mask[20, 11, 11]  # 18 mm: brain, inside the head
    assert not mask[11, 22, 11]  # 22 mm: in the (shifted) brain mask, outside the head
    assert not mask[0, 0, 0]
    _, none = session_masks(magnitude, gre, brain, AffineTransform(shift))
    assert none is None


# ----------------------------------------------------------------------------------- runs


@dataclass
class Run:
    status: int
    out: str
    nodes: dict[str, dict[str, Any]]
    result_mtimes: dict[str, float]
    report: str


@dataclass
class Runs:
    bids: Path
    out: Path
    work: Path
    cwd: Path
    crashed: Run
    resumed: Run
    changed: Run


def _run(argv: list[str], out: Path, work: Path, capsys: Any) -> Run:
    status = main(argv)
    printed = capsys.readouterr()
    provenance = sorted((out / "smoulder" / "logs").glob("provenance-*.json"))[-1]
    nodes = {n["node"]: n for n in json.loads(provenance.read_text())["nodes"]}
    mtimes = {str(p.relative_to(work)): p.stat().st_mtime for p in work.rglob("result_*.pklz")}
    report = (out / "smoulder" / "report.html").read_text()
    return Run(status, printed.out + printed.err, nodes, mtimes, report)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("pipeline")
    pristine = generate_dataset(root / "pristine", PIPELINE_PHANTOM)
    bids = root / "bids"
    shutil.copytree(pristine, bids, ignore=shutil.ignore_patterns("derivatives"))
    broken = bids / BROKEN
    raw = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    settings = root / "settings.yaml"
    settings.write_text(SETTINGS)
    out, work = root / "out", root / "work"
    argv = [str(bids), str(out), "participant", "--fast", "--nprocs", "2", "-w", str(work)]
    argv += ["--skip-data-check", "--config", str(settings)]
    cwd = root / "cwd"  # the runs' working directory: nothing may land there
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        captured = Capture()
        mp.setattr("sys.stdout", captured.out)
        mp.setattr("sys.stderr", captured.err)
        crashed = _run(argv, out, work, captured)
        shutil.copyfile(pristine / BROKEN, broken)
        resumed = _run([*argv, "--force"], out, work, captured)  # sub-01 too, from the cache
        settings.write_text(SETTINGS + "  longitudinal:\n    resolution_mm: 6\n")
        changed = _run(
            [*argv, "--participant-label", "01", "--resource-monitor"], out, work, captured
        )
    return Runs(bids, out, work, cwd, crashed, resumed, changed)


def _steps(run: Run, status: str) -> set[str]:
    return {k for k, n in run.nodes.items() if n["kind"] == "step" and n["status"] == status}


def test_corrupt_session_is_reported_and_the_others_finish(runs: Runs) -> None:
    run = runs.crashed
    assert run.status == 1
    failed = _steps(run, "failed")
    assert failed == {"sub_02_wf.ses_02_wf.conform_flair"}
    node = run.nodes["sub_02_wf.ses_02_wf.conform_flair"]
    assert (
        node["error"].startswith("InputError: ") and "sub-02_ses-02_FLAIR.nii.gz" in node["error"]
    )
    assert any(p.endswith("sub-02_ses-02_FLAIR.nii.gz") for p in node["inputs"])
    assert node["crash_file"] and Path(node["crash_file"]).is_file()
    # blocked: that session's registrations and sub-02's longitudinal steps
    assert _steps(run, "not run") == {
        "sub_02_wf.ses_02_wf.coreg_t1w",
        "sub_02_wf.ses_02_wf.coreg_megre",
        "sub_02_wf.ses_02_wf.segment",
        "sub_02_wf.ses_02_wf.fill_lesions",
        "sub_02_wf.ses_02_wf.qsm",
        "sub_02_wf.ses_02_wf.assess_lesions",
        "sub_02_wf.ses_02_wf.atrophy",
        "sub_02_wf.subject_wf.halfway_01_02",
        "sub_02_wf.subject_wf.jacobian_01_02",
        "sub_02_wf.subject_wf.lesion_activity",
        "sub_02_wf.subject_wf.atrophy",
    }
    finished = _steps(run, "ran")
    assert {k for k in finished if k.startswith("sub_01_wf")} == {
        k for k in run.nodes if k.startswith("sub_01_wf") and run.nodes[k]["kind"] == "step"
    }
    # where a person looks: the console summary, the run log, the HTML report
    line = "sub-02 ses-02 step conform_flair (inputs: sub-02_ses-02_FLAIR.nii.gz): InputError"
    assert line in run.out
    assert "failed: conform_flair" in run.out
    logs = runs.out / "smoulder" / "logs"
    assert any(line in p.read_text() for p in logs.glob("run-*.log"))
    assert "sub-02 ses-02 step conform_flair" in run.report and "InputError" in run.report


def test_rerun_resumes_without_redoing_finished_steps(runs: Runs) -> None:
    before, after = runs.crashed, runs.resumed
    assert after.status == 0, after.out
    redone = _steps(after, "ran")
    assert redone == _steps(before, "failed") | _steps(before, "not run")
    assert _steps(after, "cached") == _steps(before, "ran")
    # Nipype did not execute them again: their result files are untouched
    finished = [_result_file(node) for node in _steps(before, "ran")]
    assert len(finished) == 36  # 24 of sub-01, 10 of sub-02 ses-01, 2 conforms of ses-02
    assert all(after.result_mtimes[k] == before.result_mtimes[k] for k in finished)
    summary = json.loads(sorted(runs.out.glob("smoulder/logs/provenance-*.json"))[1].read_text())
    assert {(r["subject"], r["session"]): r["status"] for r in summary["summary"]} == {
        (f"sub-{s}", x): "ok" for s in ("01", "02") for x in ("ses-01", "ses-02", "longitudinal")
    }


def _result_file(node: str) -> str:
    *folders, name = node.split(".")
    return str(Path("smoulder_wf", *folders, name, f"result_{name}.pklz"))


def test_changed_setting_reruns_exactly_the_affected_steps(runs: Runs) -> None:
    run = runs.changed
    assert run.status == 0, run.out
    assert _steps(run, "ran") == {
        "sub_01_wf.subject_wf.halfway_01_02",
        "sub_01_wf.subject_wf.jacobian_01_02",
        "sub_01_wf.subject_wf.lesion_activity",
    }
    # the atrophy has its own registration (atrophy.registration_mm): not rerun
    assert len(_steps(run, "cached")) == 21
    assert not _steps(run, "failed") and not _steps(run, "not run")
    ran = [n for n in run.nodes.values() if n["status"] == "ran" and n["kind"] == "step"]
    assert all(n["mem_peak_gb"] is not None and n["mem_peak_gb"] > 0 for n in ran)


def test_outputs_are_bids_derivatives(runs: Runs) -> None:
    from bids import BIDSLayout
    from bids.layout import Query

    root = runs.out / "smoulder"
    layout = BIDSLayout(root, validate=False, is_derivative=True)
    assert sorted(layout.get_subjects()) == ["01", "02"]
    for subject in ("01", "02"):
        for session in ("01", "02"):
            query = {"subject": subject, "session": session, "extension": ".nii.gz"}
            assert layout.get(suffix="FLAIR", desc="preproc", **query)
            assert layout.get(suffix="T1w", space="FLAIR", desc="preproc", **query)
            assert layout.get(suffix="MEGRE", space="FLAIR", echo=1, part="mag", **query)
            xfm = layout.get(suffix="xfm", mode="image", to="FLAIR", extension=".mat",
                             subject=subject, session=session)  # fmt: skip
            assert sorted(f.entities["from"] for f in xfm) == ["MEGRE", "T1w"]
            assert not layout.get(suffix="UNIT1", **query)  # not configured: no step, no file
            # segmentation, on the FLAIR grid
            assert layout.get(suffix="mask", desc="brain", **query)
            assert layout.get(suffix="dseg", desc=Query.NONE, **query)
            assert layout.get(suffix="T1w", space="FLAIR", desc="lesionfilled", **query)
            for label in ("CSF", "GM", "WM", "lesion"):
                assert layout.get(suffix="probseg", label=label, **query)
            (lesions,) = layout.get(suffix="dseg", desc="lesions", space=Query.NONE, **query)
            # the lookup tables beside them write no sidecar: the image's is theirs
            assert lesions.get_metadata()["Description"].startswith("lesion instances")
            assert "SpatialReference" in lesions.get_metadata()
            assert (
                lesions.get_image().shape
                == layout.get(suffix="FLAIR", desc="preproc", **query)[0].get_image().shape
            )
            (stats,) = layout.get(suffix="stats", desc="lesions", subject=subject,
                                  session=session, extension=".tsv")  # fmt: skip
            meta = stats.get_metadata()
            assert "volume_ul" in meta and meta["rim_probability"]["Description"]
            assert meta["RimInput"] == "qsm" and meta["RimModel"].startswith("smoulder_prl")
            assert meta["MagneticFieldStrength"] == 3.0 and meta["RimCalibration"]
            table = read_tsv(stats.path)
            assert meta["PRLCount"] == sum(r["rim_call"] == "yes" for r in table)
            assert {r["rim_call"] for r in table} <= {"yes", "no", "not assessed"}
            # what the rims were assessed on: the QSM, on the GRE's own grid
            (assessed,) = layout.get(suffix="Chimap", desc="rims", **query)
            assert "SignConvention" not in assessed.get_metadata()  # it is the table's
            # ... and the patches it classified, a shard for fine-tuning on a site's ratings
            (shard,) = layout.get(suffix="patches", desc="rims", subject=subject,
                                  session=session, extension=".npz")  # fmt: skip
            patches = load_shards([shard.path])
            rows = read_tsv(stats.path)
            called = {int(r["index"]) for r in rows if r["rim_call"] != "not assessed"}
            assert set(patches.lesion_id.tolist()) == called
            assert {k[:2] for k in patches.keys()} <= {(subject, session)}
            # susceptibility: on the GRE's own grid and on the FLAIR's
            (chi,) = layout.get(suffix="Chimap", space=Query.NONE, desc=Query.NONE, **query)
            assert chi.get_metadata()["Units"] == "ppm" and chi.get_metadata()["Method"] == "tv"
            assert chi.get_metadata()["Reference"].startswith("mean susceptibility of the")
            assert layout.get(suffix="Chimap", space="FLAIR", **query)
        later = {"subject": subject, "session": "02", "extension": ".nii.gz"}
        fields = layout.get(suffix="xfm", mode="image", **later)
        assert sorted((f.entities["from"], f.entities["to"]) for f in fields) == [
            ("longitudinal", "ses02"),
            ("ses01", "ses02"),
            ("ses02", "ses01"),
        ]
        _check_lesion_activity(layout, subject)
        _check_atrophy(layout, subject)
        (det,) = layout.get(suffix="jacobian", desc="det", space="ses01", **later)
        (logdet,) = layout.get(suffix="jacobian", desc="logdet", space="ses01", **later)
        meta = det.get_metadata()
        flair = f"bids::sub-{subject}/ses-01/anat/sub-{subject}_ses-01_desc-preproc_FLAIR.nii.gz"
        assert meta["SpatialReference"] == flair and flair in meta["Sources"]
        det_data = np.asarray(det.get_image().dataobj)
        log_data = np.asarray(logdet.get_image().dataobj)
        (reference,) = layout.get(
            subject=subject, session="01", suffix="FLAIR", desc="preproc", extension=".nii.gz"
        )
        assert det_data.shape == reference.get_image().shape
        inside = det_data > 1e-3
        np.testing.assert_allclose(np.log(det_data[inside]), log_data[inside], atol=1e-4)
    (t1w_file,) = layout.get(
        subject="01", session="01", suffix="T1w", space="FLAIR", desc="preproc", extension=".nii.gz"
    )
    t1w = t1w_file.get_metadata()
    assert t1w["Sources"] == [
        "bids:raw:sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz",
        "bids:raw:sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz",
    ]
    description = json.loads((root / "dataset_description.json").read_text())
    generated = description["GeneratedBy"][0]
    assert generated["Name"] == "smoulder" and "Version" in generated and "Models" in generated
    assert description["DatasetLinks"]["raw"] == runs.bids.resolve().as_uri()
    assert not list(root.rglob("*.part*")), "temporary files were left behind"
    assert not list(runs.cwd.iterdir()), "files left in the working directory of the runs"


def _check_lesion_activity(layout: Any, subject: str) -> None:
    """The subject's lesion activity: tables with dictionaries, and maps on one grid."""

    # (not queried by session: pybids reads the dictionary's "session" column as the entity)
    tables = {
        f.entities["desc"]: f
        for f in layout.get(subject=subject, suffix="longitudinal", extension=".tsv")
    }
    assert set(tables) == {"lesions", "activity"}
    rows = read_tsv(tables["lesions"].path)
    meta = tables["lesions"].get_metadata()
    assert meta["volume_ul"]["Units"] == "uL" and meta["SessionDateSources"] == {
        "01": "sessions.tsv", "02": "sessions.tsv"
    }  # fmt: skip
    assert {r["session"] for r in rows} == {"01", "02"} and rows
    fates = {r["fate"] for r in rows}
    assert fates <= {"present", "new", "enlarging", "stable", "shrinking", "resolved", "merged",
                     "split", "absent"}  # fmt: skip
    # each session's own lesion IDs: every instance of its lesion table is in exactly one row
    for session in ("01", "02"):
        (stats,) = layout.get(subject=subject, session=session, suffix="stats", desc="lesions",
                              extension=".tsv")  # fmt: skip
        own = sorted(int(r["index"]) for r in read_tsv(stats.path))
        listed = sorted(int(i) for r in rows if r["session"] == session and r["instances"]
                        for i in r["instances"].split(";"))  # fmt: skip
        assert listed == own
    (interval,) = read_tsv(tables["activity"].path)
    assert interval["interval"] == "01-02" and float(interval["years"]) > 0
    assert int(interval["new_count"]) == sum(r["fate"] == "new" for r in rows)
    grid = {"subject": subject, "space": "longitudinal", "extension": ".nii.gz"}
    maps = layout.get(
        subject=subject, suffix="xfm", extension=".nii.gz", **{"from": "longitudinal"}
    )
    shapes = {f.get_image().shape for f in layout.get(**grid) + maps}
    assert len({s[:3] for s in shapes}) == 1  # one within-subject grid
    for desc, suffix in (("change", "mask"), ("expansion", "map"), ("SEL", "mask")):
        assert layout.get(session="02", desc=desc, suffix=suffix, **grid)
    ids = {int(v) for f in layout.get(desc="lesions", suffix="dseg", **grid)
           for v in np.unique(np.asarray(f.get_image().dataobj)) if v > 0}  # fmt: skip
    assert ids == {int(r["lesion_id"]) for r in rows if r["instances"]}


def _check_atrophy(layout: Any, subject: str) -> None:
    """Per session: volumes and the cord; per subject: the within-subject changes."""
    for session in ("01", "02"):
        query = {"subject": subject, "session": session}
        (stats,) = layout.get(suffix="stats", desc="atrophy", extension=".tsv", **query)
        (row,) = read_tsv(stats.path)
        brain, icv = float(row["brain_ml"]), float(row["icv_ml"])
        assert 0 < brain < icv and float(row["bpf"]) == pytest.approx(brain / icv, abs=1e-4)
        assert stats.get_metadata()["nbv_ml"]["Units"] == "ml"
        assert row["cord_status"] in {"measured", "not measurable"} and row["cord_reason"]
        assert layout.get(suffix="probseg", label="cord", extension=".nii.gz", **query)
        assert layout.get(suffix="mask", desc="cord", extension=".nii.gz", **query)
        assert layout.get(suffix="stats", desc="cordcentreline", extension=".tsv", **query)
    # the subject's table (not queried by session: its "session" column reads as the entity)
    found = layout.get(subject=subject, suffix="stats", desc="atrophy", extension=".tsv")
    (table,) = [f for f in found if "ses-" not in Path(f.path).name]
    rows = read_tsv(table.path)
    assert [r["session"] for r in rows] == ["01", "02"]
    later = rows[1]
    for column in ("pbvc_jacobian_interval_pct", "gm_change_interval_pct", "pbvc_per_year_pct"):
        assert abs(float(later[column])) < 10, column  # a measured change, in percent
    assert later["pbvc_boundary_shift_interval_pct"] == "n/a"  # off by default
    assert later["pbvc_interval_pct"] == later[f"pbvc_{later['pbvc_method']}_interval_pct"]
    assert later["pbvc_class"] in {"pathological", "normal"}
    meta = table.get_metadata()
    assert meta["pbvc_class"]["Description"].count("De Stefano") == 1
    assert set(meta["SessionDates"]) == {"01", "02"}


def test_transforms_are_readable_itk(runs: Runs) -> None:
    from smoulder.registration.transforms import AffineTransform, DisplacementTransform

    anat = runs.out / "smoulder" / "sub-01" / "ses-02" / "anat"
    rigid = AffineTransform.load(anat / "sub-01_ses-02_from-T1w_to-FLAIR_mode-image_xfm.mat")
    rotation = rigid.matrix[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-4)  # rigid
    field = DisplacementTransform.load(
        anat / "sub-01_ses-02_from-ses01_to-ses02_mode-image_xfm.nii.gz"
    )
    grid = nib.load(anat / "sub-01_ses-02_desc-preproc_FLAIR.nii.gz")
    assert field.shape == grid.shape and np.allclose(field.affine, grid.affine)


def test_provenance_records_the_run(runs: Runs) -> None:
    logs = runs.out / "smoulder" / "logs"
    records = [json.loads(p.read_text()) for p in sorted(logs.glob("provenance-*.json"))]
    assert len(records) == 3
    last = records[-1]
    assert last["command"][:4] == ["smoulder", str(runs.bids), str(runs.out), "participant"]
    assert "--resource-monitor" in last["command"]
    assert last["device"]["device"] == "cpu" and last["engine"] in ("greedy", "torch")
    assert last["plugin"] == "MultiProc" and last["plugin_args"]["n_procs"] == 2
    assert {"nipype", "torch", "nibabel"} <= set(last["packages"])
    timed = [n for n in last["nodes"] if n["kind"] == "step"]
    assert timed and all(n["duration_s"] is not None for n in timed)
    configs = sorted(logs.glob("config-*.yaml"))
    assert len(configs) == 3
    assert "resolution_mm: 6" in configs[-1].read_text().split("longitudinal:")[1]
    assert os.path.getsize(runs.out / "smoulder" / "report.html") > 0


def test_phantom_outputs_are_compared_with_the_truth(runs: Runs) -> None:
    from smoulder.phantom.check import compare_with_truth, format_comparison

    pristine = runs.bids.parent / "pristine"
    rows = compare_with_truth(pristine, runs.out / "smoulder")
    truth = pristine / "derivatives" / "truth"
    for sub in ("sub-01", "sub-02"):
        volumes = read_tsv(truth / sub / f"{sub}_desc-lesionvolumes_truth.tsv")
        for ses in ("ses-01", "ses-02"):
            count = sum(1 for r in volumes if r["session"] == ses and float(r["volume_ml"]) > 0)
            found = [r for r in rows if (r.subject, r.when, r.marker) == (sub, ses, "lesions")]
            assert len(found) == 1 and found[0].truth == count, (sub, ses)
            stats = (
                runs.out / "smoulder" / sub / ses / "anat" / f"{sub}_{ses}_desc-lesions_stats.tsv"
            )
            assert found[0].measured == len(read_tsv(stats))
            dice = [r for r in rows if (r.subject, r.when, r.marker) == (sub, ses, "lesion Dice")]
            assert len(dice) == 1 and 0.0 <= dice[0].measured <= 1.0
        atrophy = {r["session"]: r for r in read_tsv(truth / sub / f"{sub}_desc-atrophy_truth.tsv")}
        lesions = read_tsv(truth / sub / f"{sub}_desc-lesions_truth.tsv")
        new = [r for r in rows if (r.subject, r.marker) == (sub, "new lesions")]
        assert [r.truth for r in new] == [sum(x["first_session"] == "ses-02" for x in lesions)]
        assert [r.when for r in rows if (r.subject, r.marker) == (sub, "SEL")] == ["ses-01→ses-02"]
        pbvc = [r for r in rows if (r.subject, r.marker) == (sub, "PBVC")]
        assert [r.when for r in pbvc] == ["ses-01→ses-02"]
        assert pbvc[0].truth == pytest.approx(float(atrophy["ses-02"]["pbvc_from_baseline_pct"]))
        assert pbvc[0].measured is not None and abs(pbvc[0].error) < 5  # type: ignore[arg-type]
    table = format_comparison(rows).splitlines()
    assert table[0].split() == ["subject", "when", "marker", "measured", "truth"]
    assert len(table) == len(rows) + 1
    with pytest.raises(FileNotFoundError, match="phantom's truth"):
        compare_with_truth(runs.bids, runs.out / "smoulder")


def test_group_level_writes_the_cohort_tables_and_page(runs: Runs) -> None:
    assert main([str(runs.bids), str(runs.out), "group"]) == 0
    root = runs.out / "smoulder"
    sessions = read_tsv(root / "group_sessions.tsv")
    assert [(r["participant_id"], r["session_id"]) for r in sessions] == [
        (f"sub-0{s}", f"ses-0{k}") for s in (1, 2) for k in (1, 2)
    ]
    for r in sessions:
        sub, ses = r["participant_id"], r["session_id"]
        stats = root / sub / ses / "anat" / f"{sub}_{ses}_desc-lesions_stats.tsv"
        assert r["lesion_count"] == str(len(read_tsv(stats)))
        assert float(r["brain_ml"]) > 0
    intervals = read_tsv(root / "group_intervals.tsv")
    assert [(r["participant_id"], r["from_session"], r["to_session"]) for r in intervals] == [
        ("sub-01", "ses-01", "ses-02"), ("sub-02", "ses-01", "ses-02")
    ]  # fmt: skip
    atrophy = read_tsv(root / "sub-01" / "anat" / "sub-01_desc-atrophy_stats.tsv")
    assert intervals[0]["pbvc_pct"] == atrophy[1]["pbvc_interval_pct"]
    assert intervals[0]["new_count"] != "n/a"
    dictionary = json.loads((root / "group_intervals.json").read_text())
    assert list(dictionary) == list(intervals[0]) and dictionary["pbvc_pct"]["Units"] == "%"
    page = (root / "cohort.html").read_text()
    assert "<a href='sub-01.html'>sub-01</a>" in page and "<polyline" in page
    # the run's citation: its subjects have two sessions, so the SEL method is cited too
    description = json.loads((root / "dataset_description.json").read_text())
    assert "10.1177/1352458518814117" in description["HowToAcknowledge"]
    assert "Methods and citation" in (root / "report.html").read_text()
