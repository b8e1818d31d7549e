"""QSM: unwrapping, background removal, dipole inversion, units, clear errors, the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from smoulder.cli import main
from smoulder.errors import InputError
from smoulder.images import phase_to_radians
from smoulder.qsm import core
from smoulder.qsm.reconstruct import InversionSettings, load_echoes, reconstruct


def _grid(n: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(float(n))] * 3, indexing="ij")) - n / 2


def test_unwrapping_recovers_a_known_phase_inside_the_mask() -> None:
    g = _grid(40)
    truth = 0.02 * (g[0] ** 2 + 0.5 * g[1] ** 2) + 0.3 * g[2]  # many wraps
    mask = (g**2).sum(0) < 17**2
    noise = torch.rand(truth.shape) * 2 * math.pi - math.pi
    wrapped = torch.where(mask, torch.angle(torch.exp(1j * truth)), noise)
    out = core.laplacian_unwrap(wrapped, (1, 1, 1), mask)
    diff = (out - truth)[mask]
    assert (diff - diff.mean()).abs().max() < 1e-2


def test_vsharp_removes_a_known_external_field() -> None:
    g = _grid(48)
    mask = (g**2).sum(0) < 18**2
    chi = torch.where(
        ((g - torch.tensor([0, 0, 5.0])[:, None, None, None]) ** 2).sum(0) < 16, 0.1, 0.0
    )
    kernel = core.dipole_kernel(chi.shape, (1, 1, 1))
    local_true = core.forward_field(chi, kernel)
    outside = torch.zeros_like(chi)  # a strong source outside the mask: harmonic inside
    outside[:4, :4, :4] = 50.0
    external = core.forward_field(outside, kernel)
    local, kept = core.vsharp((local_true + external) * mask, mask, (1, 1, 1), radii_mm=(8, 5, 3))
    ref, _ = core.vsharp(local_true * mask, mask, (1, 1, 1), radii_mm=(8, 5, 3))
    err = (local - ref)[kept]
    assert kept.sum() > 0.3 * mask.sum()
    assert err.abs().max() < 0.05 * external[kept].abs().max()


@pytest.mark.parametrize("method", ["tkd", "tv"])
def test_dipole_inversion_recovers_a_sphere(method: str) -> None:
    g = _grid(64)
    r = (g**2).sum(0).sqrt()
    chi = torch.where(r < 8, 0.2, 0.0)
    kernel = core.dipole_kernel(chi.shape, (1, 1, 1))
    field = core.forward_field(chi, kernel)
    if method == "tkd":
        est = core.tkd(field, kernel)
        lo = 0.15  # TKD underestimates (measured 0.164)
    else:
        est = core.tv_admm(field, kernel, (1, 1, 1), lam=1e-4, rho=1e-2, iterations=60)
        lo = 0.19  # measured 0.198
    assert lo < float(est[r < 6].mean()) < 0.21
    assert float(est[r > 12].abs().mean()) < 0.005


def test_weighted_tv_ignores_a_region_without_signal() -> None:
    """A blob of noise phase (reliability 0) and the unknown field outside the measured ball
    leave χ untouched with the reliability weight; the uniform data term is pulled by both."""
    g = _grid(64)
    r = (g**2).sum(0).sqrt()
    chi = torch.where(r < 8, 0.2, 0.0)
    kernel = core.dipole_kernel(chi.shape, (1, 1, 1))
    field = core.forward_field(chi, kernel)
    bad = ((g - torch.tensor([0.0, 14.0, 0.0]).reshape(3, 1, 1, 1)) ** 2).sum(0) < 4**2
    torch.manual_seed(0)
    inside = r < 26
    measured = torch.where(bad, torch.randn(chi.shape) * 0.2, field) * inside
    reliability = torch.where(bad, 0.0, 1.0) * inside
    errors = {}
    for name, weight in (("uniform", None), ("reliability", reliability)):
        est = core.tv_admm(
            measured, kernel, (1, 1, 1), lam=1e-4, rho=1e-2, iterations=60, data_weight=weight
        )
        errors[name] = float((est - chi)[inside].abs().mean())
        if weight is not None:
            assert 0.19 < float(est[r < 6].mean()) < 0.21  # measured 0.199
    assert errors["reliability"] < 0.002  # measured 0.0007
    assert errors["uniform"] > 5 * errors["reliability"]  # measured 0.015


def test_b0_direction_follows_an_oblique_affine() -> None:
    angle = math.radians(20)
    rot = np.array(
        [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot * 0.7
    b0 = core.b0_in_voxels(affine)
    np.testing.assert_allclose(b0, [0, math.sin(angle), math.cos(angle)], atol=1e-9)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([-math.pi, 0, 3.0], [-math.pi, 0, 3.0]),
        ([0, 2 * math.pi - 0.01], [0, 2 * math.pi - 0.01]),
        ([-4096, 0, 4095], [-math.pi, 0, 4095 * math.pi / 4096]),
        ([0, 2048, 4095], [-math.pi, 0, 4095 * 2 * math.pi / 4096 - math.pi]),
    ],
)
def test_phase_units_are_detected(values, expected) -> None:
    np.testing.assert_allclose(phase_to_radians(np.array(values, float), "p"), expected, atol=1e-5)
    # NaN voxels are ignored, integers are read as such
    with_nan = phase_to_radians(np.array([*values, np.nan], float), "p")
    np.testing.assert_allclose(with_nan[:-1], expected, atol=1e-5)
    if all(float(v).is_integer() for v in values):
        as_int = phase_to_radians(np.array(values, np.int16), "p")
        np.testing.assert_allclose(as_int, expected, atol=1e-5)


def _write_echoes(folder: Path, n: int = 3, *, drop: str | None = None, phase_scale: float = 1.0):
    folder.mkdir(parents=True, exist_ok=True)
    g = _grid(24).numpy()
    mask = (g**2).sum(0) < 9**2
    chi = np.where(((g - [[[[0]]], [[[0]]], [[[2]]]]) ** 2).sum(0) < 9, 0.1, 0.0).astype(np.float32)
    kernel = core.dipole_kernel(chi.shape, (1, 1, 1))
    field = core.forward_field(torch.from_numpy(chi), kernel).numpy()
    mags, phases = [], []
    for e in range(n):
        te = 0.005 * (e + 1)
        phase = (
            np.angle(np.exp(1j * (0.3 + core.rad_per_ms_per_ppm(3.0) * field * te * 1000))) * mask
        )
        for part, data in (("mag", mask * 100.0 + 1.0), ("phase", phase * phase_scale)):
            path = folder / f"sub-01_echo-{e + 1}_part-{part}_MEGRE.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), path)
            side = {"EchoTime": te, "MagneticFieldStrength": 3.0}
            if drop:
                side.pop(drop)
            path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(side))
            (mags if part == "mag" else phases).append(path)
    return mags, phases, mask, chi


def test_both_unwrapping_methods_give_the_same_field(tmp_path: Path) -> None:
    mags, phases, mask, _ = _write_echoes(tmp_path)
    echoes = load_echoes(mags, phases)
    lap = reconstruct(echoes, mask, method="tkd", unwrap="laplacian")
    qual = reconstruct(echoes, mask, method="tkd", unwrap="quality")
    assert qual.parameters["unwrapping"] == "quality"
    inside = lap.mask
    np.testing.assert_allclose(qual.total_field_ppm[inside], lap.total_field_ppm[inside], atol=1e-4)
    with pytest.raises(ValueError, match="unwrap"):
        reconstruct(echoes, mask, unwrap="goldstein")


def test_tv_matches_its_objective_on_a_sphere_after_cropping() -> None:
    """The inversion runs on the mask's box padded to fast FFT sizes: same answer as the
    whole grid, inside the mask."""
    from smoulder.qsm.reconstruct import crop_pad_t, fft_box

    g = _grid(40)
    chi = torch.where((g**2).sum(0) < 4**2, 0.1, 0.0)
    mask = (g**2).sum(0) < 12**2
    field = core.forward_field(chi, core.dipole_kernel(chi.shape, (1, 1, 1))) * mask
    whole = core.tv_admm(field, core.dipole_kernel(field.shape, (1, 1, 1)), (1, 1, 1), lam=1e-4)
    box = fft_box(mask.numpy(), [6, 6, 6])
    part = crop_pad_t(field, box)
    cropped = core.tv_admm(part, core.dipole_kernel(part.shape, (1, 1, 1)), (1, 1, 1), lam=1e-4)
    a = crop_pad_t(whole, box)[crop_pad_t(mask, box)]
    b = cropped[crop_pad_t(mask, box)]
    assert all(core.fast_size(n) == n for n in part.shape)
    assert float(((a - a.mean()) - (b - b.mean())).abs().max()) < 0.01


@pytest.mark.parametrize("weight", ["reliability", "uniform"])
def test_reconstruct_on_a_small_head(tmp_path: Path, weight: str) -> None:
    mags, phases, mask, chi = _write_echoes(tmp_path)
    echoes = load_echoes(mags, phases)
    assert echoes.echo_times_ms == pytest.approx([5.0, 10.0, 15.0])
    result = reconstruct(echoes, mask, method="tv", settings=InversionSettings(data_weight=weight))
    assert result.parameters["data_weight"] == weight
    assert ("mu" in result.parameters) == (weight == "reliability")
    inside = chi > 0
    kept = result.mask
    assert result.chi_ppm[inside & kept].mean() > result.chi_ppm[~inside & kept].mean() + 0.05


def test_a_mask_too_thin_for_vsharp_is_an_error(tmp_path: Path) -> None:
    mags, phases, _, _ = _write_echoes(tmp_path)
    thin = np.zeros((24, 24, 24), bool)
    thin[10:13, 10:13, 10:13] = True  # 3 voxels across, V-SHARP's smallest ball is 2 mm
    with pytest.raises(InputError, match="none left after erosion"):
        reconstruct(load_echoes(mags, phases), thin)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("no-te", "EchoTime"),
        ("no-b0", "MagneticFieldStrength"),
        ("count", "one phase image per magnitude"),
        ("grid", "grid"),
        ("units", "phase in radians"),
        ("truncated", "truncated or corrupt"),
    ],
)
def test_bad_echoes_are_named(tmp_path: Path, kind: str, message: str) -> None:
    drop = {"no-te": "EchoTime", "no-b0": "MagneticFieldStrength"}.get(kind)
    mags, phases, _, _ = _write_echoes(
        tmp_path, drop=drop, phase_scale=20.0 if kind == "units" else 1.0
    )
    if kind == "count":
        phases = phases[:-1]
    if kind == "grid":
        img = nib.load(phases[0])
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), phases[0])
    if kind == "truncated":
        phases[1].write_bytes(phases[1].read_bytes()[:-200])
    with pytest.raises(InputError, match=message) as err:
        load_echoes(mags, phases)
    if kind == "truncated":
        assert phases[1].name in str(err.value)


def test_echoes_in_any_order_and_scanner_units_load_alike(tmp_path: Path) -> None:
    mags, phases, _, _ = _write_echoes(tmp_path / "rad")
    for path in phases:  # noise outside the head spans the whole range, as on a scanner
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        data[0, 0, 0], data[-1, -1, -1] = -np.pi, 4095 * np.pi / 4096
        nib.save(nib.Nifti1Image(data, img.affine), path)
    ref = load_echoes(mags, phases)
    # the same echoes as int16 scanner units (-4096..4095), listed last echo first
    for path in phases:
        img = nib.load(path)
        units = np.round(np.asarray(img.dataobj) * 4096 / np.pi).clip(-4096, 4095)
        nib.save(nib.Nifti1Image(units.astype(np.int16), img.affine), path)
    got = load_echoes(mags[::-1], phases[::-1])
    assert got.echo_times_ms == ref.echo_times_ms
    np.testing.assert_array_equal(got.magnitude, ref.magnitude)
    np.testing.assert_allclose(got.phase, ref.phase, atol=np.pi / 4096)
    assert got.phase.dtype == np.float32 and got.phase.flags.c_contiguous


def test_qsm_command_writes_maps(tmp_path: Path, capsys) -> None:
    mags, phases, mask, _ = _write_echoes(tmp_path / "in")
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), mask_path)
    argv = ["qsm", "--magnitude", *map(str, mags), "--phase", *map(str, phases)]
    argv += [
        "--mask",
        str(mask_path),
        "-o",
        str(tmp_path / "out"),
        "--prefix",
        "sub-01_",
        "--method",
        "tkd",
    ]
    assert main(argv) == 0
    side = json.loads((tmp_path / "out" / "sub-01_Chimap.json").read_text())
    assert (
        side["Units"] == "ppm" and side["Method"] == "tkd" and side["MagneticFieldStrength"] == 3.0
    )
    for name in (
        "Chimap",
        "desc-local_fieldmap",
        "desc-filtered_phase",
        "desc-swi_MEGRE",
        "desc-minip_MEGRE",
    ):
        assert (tmp_path / "out" / f"sub-01_{name}.nii.gz").exists()
    assert "QSM (tkd" in capsys.readouterr().out


def test_oblique_kernel_is_even_so_real_ffts_equal_the_complex_convolution() -> None:
    b0 = (0.0, math.sin(math.radians(20)), math.cos(math.radians(20)))
    kernel = core.dipole_kernel((16, 20, 24), (1.0, 1.0, 1.2), b0, dtype=torch.float64)
    mirrored = torch.roll(torch.flip(kernel, (0, 1, 2)), (1, 1, 1), (0, 1, 2))
    assert torch.equal(kernel, mirrored)
    chi = torch.from_numpy(np.random.default_rng(0).normal(size=(16, 20, 24)))
    full = torch.fft.ifftn(kernel * torch.fft.fftn(chi))
    assert float(full.imag.abs().max()) < 1e-12
    assert torch.allclose(core.forward_field(chi, kernel), full.real, atol=1e-12)


def test_chi_is_referenced_to_the_given_mask(tmp_path: Path) -> None:
    mags, phases, mask, chi = _write_echoes(tmp_path)
    echoes = load_echoes(mags, phases)
    ref = mask.copy()
    ref[12:] = False  # half of the head
    result = reconstruct(echoes, mask, method="tkd", reference_mask=ref)
    inside = ref & result.mask
    assert inside.sum() >= 100
    assert abs(float(result.chi_ppm[inside].mean())) < 1e-5
    assert "reference mask" in result.parameters["reference"]
    small = reconstruct(echoes, mask, method="tkd", reference_mask=ref & (np.arange(24) < 6))
    assert "fewer than" in small.parameters["reference"]  # too few voxels: the mask's mean
    with pytest.raises(InputError, match="GRE grid"):
        reconstruct(echoes, mask, reference_mask=ref[:-1])


@pytest.mark.parametrize("unwrap", ["laplacian", "quality"])
def test_single_echo_phase_gives_a_map(tmp_path: Path, unwrap: str) -> None:
    """One echo (an SWI acquisition's phase) is unwrapped in space and divided by its TE."""
    mags, phases, mask, chi = _write_echoes(tmp_path, n=1)
    echoes = load_echoes(mags, phases)
    result = reconstruct(echoes, mask, method="tv", unwrap=unwrap)
    inside, kept = chi > 0, result.mask
    assert result.chi_ppm[inside & kept].mean() > result.chi_ppm[~inside & kept].mean() + 0.05


def test_an_oblique_slab_is_reconstructed_as_well_as_the_whole_head(tmp_path: Path) -> None:
    """A 7 T-style oblique slab (the phantom's GRE turned 15° and cut to 45 mm): B0 is oblique
    in its voxels, its brain fills the first and last slices, and its χ error stays that of
    the whole field of view (the slab's ends must not wrap onto each other in the FFTs)."""
    from smoulder.grids import resample_to_grid
    from smoulder.phantom.dataset import generate_dataset
    from smoulder.phantom.generate import PhantomConfig

    errors = {}
    for slab in (None, 45.0):
        cfg = PhantomConfig(
            resolution_mm=3.0, sessions=1, lesions=4, seed=3, gre_tilt_deg=15.0, gre_slab_mm=slab
        )
        root = generate_dataset(tmp_path / f"slab-{slab}", cfg)
        anat, truth = root / "sub-01/ses-01/anat", root / "derivatives/truth/sub-01/ses-01/anat"
        mags = sorted(anat.glob("*_part-mag_MEGRE.nii.gz"))
        echoes = load_echoes(mags, [Path(str(m).replace("part-mag", "part-phase")) for m in mags])
        gre = nib.load(mags[0])
        if slab is not None:
            assert gre.shape[2] == 15
            assert core.b0_in_voxels(gre.affine)[1] == pytest.approx(math.sin(math.radians(15)))

        def on_gre(name: str, truth: Path = truth, gre: nib.Nifti1Image = gre) -> np.ndarray:
            img = nib.load(truth / f"sub-01_ses-01_space-T1w_{name}.nii.gz")
            data = np.asarray(img.dataobj, np.float32)
            return resample_to_grid(data, img.affine, gre.shape[:3], gre.affine)

        brain = on_gre("desc-brain_mask") > 0.5
        if slab is not None:
            assert brain[..., 0].any() and brain[..., -1].any()
        chi = reconstruct(echoes, brain, method="tv").chi_ppm
        kept = chi != 0
        errors[slab] = float(np.std((chi - on_gre("Chimap"))[kept]))
    assert errors[45.0] < 1.2 * errors[None]
