"""Registration engines behind one function, :func:`register`, and symmetric :func:`halfway`.

Engines:

* ``greedy`` — ITK's greedy (picsl-greedy) on the CPU. Rigid and affine registration are
  greedy's own (``-a``, NMI or NCC, centres of mass matched first): an order of magnitude
  faster than the PyTorch affine on 2 cores at equal error. Deformable registration is
  smoulder's affine (PyTorch) followed by greedy's multi-level NCC deformable stage: the
  fastest accurate choice on a few CPU cores (``benchmarks/registration.py``);
* ``torch`` — smoulder's own affine and stationary-velocity deformable registration in PyTorch,
  the same code on CUDA and on the CPU;
* ``fireants`` — FireANTs (optional dependency ``smoulder[gpu]``): its rigid/affine and greedy
  (compositive) deformable registration in PyTorch, on CUDA or the CPU;
* ``ants`` — antspyx (``SyN``/``Rigid``/``Affine``), the reference engine;
* ``auto`` — ``torch`` on CUDA when present, else ``greedy``.

Every result is a pair of :class:`~smoulder.registration.transforms.TransformChain`: ``forward``
maps fixed points to moving points (resample the moving image with it), ``inverse`` the other way.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import scipy.linalg

from smoulder.devices import available_cpus, resolve_device, torch_threads
from smoulder.errors import RegistrationError
from smoulder.grids import voxel_volume_mm3
from smoulder.images import coarsen
from smoulder.registration import ENGINES
from smoulder.registration import torch_engine as te
from smoulder.registration.transforms import (
    AffineTransform,
    DisplacementTransform,
    TransformChain,
    require_mask,
    resample,
)

TRANSFORMS = ("rigid", "affine", "deformable")


@dataclass
class Registration:
    """What :func:`register` found.

    Attributes:
        forward: fixed → moving points (resamples the moving image onto the fixed grid).
        inverse: moving → fixed points.
        engine: the engine that ran.
        device: ``cpu`` or ``cuda``.
        wall_s: seconds spent registering.
    """

    forward: TransformChain
    inverse: TransformChain
    engine: str
    device: str
    wall_s: float


@dataclass
class Halfway:
    """A symmetric registration of two images through a space half way between them.

    Attributes:
        reference: an image defining the halfway grid (its data are zeros).
        to_a: halfway → image A points; ``to_b``: halfway → image B points.
        a_to_b: A → B points (``to_b ∘ to_a⁻¹``); ``b_to_a``: its inverse.
    """

    reference: nib.Nifti1Image
    to_a: TransformChain
    to_b: TransformChain
    a_to_b: TransformChain
    b_to_a: TransformChain
    engine: str
    device: str
    wall_s: float


def resolve_engine(engine: str, device: str) -> tuple[str, str]:
    """Return the concrete ``(engine, device)`` for requested values (``auto`` resolved)."""
    if engine not in ENGINES:
        raise RegistrationError(
            "registration engine", expected=f"one of {ENGINES}", found=repr(engine)
        )
    dev = resolve_device(device)
    if engine == "auto":
        engine = "torch" if dev == "cuda" else "greedy"
    if engine in ("greedy", "ants"):
        dev = "cpu"
    return engine, dev


def register(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    *,
    transform: str = "deformable",
    metric: str = "auto",
    engine: str = "auto",
    device: str = "auto",
    fixed_mask: np.ndarray | None = None,
    seed: int = 0,
    threads: int | None = None,
    initialise: str = "centres",
    settings: te.DeformableSettings | None = None,
) -> Registration:
    """Return the registration of ``moving`` to ``fixed``.

    Args:
        fixed: reference image (3D).
        moving: image to align (3D).
        transform: ``rigid``, ``affine`` or ``deformable`` (an affine stage comes first).
        metric: ``ncc`` (same contrast), ``mi`` (across contrasts) or ``auto``: ``mi`` for
            rigid/affine, ``ncc`` for deformable.
        engine: see the module docstring.
        device: ``auto``, ``cpu`` or ``cuda``.
        fixed_mask: optional boolean mask on the fixed grid limiting the metric.
        seed: random seed; the same inputs, seed and device give the same transforms.
        threads: CPU threads (default: what the process may use).
        initialise: ``centres`` (match intensity centres of mass first: robust to headers that
            disagree) or ``header`` (trust the two headers).
        settings: deformable optimisation (pyramid, iterations, NCC radius, smoothing);
            default: :func:`default_settings` for the engine and the fixed grid.

    Raises:
        RegistrationError: bad arguments, non-3D or blank images, an empty mask, or a result
            under which the two images do not overlap.
    """
    f_data, m_data = _checked_images(fixed, moving, transform, initialise)
    if fixed_mask is not None:
        fixed_mask = require_mask(fixed_mask, fixed, what="fixed mask")
    if metric == "auto":
        metric = "ncc" if transform == "deformable" else "mi"
    engine, dev = resolve_engine(engine, device)
    threads = threads or available_cpus()
    start = time.perf_counter()
    if engine == "ants":
        fwd, inv = _ants(fixed, moving, transform, metric, seed)
    elif engine == "fireants":
        fwd, inv = _fireants(fixed, moving, transform, metric, dev, seed, threads, settings)
    elif engine == "greedy" and transform != "deformable":
        matrix = _greedy_linear(
            fixed, moving, transform, metric, fixed_mask, seed, threads, initialise
        )
        aff = AffineTransform(matrix)
        fwd, inv = TransformChain([aff]), TransformChain([aff.inverse()])
    else:
        with torch_threads(threads):
            dof = 6 if transform == "rigid" else 12
            matrix = te.affine(
                f_data,
                fixed.affine,
                m_data,
                moving.affine,
                settings=te.AffineSettings(dof=dof, metric="mi" if metric == "mi" else "ncc"),
                fixed_mask=fixed_mask,
                device=dev,
                seed=seed,
                initial=np.eye(4) if initialise == "header" else None,
            )
            aff = AffineTransform(matrix)
            fwd, inv = TransformChain([aff]), TransformChain([aff.inverse()])
            if transform == "deformable":
                settings = settings or default_settings(engine, fixed)
                if engine == "greedy":
                    fwd, inv = _greedy_deformable(
                        fixed, moving, matrix, fixed_mask, seed, threads, settings
                    )
                else:
                    fwd, inv = _torch_deformable(
                        f_data,
                        fixed.affine,
                        m_data,
                        moving.affine,
                        matrix,
                        fixed_mask,
                        dev,
                        seed,
                        settings,
                    )
    if dev == "cuda":
        import torch

        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    _check_overlap(fixed, f_data, fixed_mask, moving, fwd)
    return Registration(fwd, inv, engine, dev, wall)


def _checked_images(
    fixed: nib.Nifti1Image, moving: nib.Nifti1Image, transform: str, initialise: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return the fixed and moving voxel arrays (float32, 3D), checked with the options.

    Raises:
        RegistrationError: an unknown transform or initialisation, a non-3D image, or one
            without signal.
    """
    if transform not in TRANSFORMS:
        raise RegistrationError("transform", expected=f"one of {TRANSFORMS}", found=repr(transform))
    f_data, m_data = _volume(fixed, "fixed image"), _volume(moving, "moving image")
    for data, what in ((f_data, "fixed image"), (m_data, "moving image")):
        if not np.isfinite(data).all() or float(data.max()) <= float(data.min()):
            raise RegistrationError(
                what,
                expected="an image with signal",
                found="no signal (every voxel has the same value) or non-finite values",
            )
    if initialise not in ("centres", "header"):
        raise RegistrationError("initialise", expected="centres or header", found=repr(initialise))
    return f_data, m_data


def default_settings(
    engine: str, fixed: nib.Nifti1Image, *, finest: bool = False, finest_iterations: int = 20
) -> te.DeformableSettings:
    """Return the deformable settings an engine uses by default on ``fixed``'s grid
    (``finest``: always optimise at the full resolution as well, with greedy for
    ``finest_iterations`` iterations there).

    Lesion growth is sub-millimetre: the longitudinal registration of lesion activity keeps the
    full-resolution level (``finest``). On a 1-mm phantom pair with five slowly expanding lesions
    (true volume growth 22-128 % a year) greedy's lesion-mean Jacobian recovered 11-20 %/yr
    without that level and 21-47 %/yr with it, and the SEL calls went from 4 to 5 of 5, none
    of 11 stable lesions called either way.

    Greedy skips the full-resolution level on grids whose voxel is under 1.2 mm (the
    geometric mean of its sizes: thick slices count), where the level above it is 2.4 mm or
    finer. On the 1-mm phantom pair (``benchmarks/registration.py``) skipping it halved
    greedy's time and left the mean endpoint error unchanged (0.503 mm against 0.509 mm),
    while coarser grids need it: at 2 mm, 0.93 mm without it and 0.72 mm with it. The same
    pair cut into 1 × 1 × 3 mm slices (``phantom-1mm-thick3mm``; geometric mean 1.44 mm):
    :func:`register` 0.96 mm without it, 0.80 mm with it; :func:`halfway` on its 1.44-mm
    grid 0.64 against 0.57 mm (on a 1-mm grid it made no difference: 0.560 against 0.565 mm).
    """
    voxel_mm = _voxel_edge_mm(fixed)
    if engine == "greedy":
        last = finest_iterations if finest else (0 if voxel_mm < 1.2 else 10)
        return te.DeformableSettings(iterations=(100, 50, last), ncc_radius=2)
    return te.DeformableSettings()


def _greedy_options(settings: te.DeformableSettings) -> str:
    """Return greedy's command-line options for the deformable ``settings``."""
    levels = len(settings.shrink)
    if tuple(settings.shrink) != tuple(2 ** (levels - 1 - i) for i in range(levels)):
        raise RegistrationError(
            "greedy pyramid",
            expected="shrink factors ..., 4, 2, 1",
            found=str(tuple(settings.shrink)),
        )
    r = settings.ncc_radius
    iters = "x".join(str(n) for n in settings.iterations)
    # -float: single precision (faster, same accuracy); -wp 0: store warps without greedy's
    # default 0.1-voxel lossy compression, which would cost up to 0.05 voxel of accuracy
    return (
        f"-m NCC {r}x{r}x{r} -n {iters} -s {settings.fluid_sigma}vox "
        f"{settings.elastic_sigma}vox -float -wp 0"
    )


def _check_overlap(
    fixed: nib.Nifti1Image,
    f_data: np.ndarray,
    mask: np.ndarray | None,
    moving: nib.Nifti1Image,
    forward: TransformChain,
    *,
    minimum: float = 0.5,
) -> None:
    """Raise when less than ``minimum`` of the fixed foreground lands inside the moving grid."""
    fg = mask if mask is not None else f_data > 0.05 * float(np.percentile(f_data, 99.5))
    idx = np.argwhere(fg)[:: max(1, int(fg.sum()) // 20_000)]
    moved = forward.apply(nib.affines.apply_affine(fixed.affine, idx))
    vox = nib.affines.apply_affine(np.linalg.inv(moving.affine), moved)
    inside = np.all((vox > -0.5) & (vox < np.array(moving.shape[:3]) - 0.5), axis=1).mean()
    if inside < minimum:
        raise RegistrationError(
            "registration result",
            expected=f"at least {minimum:.0%} of the fixed image's "
            "foreground inside the moving image",
            found=f"{inside:.0%}: the images do not overlap",
            hint="check both headers (sform/qform), or initialise='centres'",
        )


# ----------------------------------------------------------------------------- engines


def _torch_deformable(
    f_data: np.ndarray,
    f_aff: np.ndarray,
    m_data: np.ndarray,
    m_aff: np.ndarray,
    matrix: np.ndarray,
    mask: np.ndarray | None,
    device: str,
    seed: int,
    settings: te.DeformableSettings,
) -> tuple[TransformChain, TransformChain]:
    velocity = te.svf(
        f_data,
        f_aff,
        m_data,
        m_aff,
        matrix,
        settings=settings,
        fixed_mask=mask,
        device=device,
        seed=seed,
    )
    forward = DisplacementTransform.from_voxel_field(te.svf_displacement(velocity), f_aff)
    backward = DisplacementTransform.from_voxel_field(
        te.svf_displacement(velocity, sign=-1.0), f_aff
    )
    aff = AffineTransform(matrix)
    return TransformChain([forward, aff]), TransformChain([aff.inverse(), backward])


def _greedy(args: str) -> None:
    """Run one greedy command; its progress output (written by C++ to fd 1) is discarded."""
    import sys

    from picsl_greedy import Greedy3D

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        Greedy3D().execute(args)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _greedy_linear(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    transform: str,
    metric: str,
    mask: np.ndarray | None,
    seed: int,
    threads: int,
    initialise: str,
) -> np.ndarray:
    """Return greedy's rigid or affine world matrix (fixed points → moving points).

    Normalised mutual information (``mi``) or NCC over 2-voxel radius patches (``ncc``); four
    levels (8, 4, 2, 1× shrink) of 100, 50, 25 and 10 iterations; ``centres``: centres of mass
    matched first, ``header``: the headers' alignment (identity).
    """
    with tempfile.TemporaryDirectory(prefix="smoulder-greedy-") as tmp:
        d = Path(tmp)
        f, m = d / "f.nii", d / "m.nii"
        nib.save(nib.Nifti1Image(_volume(fixed, "fixed"), fixed.affine), f)
        nib.save(nib.Nifti1Image(_volume(moving, "moving"), moving.affine), m)
        dof = 6 if transform == "rigid" else 12
        sim = "NMI" if metric == "mi" else "NCC 2x2x2"
        init = "-ia-identity"
        if initialise == "centres":  # greedy's -ia-moments is not wired in picsl_greedy 1.4
            start = np.eye(4)
            start[:3, 3] = te.centre_of_mass(
                _volume(moving, "moving"), moving.affine
            ) - te.centre_of_mass(_volume(fixed, "fixed"), fixed.affine)
            np.savetxt(d / "init.mat", start)
            init = f"-ia {d / 'init.mat'}"
        _greedy(
            f"-d 3 -a -dof {dof} -m {sim} {init} -n 100x50x25x10 -seed {seed + 1} "
            f"-threads {threads} -V 0 {_greedy_mask(mask, fixed.affine, d)} "
            f"-i {f} {m} -o {d / 'aff.mat'}"
        )
        return np.loadtxt(d / "aff.mat")


def _greedy_deformable(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    matrix: np.ndarray,
    mask: np.ndarray | None,
    seed: int,
    threads: int,
    settings: te.DeformableSettings,
) -> tuple[TransformChain, TransformChain]:
    """Run greedy's deformable stage after our affine; return forward and inverse chains."""
    with tempfile.TemporaryDirectory(prefix="smoulder-greedy-") as tmp:
        d = Path(tmp)
        # uncompressed files: gzip of a 1-mm field costs seconds and saves nothing here
        f, m = d / "f.nii", d / "m.nii"
        nib.save(nib.Nifti1Image(_volume(fixed, "fixed"), fixed.affine), f)
        nib.save(nib.Nifti1Image(_volume(moving, "moving"), moving.affine), m)
        # greedy's matrices are plain-text 4×4 RAS maps of fixed points to moving points
        np.savetxt(d / "aff.mat", matrix)
        common = f"-d 3 -seed {seed + 1} -threads {threads} -V 0 -wp 0"
        _greedy(
            f"{common} {_greedy_options(settings)} {_greedy_mask(mask, fixed.affine, d)} "
            f"-it {d / 'aff.mat'} -i {f} {m} -o {d / 'warp.nii'} -oinv {d / 'inv.nii'}"
        )
        # one displacement field per direction: the affine and the warp composed by greedy
        _greedy(f"{common} -rf {f} -r {d / 'warp.nii'} {d / 'aff.mat'} -rc {d / 'fwd.nii'}")
        _greedy(f"{common} -rf {m} -r {d / 'aff.mat'},-1 {d / 'inv.nii'} -rc {d / 'bwd.nii'}")
        fwd = DisplacementTransform.load(d / "fwd.nii")
        bwd = DisplacementTransform.load(d / "bwd.nii")
    return TransformChain([fwd]), TransformChain([bwd])


def _greedy_mask(mask: np.ndarray | None, affine: np.ndarray, folder: Path) -> str:
    """Write ``mask`` for greedy and return its options ('' without a mask)."""
    if mask is None:
        return ""
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / "mask.nii")
    return f"-gm {folder / 'mask.nii'} -wncc-mask-dilate"


def _greedy_half_warps(
    a_mid: nib.Nifti1Image,
    b_mid: nib.Nifti1Image,
    mask: np.ndarray | None,
    seed: int,
    threads: int,
    settings: te.DeformableSettings,
) -> tuple[DisplacementTransform, DisplacementTransform]:
    """Return ``exp(v/2)`` and ``exp(-v/2)`` of greedy's stationary velocity ``v`` between the
    two halfway images (:func:`_greedy_velocity`), exponentiated here with the same scaling and
    squaring: the two halves are inverse to the accuracy of the exponential, not of a separate
    numerical inversion."""
    velocity_vox = _greedy_velocity(a_mid, b_mid, mask, seed, threads, settings)
    half = [
        DisplacementTransform.from_voxel_field(
            te.svf_displacement(velocity_vox, sign=sign, squarings=settings.squarings + 2),
            a_mid.affine,
        )
        for sign in (0.5, -0.5)
    ]
    return half[0], half[1]


def _greedy_velocity(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    mask: np.ndarray | None,
    seed: int,
    threads: int,
    settings: te.DeformableSettings,
) -> np.ndarray:
    """Return greedy's stationary velocity field ``(3, X, Y, Z)`` (voxel units of the shared
    grid) from ``fixed`` to ``moving``: ``x ↦ x + exp(v)(x)`` maps fixed voxels to moving ones.

    Greedy registers with a stationary velocity field (``-sv``) and represents it internally by
    the root ``exp(v / 2^N)`` (``-exp N``), which it writes with ``-oroot``. That root is
    ``v / 2^N`` to first order, so ``v`` is recovered from it.
    """
    exponent = 6
    with tempfile.TemporaryDirectory(prefix="smoulder-greedy-") as tmp:
        d = Path(tmp)
        a, b = d / "a.nii", d / "b.nii"
        nib.save(nib.Nifti1Image(_volume(fixed, "fixed"), fixed.affine), a)
        nib.save(nib.Nifti1Image(_volume(moving, "moving"), moving.affine), b)
        common = f"-d 3 -seed {seed + 1} -threads {threads} -V 0 -wp 0"
        _greedy(
            f"{common} -sv -exp {exponent} {_greedy_options(settings)} "
            f"{_greedy_mask(mask, fixed.affine, d)} -i {a} {b} -o {d / 'warp.nii'} "
            f"-oroot {d / 'root.nii'}"
        )
        root = DisplacementTransform.load(d / "root.nii")
    linear_inv = np.linalg.inv(fixed.affine[:3, :3]).astype(np.float32)
    return np.tensordot(linear_inv, root.disp_mm, axes=1) * 2.0**exponent


def velocity(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    *,
    engine: str = "auto",
    device: str = "auto",
    mask: np.ndarray | None = None,
    seed: int = 0,
    threads: int | None = None,
    settings: te.DeformableSettings | None = None,
) -> np.ndarray:
    """Return the stationary velocity field ``v`` (voxel units, ``(3, X, Y, Z)``) registering
    two images on the same grid: fixed voxel ``x`` maps to moving voxel ``x + exp(v)(x)``.

    The deformable step of a within-subject template (:mod:`smoulder.longitudinal.space`):
    velocities of several sessions to one template can be averaged, which displacements can
    not. Engines ``greedy`` (its ``-sv`` mode) and ``torch`` (:func:`te.svf`); ``auto`` as in
    :func:`resolve_engine`; ``ants`` and ``fireants`` fall back to ``greedy`` on the CPU and
    ``torch`` on CUDA.
    """
    engine, dev = resolve_engine(engine, device)
    if engine in ("ants", "fireants"):
        engine = "torch" if dev == "cuda" else "greedy"
    if not np.allclose(fixed.affine, moving.affine, atol=1e-4) or fixed.shape != moving.shape:
        raise RegistrationError(
            "velocity registration",
            expected="two images on the same grid",
            found=f"shapes {fixed.shape} and {moving.shape}",
        )
    threads = threads or available_cpus()
    settings = settings or default_settings(engine, fixed)
    with torch_threads(threads):
        if engine == "greedy":
            return _greedy_velocity(fixed, moving, mask, seed, threads, settings)
        return te.svf(
            _volume(fixed, "fixed"),
            fixed.affine,
            _volume(moving, "moving"),
            fixed.affine,
            np.eye(4),
            settings=settings,
            fixed_mask=mask,
            device=dev,
            seed=seed,
        )


def _fireants(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    transform: str,
    metric: str,
    device: str,
    seed: int,
    threads: int,
    settings: te.DeformableSettings | None,
) -> tuple[TransformChain, TransformChain]:
    """Run FireANTs (:func:`fireants_registration`); return forward and inverse chains.

    ``settings`` may change the scales and iterations (default: 4, 2, 1 with 200, 100, 50).
    """
    try:
        import SimpleITK as sitk
        import torch
        from fireants.io.image import BatchedImages, Image
    except ImportError as exc:
        raise RegistrationError(
            "engine fireants",
            expected="the fireants package",
            found=f"ImportError: {exc}",
            hint="pip install 'smoulder[gpu]'",
        ) from exc

    def load(img: nib.Nifti1Image, name: str, folder: Path) -> BatchedImages:
        path = folder / f"{name}.nii"
        nib.save(nib.Nifti1Image(_volume(img, name), img.affine), path)
        return BatchedImages([Image(sitk.ReadImage(str(path)), device=device)])

    torch.manual_seed(seed)
    with torch_threads(threads):
        with tempfile.TemporaryDirectory(prefix="smoulder-fireants-") as tmp:
            f, m = load(fixed, "fixed", Path(tmp)), load(moving, "moving", Path(tmp))
        scales, iters = [4, 2, 1], [200, 100, 50]
        if settings is not None:
            scales, iters = list(settings.shrink), list(settings.iterations)
        loss = "mi" if metric == "mi" else "cc"
        reg = fireants_registration(f, m, transform, loss, scales, iters)
        with torch.no_grad():
            fwd_pts = fireants_points(reg.get_warped_coordinates(f, m), m.get_torch2phy())
            if transform == "deformable":
                inv_grid = reg.get_inverse_warped_coordinates(f, m)
                inv_pts = fireants_points(inv_grid, f.get_torch2phy())
    if transform != "deformable":
        return _linear_chains(fwd_pts, fixed)
    fwd = _points_to_displacement(fwd_pts, fixed)
    return TransformChain([fwd]), TransformChain([_points_to_displacement(inv_pts, moving)])


def fireants_registration(
    fixed: Any, moving: Any, transform: str, loss: str, scales: list[int], iterations: list[int]
) -> Any:
    """Return FireANTs' registration of ``moving`` to ``fixed`` (``BatchedImages``), optimised.

    Rigid: its rigid method with ``loss`` (``mi`` or ``cc``). Affine: CC (kernel 5) or MI, Adam
    at lr 3e-3 (its default 3e-2 diverged on the phantom). Deformable: that affine, then its
    compositive greedy method (CC kernel 5, Adam lr 0.5). The settings smoulder's ``fireants``
    engine and the registration benchmark's FireANTs runs share.
    """
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration
    from fireants.registration.rigid import RigidRegistration

    pyramid = (scales, iterations, fixed, moving)
    if transform == "rigid":
        reg = RigidRegistration(*pyramid, loss_type=loss, progress_bar=False)
    else:
        reg = AffineRegistration(
            *pyramid,
            loss_type=loss,
            cc_kernel_size=5,
            optimizer="Adam",
            optimizer_lr=3e-3,
            progress_bar=False,
        )
    reg.optimize()
    if transform == "deformable":
        reg = GreedyRegistration(
            *pyramid,
            loss_type="cc",
            cc_kernel_size=5,
            deformation_type="compositive",
            smooth_grad_sigma=1.0,
            smooth_warp_sigma=0.5,
            optimizer="adam",
            optimizer_lr=0.5,
            init_affine=reg.get_affine_matrix().detach(),
            progress_bar=False,
        )
        reg.optimize()
    return reg


def _linear_chains(
    points: np.ndarray, fixed: nib.Nifti1Image
) -> tuple[TransformChain, TransformChain]:
    """Return the chains of the affine map fitted to ``points`` (``(3, X, Y, Z)``, the image
    of every ``fixed`` voxel), and its inverse.

    The points of a linear map fit its matrix exactly up to rounding; every 97th voxel is used.
    """
    shape = fixed.shape[:3]
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)[:, ::97]
    world = nib.affines.apply_affine(fixed.affine, idx.T)
    design = np.c_[world, np.ones(len(world))]
    sol, *_ = np.linalg.lstsq(design, points.reshape(3, -1)[:, ::97].T, rcond=None)
    matrix = np.eye(4)
    matrix[:3] = sol.T
    aff = AffineTransform(matrix)
    return TransformChain([aff]), TransformChain([aff.inverse()])


def fireants_points(grid: Any, torch2phy: Any) -> np.ndarray:
    """Return RAS points ``(3, X, Y, Z)`` of FireANTs normalised coordinates ``[1, Z, Y, X, 3]``."""
    mat = torch2phy[0].detach().double().cpu().numpy()
    pts = grid[0].detach().double().cpu().numpy()
    lps = pts @ mat[:3, :3].T + mat[:3, 3]
    ras = lps * np.array([-1.0, -1.0, 1.0])
    return np.moveaxis(ras, -1, 0).transpose(0, 3, 2, 1)


def _points_to_displacement(points: np.ndarray, grid: nib.Nifti1Image) -> DisplacementTransform:
    """Return the displacement transform taking each voxel of ``grid`` to ``points``."""
    shape = grid.shape[:3]
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = (grid.affine[:3, :3] @ idx + grid.affine[:3, 3:]).reshape(3, *shape)
    return DisplacementTransform(points - world, grid.affine)


def _ants(
    fixed: nib.Nifti1Image, moving: nib.Nifti1Image, transform: str, metric: str, seed: int
) -> tuple[TransformChain, TransformChain]:
    """Run antspyx; return forward and inverse chains read from its transform files."""
    import ants

    kind = {"rigid": "Rigid", "affine": "Affine", "deformable": "SyN"}[transform]
    with tempfile.TemporaryDirectory(prefix="smoulder-ants-") as tmp:
        f = ants.from_nibabel(nib.Nifti1Image(_volume(fixed, "fixed"), fixed.affine))
        m = ants.from_nibabel(nib.Nifti1Image(_volume(moving, "moving"), moving.affine))
        out = ants.registration(
            f, m, type_of_transform=kind, outprefix=str(Path(tmp) / "r_"), random_seed=seed + 1
        )
        fwd = TransformChain.load(out["fwdtransforms"])
        affine = AffineTransform.load(next(p for p in out["fwdtransforms"] if p.endswith(".mat")))
        warps = [p for p in out["invtransforms"] if not p.endswith(".mat")]
        steps = [affine.inverse(), *[DisplacementTransform.load(p) for p in warps]]
        inv = TransformChain(steps)
    return fwd, inv


# ----------------------------------------------------------------------------- halfway


def halfway(
    a: nib.Nifti1Image,
    b: nib.Nifti1Image,
    *,
    transform: str = "deformable",
    engine: str = "auto",
    device: str = "auto",
    mask_a: np.ndarray | None = None,
    region_a: np.ndarray | None = None,
    seed: int = 0,
    threads: int | None = None,
    settings: te.DeformableSettings | None = None,
) -> Halfway:
    """Return a symmetric registration of ``a`` and ``b`` through a halfway space.

    The rigid/affine part is split exactly in two with the matrix square root; the deformable
    part is a stationary velocity field ``v`` estimated between the two images once both are in
    the halfway space, and split as ``exp(±v/2)``. Neither image is privileged, both are
    resampled once onto the halfway grid, and the maps A → B and B → A are inverse by
    construction (up to the numerical accuracy of the exponential).

    ``mask_a`` (on ``a``'s grid) restricts the similarity metric; ``region_a`` (on ``a``'s
    grid, e.g. its brain mask) restricts the halfway grid to that region's box plus
    :data:`REGION_MARGIN_MM` (:func:`halfway_grid`): the deformable part is estimated there
    only, and is the identity outside it.
    """
    engine, dev = resolve_engine(engine, device)
    threads = threads or available_cpus()
    start = time.perf_counter()
    linear = "affine" if transform == "affine" else "rigid"
    first = register(
        a,
        b,
        transform=linear,
        metric="ncc",
        engine="torch" if engine != "ants" else "ants",
        device=dev,
        fixed_mask=mask_a,
        seed=seed,
        threads=threads,
    )
    m = first.forward.steps[0].matrix if len(first.forward) == 1 else _fit_affine(first.forward, a)
    half = np.real(scipy.linalg.sqrtm(m))
    half[3] = [0, 0, 0, 1]
    h, h_inv = AffineTransform(half), AffineTransform(np.linalg.inv(half))
    reference = halfway_grid(a, half, region=region_a)
    to_a, to_b = TransformChain([h_inv]), TransformChain([h])
    if transform == "deformable":
        # thick-slice inputs: smoothed to the grid's voxel along their finer axes first
        voxel = float(reference.header.get_zooms()[0])
        a_mid = resample(coarsen(a, voxel), reference, to_a)
        b_mid = resample(coarsen(b, voxel), reference, to_b)
        mask_mid = None
        if mask_a is not None:
            mask_img = nib.Nifti1Image(mask_a.astype(np.uint8), a.affine)
            mask_mid = (
                np.asarray(resample(mask_img, reference, to_a, interpolation="nearest").dataobj) > 0
            )
        settings = settings or default_settings(engine, reference)
        with torch_threads(threads):
            if engine == "torch":
                plus, minus = _torch_half_warps(
                    a_mid, b_mid, reference, mask_mid, dev, seed, settings
                )
            else:
                plus, minus = _greedy_half_warps(a_mid, b_mid, mask_mid, seed, threads, settings)
        to_a, to_b = TransformChain([minus, h_inv]), TransformChain([plus, h])
        a_to_b = TransformChain([h, plus, plus, h])
        b_to_a = TransformChain([h_inv, minus, minus, h_inv])
    else:
        a_to_b, b_to_a = TransformChain([h, h]), TransformChain([h_inv, h_inv])
    return Halfway(reference, to_a, to_b, a_to_b, b_to_a, engine, dev, time.perf_counter() - start)


def _torch_half_warps(
    a_mid: nib.Nifti1Image,
    b_mid: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    mask: np.ndarray | None,
    device: str,
    seed: int,
    settings: te.DeformableSettings,
) -> tuple[DisplacementTransform, DisplacementTransform]:
    """Return ``exp(v/2)`` and ``exp(-v/2)`` of the symmetric stationary velocity field ``v``
    estimated between the two halfway images (on ``reference``'s grid) by :func:`te.svf`."""
    grid = reference.affine
    velocity = te.svf(
        _volume(a_mid, "A"),
        grid,
        _volume(b_mid, "B"),
        grid,
        np.eye(4),
        settings=settings,
        fixed_mask=mask,
        symmetric=True,
        device=device,
        seed=seed,
    )
    plus = DisplacementTransform.from_voxel_field(te.svf_displacement(velocity, sign=0.5), grid)
    minus = DisplacementTransform.from_voxel_field(te.svf_displacement(velocity, sign=-0.5), grid)
    return plus, minus


def _fit_affine(chain: TransformChain, image: nib.Nifti1Image) -> np.ndarray:
    """Return the least-squares affine matrix of a chain over the corners of an image grid."""
    shape = np.array(image.shape[:3]) - 1
    corners = np.array(
        [[i, j, k] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])], float
    )
    world = nib.affines.apply_affine(image.affine, corners)
    moved = chain.apply(world)
    design = np.c_[world, np.ones(len(world))]
    sol, *_ = np.linalg.lstsq(design, moved, rcond=None)
    out = np.eye(4)
    out[:3] = sol.T
    return out


#: Margin (mm) around a region the halfway grid is restricted to (:func:`halfway_grid`).
REGION_MARGIN_MM = 12.0


def halfway_grid(
    a: nib.Nifti1Image,
    half: np.ndarray,
    *,
    region: np.ndarray | None = None,
    margin_mm: float = REGION_MARGIN_MM,
) -> nib.Nifti1Image:
    """Return an RAS-aligned isotropic grid covering ``a`` moved half way.

    Its voxel has ``a``'s volume (the geometric mean of ``a``'s voxel sizes), so the grid has
    about as many voxels as ``a``: a 1-mm image keeps 1 mm, and a thick-slice 0.57 × 0.57 ×
    3.3 mm FLAIR gets 1.03 mm rather than 0.57 mm, which would have 5.8 times the voxels of
    the image it came from. With ``region`` (a boolean array on ``a``'s grid: its brain), the
    grid covers only the box of the region grown by ``margin_mm`` (within ``a``'s field of
    view): the neck and the air around the head are not registered.

    Examples:
        >>> a = nib.Nifti1Image(np.zeros((40, 40, 8), np.uint8), np.diag([0.5, 0.5, 4.0, 1]))
        >>> [round(float(z), 3) for z in halfway_grid(a, np.eye(4)).header.get_zooms()]
        [1.0, 1.0, 1.0]
        >>> brain = np.zeros((40, 40, 8), bool); brain[10:20, 10:20, 2:4] = True
        >>> halfway_grid(a, np.eye(4), region=brain, margin_mm=1.0).shape
        (8, 8, 7)
    """
    voxel = _voxel_edge_mm(a)
    lo, hi = np.zeros(3), np.array(a.shape[:3], float) - 1
    if region is not None and np.any(region):
        inside = np.argwhere(np.asarray(region, bool))
        grow = margin_mm / np.linalg.norm(a.affine[:3, :3], axis=0)
        lo = np.maximum(inside.min(axis=0) - grow, lo)
        hi = np.minimum(inside.max(axis=0) + grow, hi)
    corners = np.array(
        [[i, j, k] for i in (lo[0], hi[0]) for j in (lo[1], hi[1]) for k in (lo[2], hi[2])], float
    )
    # halfway points of a's corners: H maps A points to the halfway space
    mid = nib.affines.apply_affine(half, nib.affines.apply_affine(a.affine, corners))
    lo, hi = mid.min(0), mid.max(0)
    dims = np.ceil((hi - lo) / voxel).astype(int) + 1
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = lo
    return nib.Nifti1Image(np.zeros(tuple(dims), np.uint8), affine)


# ----------------------------------------------------------------------------- helpers


def _voxel_edge_mm(img: nib.Nifti1Image) -> float:
    """Return the edge (mm) of the cube with ``img``'s voxel volume (geometric mean of its sizes).

    Examples:
        >>> _voxel_edge_mm(nib.Nifti1Image(np.zeros((2, 2, 2)), np.diag([0.5, 0.5, 4.0, 1])))
        1.0
    """
    return voxel_volume_mm3(img.affine) ** (1 / 3)


def _volume(img: nib.Nifti1Image, what: str) -> np.ndarray:
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = (
        data.reshape(data.shape[:3])
        if data.ndim > 3 and all(s == 1 for s in data.shape[3:])
        else data
    )
    if data.ndim != 3:
        raise RegistrationError(
            what, expected="a 3D image", found=f"{data.ndim}D shape {data.shape}"
        )
    return data
