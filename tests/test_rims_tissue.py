"""Tests of the rim module's sign convention check, T1 black holes and MP2RAGE quantitative T1."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smoulder.errors import InputError
from smoulder.phantom import physics
from smoulder.rims.sign import (
    AS_STORED,
    INVERTED,
    apply_sign,
    check_paramagnetic_sign,
    phase_sign_from_sidecar,
    resolve_sign,
)
from smoulder.rims.tissue import (
    lesion_qt1_ms,
    mp2rage_parameters,
    t1_black_holes,
    t1_map_ms,
    unit1_lookup,
)

# --- sign convention ---------------------------------------------------------------------------

SHAPE = (64, 64, 64)
#: (centre, direction) of the synthetic veins, voxel coordinates; B0 along the third axis.
PARALLEL = [((20, 24, 32), (0, 0, 1)), ((42, 40, 32), (0, 0.2, 1))]
PERPENDICULAR = [((32, 20, 24), (1, 0, 0)), ((32, 44, 40), (0, 1, 0)), ((24, 32, 44), (1, 1, 0))]
GAMMA_RAD_PER_MS_PER_PPM = 2e-3 * np.pi * physics.GAMMA_BAR_MHZ_PER_T * 3.0


def vein_volume(
    veins: list[tuple[tuple[int, ...], tuple[float, ...]]], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(chi_ppm, phase_rad, magnitude, brain)`` of a WM-like ball crossed by veins.

    Veins (radius 1.2 mm, chi +0.3 ppm over WM) are dark on magnitude; the phase is that of
    the veins' own field (the phantom's dipole model) at TE 20 ms, with noise.
    """
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE, dtype=np.float32)
    brain = np.sqrt(sum((g - 31.5) ** 2 for g in grid)) < 29
    vein = np.zeros(SHAPE, np.float32)
    for centre, direction in veins:
        d = np.asarray(direction, np.float32) / np.linalg.norm(direction)
        rel = grid - np.asarray(centre, np.float32)[:, None, None, None]
        along = np.tensordot(d, rel, axes=1)
        dist = np.sqrt(np.maximum((rel**2).sum(0) - along**2, 0))
        vein = np.maximum(vein, np.clip(0.5 - (dist - 1.2), 0, 1) * (np.abs(along) < 22))
    vein *= brain
    chi = (-0.03 + 0.3 * vein) * brain
    field = physics.field_from_chi(chi, (1.0, 1.0, 1.0))
    phase = field * GAMMA_RAD_PER_MS_PER_PPM * 20.0 + rng.normal(0, 0.02, SHAPE)
    bias = 1.0 + 0.3 * (grid[0] - 32) / 32
    magnitude = bias * (1.0 - 0.65 * vein) + rng.normal(0, 0.03, SHAPE)
    chi = chi + rng.normal(0, 0.01, SHAPE) * brain
    return chi.astype(np.float32), phase.astype(np.float32), magnitude, brain


@pytest.fixture(scope="module")
def veins() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return vein_volume(PARALLEL + PERPENDICULAR)


@pytest.mark.parametrize("kind", ["qsm", "phase"])
@pytest.mark.parametrize("sign", [1, -1])
def test_sign_check_finds_paramagnetic_veins(veins, kind: str, sign: int) -> None:
    chi, phase, magnitude, brain = veins
    data = (chi if kind == "qsm" else phase) * sign
    check = check_paramagnetic_sign(data, magnitude, brain, (1.0, 1.0, 1.0), kind=kind)
    assert check.conclusive, check
    assert check.sign == sign
    assert check.convention == (AS_STORED if sign > 0 else INVERTED)
    assert check.evidence == "dark tubular" and check.agreement > 0.8
    stated, convention = resolve_sign(None, check)
    assert stated == sign
    assert ("inverted" if sign < 0 else "as stored") in convention


def test_phase_check_corrects_for_vessel_orientation() -> None:
    """Veins across B0 have a negative inner field: read naively they would say 'inverted'."""
    _, phase, magnitude, brain = vein_volume(PERPENDICULAR, seed=1)
    check = check_paramagnetic_sign(phase, magnitude, brain, (1.0, 1.0, 1.0), kind="phase")
    assert check.vessel_median < check.brain_median  # naive reading: paramagnetic negative
    assert check.conclusive and check.sign == 1, check


def test_sign_check_without_veins_is_undetermined() -> None:
    rng = np.random.default_rng(2)
    brain = np.ones((32, 32, 32), bool)
    check = check_paramagnetic_sign(
        rng.normal(0, 0.01, brain.shape), rng.normal(1, 0.03, brain.shape), brain, (1, 1, 1)
    )
    assert not check.conclusive and check.convention.startswith("undetermined")
    assert resolve_sign(-1, check) == (-1, f"{INVERTED} (stated by the sidecar)")


def test_resolve_sign_names_a_contradicting_sidecar(veins) -> None:
    chi, _, magnitude, brain = veins
    check = check_paramagnetic_sign(-chi, magnitude, brain, (1.0, 1.0, 1.0))
    sign, convention = resolve_sign(1, check)
    assert sign == -1 and convention.startswith(INVERTED) and "overruled" in convention
    np.testing.assert_allclose(apply_sign(-chi, sign), chi)


@pytest.mark.parametrize(
    ("sidecar", "expected"),
    [
        ({}, None),
        ({"PhaseSign": 1}, 1),
        ({"PhaseSign": "-1"}, -1),
        ({"PhaseConvention": "paramagnetic negative"}, -1),
        ({"SusceptibilitySign": "Positive"}, 1),
        ({"ParamagneticSign": -1.0}, -1),
    ],
)
def test_phase_sign_from_sidecar(sidecar: dict, expected: int | None) -> None:
    assert phase_sign_from_sidecar(sidecar) == expected


@pytest.mark.parametrize("value", ["left-handed", 0, True, None])
def test_phase_sign_from_sidecar_rejects_unknown_values(value: object) -> None:
    with pytest.raises(InputError, match="PhaseSign") as err:
        phase_sign_from_sidecar({"PhaseSign": value}, path="sub-01_part-phase_MEGRE.json")
    assert err.value.path == "sub-01_part-phase_MEGRE.json"


def test_apply_sign_rejects_other_values() -> None:
    with pytest.raises(ValueError, match="sign"):
        apply_sign(np.zeros(3), 0)


# --- T1 black holes ----------------------------------------------------------------------------


def black_hole_volume(bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(t1w, instances, nawm, gm)``: WM 100, cortex-like GM slab 80, two lesions."""
    rng = np.random.default_rng(3)
    shape = (40, 40, 40)
    t1w = np.full(shape, 100.0) + rng.normal(0, 2.0, shape)
    gm = np.zeros(shape, bool)
    gm[:, :, :4] = True
    t1w[gm] = 80.0 + rng.normal(0, 2.0, int(gm.sum()))
    grid = np.indices(shape)
    ids = np.zeros(shape, np.int16)
    ids[((grid - np.array([12, 12, 20])[:, None, None, None]) ** 2).sum(0) <= 16] = 1
    ids[((grid - np.array([28, 28, 20])[:, None, None, None]) ** 2).sum(0) <= 16] = 2
    t1w[ids == 1] *= 0.7  # a black hole: as dark as grey matter and darker
    t1w[ids == 2] *= 0.97  # isointense with white matter
    if bias:
        t1w *= 1.0 + 0.25 * (grid[0] - 20) / 20  # a strong residual receive bias
    return t1w, ids, ~gm, gm


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_gm", [False, True])
def test_black_hole_is_flagged_and_isointense_lesion_is_not(bias: bool, with_gm: bool) -> None:
    t1w, ids, nawm, gm = black_hole_volume(bias)
    rows = t1_black_holes(t1w, ids, nawm, gm_mask=gm if with_gm else None)
    assert rows[1]["t1_black_hole"] and not rows[2]["t1_black_hole"]
    assert rows[1]["t1w_ratio"] == pytest.approx(0.7, abs=0.03)
    assert rows[2]["t1w_ratio"] == pytest.approx(0.97, abs=0.03)
    assert rows[1]["t1w_z"] < -2 < rows[2]["t1w_z"]  # the bias widens the NAWM spread
    assert rows[1]["t1w_ratio_threshold"] == pytest.approx(0.9, abs=0.02)


def test_black_holes_check_shapes() -> None:
    t1w, ids, nawm, _ = black_hole_volume(False)
    with pytest.raises(ValueError, match="nawm_mask"):
        t1_black_holes(t1w, ids, nawm[:-1])


# --- MP2RAGE quantitative T1 -------------------------------------------------------------------

PROTOCOLS = [
    physics.MP2RAGEParams(),
    physics.MP2RAGEParams(6000.0, 800.0, 2700.0, 7.0, 5.0, 160, 6.5, 0.9),
    physics.MP2RAGEParams(5500.0, 750.0, 2600.0, 5.0, 4.0, 161, 7.0, 1.0),
]
T1S_MS = np.array([600.0, 850.0, 1150.0, 1400.0, 2000.0, 3000.0, 4200.0])


def sidecars(p: physics.MP2RAGEParams) -> tuple[dict, dict]:
    """Return the INV1 and INV2 sidecars of a protocol, as the phantom writes them (seconds)."""
    common = {
        "RepetitionTimePreparation": p.tr_mp2rage_ms / 1000,
        "RepetitionTimeExcitation": p.tr_gre_ms / 1000,
        "NumberShots": p.n_readouts,
        "InversionEfficiency": p.inversion_efficiency,
    }
    return (
        {**common, "InversionTime": p.ti1_ms / 1000, "FlipAngle": p.flip1_deg},
        {**common, "InversionTime": p.ti2_ms / 1000, "FlipAngle": p.flip2_deg},
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mp2rage_voxel_round_trips(protocol: physics.MP2RAGEParams) -> None:
    """The phantom's exact steady state, made into UNIT1 and inverted by our lookup table."""
    inv1, inv2 = physics.mp2rage_signals(0.8, T1S_MS, 50.0, params=protocol)
    unit1 = physics.mp2rage_unit1(inv1, inv2)
    params = mp2rage_parameters(*sidecars(protocol))
    # beyond the curve's monotonic part (CSF-like T1 with some protocols) T1 is ambiguous
    inside = T1S_MS <= unit1_lookup(params)[0].max()
    assert inside.sum() >= 6
    np.testing.assert_allclose(t1_map_ms(unit1, params)[inside], T1S_MS[inside], rtol=0.01)
    # the scanner's 12-bit scaling quantises UNIT1 to 1/4095: a little less accurate
    stored = np.round(4095 * (unit1 + 0.5))
    np.testing.assert_allclose(t1_map_ms(stored, params)[:5], T1S_MS[:5], rtol=0.02)


def test_lookup_is_monotonic_and_outside_is_nan() -> None:
    params = mp2rage_parameters(*sidecars(PROTOCOLS[0]))
    t1, u = unit1_lookup(params)
    assert np.all(np.diff(u) > 0) and np.all(np.diff(t1) < 0)
    assert np.isnan(t1_map_ms(np.array([u.max() + 0.01]), params)).all()


def test_lesion_qt1_is_the_median() -> None:
    t1 = np.full((5, 5, 5), 850.0)
    ids = np.zeros(t1.shape, int)
    ids[1:3, 1:3, 1:3] = 3
    t1[1:3, 1:3, 1:3] = 1400.0
    t1[1, 1, 1] = np.nan
    assert lesion_qt1_ms(t1, ids) == {3: 1400.0}


def test_missing_inversion_efficiency_is_assumed_and_noted() -> None:
    inv1, inv2 = sidecars(PROTOCOLS[0])
    del inv1["InversionEfficiency"], inv2["InversionEfficiency"]
    params = mp2rage_parameters(inv1, inv2)
    assert params.inversion_efficiency == 0.96 and "InversionEfficiency" in params.notes[0]


@pytest.mark.parametrize(
    ("key", "where", "named"),
    [
        ("InversionTime", "inv2", "inv-2.json"),
        ("FlipAngle", "inv1", "inv-1.json"),
        ("RepetitionTimePreparation", "both", "inv-1.json"),
        ("RepetitionTimeExcitation", "both", "inv-1.json"),
        ("NumberShots", "both", "inv-1.json"),
    ],
)
def test_missing_sidecar_key_is_named(key: str, where: str, named: str) -> None:
    inv1, inv2 = sidecars(PROTOCOLS[0])
    for side, name in ((inv1, "inv1"), (inv2, "inv2")):
        if where in (name, "both"):
            del side[key]
    with pytest.raises(InputError, match=key) as err:
        mp2rage_parameters(inv1, inv2, inv1_path="inv-1.json", inv2_path="inv-2.json")
    assert err.value.path == named


def test_sidecar_in_milliseconds_and_disagreement_are_refused() -> None:
    inv1, inv2 = sidecars(PROTOCOLS[0])
    with pytest.raises(InputError, match="seconds"):
        mp2rage_parameters({**inv1, "InversionTime": 700}, inv2)
    with pytest.raises(InputError, match="NumberShots"):
        mp2rage_parameters(inv1, {**inv2, "NumberShots": 192})
    with pytest.raises(InputError, match="overlap"):
        mp2rage_parameters(inv1, {**inv2, "InversionTime": 0.9})


def test_own_signal_equation_matches_the_phantom() -> None:
    """Checked against an independent implementation (affine maps of Mz, fixed point)."""
    from smoulder.rims.tissue import mp2rage_signals

    for protocol in PROTOCOLS:
        ours = mp2rage_signals(T1S_MS, mp2rage_parameters(*sidecars(protocol)))
        theirs = physics.mp2rage_signals(1.0, T1S_MS, None, params=protocol)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_sign_on_the_phantom(phantom_dir: Path) -> None:
    """The phantom's true χ map with its last-echo magnitude: paramagnetic positive, and the
    negated map is named inverted (veins and iron-rich deep grey matter are dark there)."""
    sub = next(phantom_dir.glob("sub-*")).name
    anat = sorted(phantom_dir.glob(f"{sub}/ses-*/anat"))[0]
    ses = anat.parent.name
    truth = phantom_dir / "derivatives" / "truth" / sub / ses / "anat"
    chi = nib.load(truth / f"{sub}_{ses}_space-T1w_Chimap.nii.gz")
    brain = np.asarray(nib.load(truth / f"{sub}_{ses}_space-T1w_desc-brain_mask.nii.gz").dataobj)
    last = sorted(anat.glob("*_part-mag_MEGRE.nii.gz"))[-1]
    magnitude = nib.load(last)
    assert magnitude.shape == chi.shape
    voxel = tuple(float(v) for v in chi.header.get_zooms()[:3])
    data = np.asarray(chi.dataobj, dtype=np.float32)
    mag = np.asarray(magnitude.dataobj, dtype=np.float32)
    for sign in (1, -1):
        check = check_paramagnetic_sign(sign * data, mag, brain, voxel)
        assert check.conclusive and check.sign == sign, check


def test_qt1_on_the_phantom(phantom_dir: Path) -> None:
    """qT1 from the phantom's UNIT1 and sidecars is within 3 % of the true lesion T1 in every
    lesion of at least 50 µl (the issue's target), partial-volume voxels included."""
    sub = next(phantom_dir.glob("sub-*")).name
    truth_dir = phantom_dir / "derivatives" / "truth" / sub
    tissues = json.loads((truth_dir / f"{sub}_phantom.json").read_text())["tissues_3T"]
    for anat in sorted(phantom_dir.glob(f"{sub}/ses-*/anat")):
        ses = anat.parent.name
        side1, side2 = (
            json.loads((anat / f"{sub}_{ses}_inv-{k}_part-mag_MP2RAGE.json").read_text())
            for k in (1, 2)
        )
        unit1 = nib.load(anat / f"{sub}_{ses}_UNIT1.nii.gz")
        voxel_ul = float(np.prod(unit1.header.get_zooms()[:3]))
        truth = truth_dir / ses / "anat"
        ids = np.asarray(
            nib.load(truth / f"{sub}_{ses}_space-T1w_desc-lesions_dseg.nii.gz").dataobj
        )
        fraction = np.asarray(
            nib.load(truth / f"{sub}_{ses}_space-T1w_label-lesion_probseg.nii.gz").dataobj
        )
        t1 = t1_map_ms(np.asarray(unit1.dataobj), mp2rage_parameters(side1, side2))
        errors = {
            k: v / tissues["lesion"]["t1_ms"] - 1
            for k, v in lesion_qt1_ms(t1, ids).items()
            if fraction[ids == k].sum() * voxel_ul >= 50.0
        }
        assert errors and max(abs(e) for e in errors.values()) < 0.03, errors
