"""Registration engines behind one function, :func:`register`, and symmetric :func:`halfway`.

Engines:

* ``greedy`` — smoulder's affine (PyTorch) followed by ITK's greedy (picsl-greedy, multi-level
  NCC) for the deformable stage: the fastest accurate choice on a few CPU cores
  (``benchmarks/registration.py``);
* ``torch`` — smoulder's own affine and stationary-velocity deformable registration in PyTorch,
  the same code on CUDA and on the CPU;
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

import nibabel as nib
import numpy as np
import scipy.linalg

from smoulder.errors import RegistrationError
from smoulder.registration import torch_engine as te
from smoulder.registration.transforms import (
    AffineTransform,
    DisplacementTransform,
    TransformChain,
    resample,
)

TRANSFORMS = ("rigid", "affine", "deformable")
ENGINES = ("auto", "greedy", "torch", "ants")


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
    from smoulder.config import resolve_device

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

    Raises:
        RegistrationError: bad arguments, non-3D or blank images, an empty mask, or a result
            under which the two images do not overlap.
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
    if fixed_mask is not None:
        fixed_mask = np.asarray(fixed_mask, bool)
        if fixed_mask.shape != f_data.shape:
            raise RegistrationError(
                "fixed mask", expected=f"shape {f_data.shape}", found=str(fixed_mask.shape)
            )
        if not fixed_mask.any():
            raise RegistrationError(
                "fixed mask", expected="at least one voxel", found="an empty mask"
            )
    if metric == "auto":
        metric = "ncc" if transform == "deformable" else "mi"
    engine, dev = resolve_engine(engine, device)
    threads = threads or _cpus()
    start = time.perf_counter()
    if engine == "ants":
        fwd, inv = _ants(fixed, moving, transform, metric, seed)
    else:
        import torch

        torch.set_num_threads(threads)
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
            if engine == "greedy":
                fwd, inv = _greedy_deformable(fixed, moving, matrix, fixed_mask, seed, threads)
            else:
                fwd, inv = _torch_deformable(
                    f_data, fixed.affine, m_data, moving.affine, matrix, fixed_mask, dev, seed
                )
    if dev == "cuda":
        import torch

        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    _check_overlap(fixed, f_data, fixed_mask, moving, fwd)
    return Registration(fwd, inv, engine, dev, wall)


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
) -> tuple[TransformChain, TransformChain]:
    velocity = te.svf(
        f_data, f_aff, m_data, m_aff, matrix, fixed_mask=mask, device=device, seed=seed
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


def _greedy_deformable(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    matrix: np.ndarray,
    mask: np.ndarray | None,
    seed: int,
    threads: int,
) -> tuple[TransformChain, TransformChain]:
    """Run greedy's deformable stage after our affine; return forward and inverse chains."""
    with tempfile.TemporaryDirectory(prefix="smoulder-greedy-") as tmp:
        d = Path(tmp)
        nib.save(nib.Nifti1Image(_volume(fixed, "fixed"), fixed.affine), d / "f.nii.gz")
        nib.save(nib.Nifti1Image(_volume(moving, "moving"), moving.affine), d / "m.nii.gz")
        # greedy's matrices are plain-text 4×4 RAS maps of fixed points to moving points
        np.savetxt(d / "aff.mat", matrix)
        common = f"-d 3 -seed {seed + 1} -threads {threads} -V 0"
        mask_arg = ""
        if mask is not None:
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), fixed.affine), d / "mask.nii.gz")
            mask_arg = f"-gm {d / 'mask.nii.gz'} -wncc-mask-dilate"
        _greedy(
            f"{common} -m NCC 2x2x2 -n 100x50x10 {mask_arg} -it {d / 'aff.mat'} "
            f"-i {d / 'f.nii.gz'} {d / 'm.nii.gz'} -o {d / 'warp.nii.gz'} -oinv {d / 'inv.nii.gz'}"
        )
        # one displacement field per direction: the affine and the warp composed by greedy
        _greedy(
            f"{common} -rf {d / 'f.nii.gz'} -r {d / 'warp.nii.gz'} {d / 'aff.mat'} "
            f"-rc {d / 'fwd.nii.gz'}"
        )
        _greedy(
            f"{common} -rf {d / 'm.nii.gz'} -r {d / 'aff.mat'},-1 {d / 'inv.nii.gz'} "
            f"-rc {d / 'bwd.nii.gz'}"
        )
        fwd = DisplacementTransform.load(d / "fwd.nii.gz")
        bwd = DisplacementTransform.load(d / "bwd.nii.gz")
    return TransformChain([fwd]), TransformChain([bwd])


def _greedy_half_warps(
    a_mid: nib.Nifti1Image, b_mid: nib.Nifti1Image, mask: np.ndarray | None, seed: int, threads: int
) -> tuple[DisplacementTransform, DisplacementTransform]:
    """Return ``exp(v/2)`` and ``exp(-v/2)`` of greedy's stationary-velocity registration.

    Greedy registers the two halfway images with a stationary velocity field (``-sv``), so its
    warp is ``exp(v)``; its square root (``-root … 1``) and the inverse of that (``-iw``) split
    it evenly between the two images.
    """
    with tempfile.TemporaryDirectory(prefix="smoulder-greedy-") as tmp:
        d = Path(tmp)
        nib.save(nib.Nifti1Image(_volume(a_mid, "A"), a_mid.affine), d / "a.nii.gz")
        nib.save(nib.Nifti1Image(_volume(b_mid, "B"), b_mid.affine), d / "b.nii.gz")
        common = f"-d 3 -seed {seed + 1} -threads {threads} -V 0"
        mask_arg = ""
        if mask is not None:
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), a_mid.affine), d / "mask.nii.gz")
            mask_arg = f"-gm {d / 'mask.nii.gz'} -wncc-mask-dilate"
        _greedy(
            f"{common} -sv -m NCC 2x2x2 -n 100x50x10 {mask_arg} "
            f"-i {d / 'a.nii.gz'} {d / 'b.nii.gz'} -o {d / 'warp.nii.gz'}"
        )
        _greedy(f"{common} -exp 1 -root {d / 'warp.nii.gz'} {d / 'half.nii.gz'}")
        _greedy(f"{common} -iw {d / 'half.nii.gz'} {d / 'halfinv.nii.gz'}")
        # as displacement fields on the halfway grid, through greedy's own composition
        _greedy(f"{common} -rf {d / 'a.nii.gz'} -r {d / 'half.nii.gz'} -rc {d / 'plus.nii.gz'}")
        _greedy(f"{common} -rf {d / 'a.nii.gz'} -r {d / 'halfinv.nii.gz'} -rc {d / 'minus.nii.gz'}")
        return DisplacementTransform.load(d / "plus.nii.gz"), DisplacementTransform.load(
            d / "minus.nii.gz"
        )


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
    seed: int = 0,
    threads: int | None = None,
) -> Halfway:
    """Return a symmetric registration of ``a`` and ``b`` through a halfway space.

    The rigid/affine part is split exactly in two with the matrix square root; the deformable
    part is a stationary velocity field ``v`` estimated between the two images once both are in
    the halfway space, and split as ``exp(±v/2)``. Neither image is privileged, both are
    resampled once onto the halfway grid, and the maps A → B and B → A are inverse by
    construction (up to the numerical accuracy of the exponential).
    """
    engine, dev = resolve_engine(engine, device)
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
    reference = _halfway_grid(a, half)
    to_a, to_b = TransformChain([h_inv]), TransformChain([h])
    if transform == "deformable":
        a_mid = resample(a, reference, to_a)
        b_mid = resample(b, reference, to_b)
        mask_mid = None
        if mask_a is not None:
            mask_img = nib.Nifti1Image(mask_a.astype(np.uint8), a.affine)
            mask_mid = (
                np.asarray(resample(mask_img, reference, to_a, interpolation="nearest").dataobj) > 0
            )
        if engine == "torch":
            velocity = te.svf(
                _volume(a_mid, "A"),
                reference.affine,
                _volume(b_mid, "B"),
                reference.affine,
                np.eye(4),
                fixed_mask=mask_mid,
                symmetric=True,
                device=dev,
                seed=seed,
            )
            plus = DisplacementTransform.from_voxel_field(
                te.svf_displacement(velocity, sign=0.5), reference.affine
            )
            minus = DisplacementTransform.from_voxel_field(
                te.svf_displacement(velocity, sign=-0.5), reference.affine
            )
        else:
            plus, minus = _greedy_half_warps(a_mid, b_mid, mask_mid, seed, threads or _cpus())
        to_a, to_b = TransformChain([minus, h_inv]), TransformChain([plus, h])
        a_to_b = TransformChain([h, plus, plus, h])
        b_to_a = TransformChain([h_inv, minus, minus, h_inv])
    else:
        a_to_b, b_to_a = TransformChain([h, h]), TransformChain([h_inv, h_inv])
    return Halfway(reference, to_a, to_b, a_to_b, b_to_a, engine, dev, time.perf_counter() - start)


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


def _halfway_grid(a: nib.Nifti1Image, half: np.ndarray) -> nib.Nifti1Image:
    """Return an RAS-aligned grid (voxel size of ``a``) covering ``a`` moved half way."""
    voxel = float(np.sqrt((a.affine[:3, :3] ** 2).sum(0)).min())
    shape = np.array(a.shape[:3]) - 1
    corners = np.array(
        [[i, j, k] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])], float
    )
    # halfway points of a's corners: H maps A points to the halfway space
    mid = nib.affines.apply_affine(half, nib.affines.apply_affine(a.affine, corners))
    lo, hi = mid.min(0), mid.max(0)
    dims = np.ceil((hi - lo) / voxel).astype(int) + 1
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = lo
    return nib.Nifti1Image(np.zeros(tuple(dims), np.uint8), affine)


# ----------------------------------------------------------------------------- helpers


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


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
