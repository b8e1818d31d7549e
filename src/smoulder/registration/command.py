"""``smoulder register``: register two images (or put them half way) from the command line.

Writes, into ``--out`` and named the BIDS way (``<prefix>from-<A>_to-<B>_mode-image_xfm``):

* the transform that resamples the moving image onto the fixed grid
  (``from-<moving>_to-<fixed>``) and its inverse, each one ITK/ANTs file: ``.mat`` for a
  rigid or affine map, a displacement field ``.nii.gz`` for a deformable one (``ants``
  ``apply_transforms`` and ``antsApplyTransforms`` read both);
* the moving image resampled once onto the fixed grid (``space-<fixed>``);
* for deformable maps, the log-Jacobian determinant on the fixed grid
  (``space-<fixed>_desc-logjacobian``): below 0 where the moving anatomy is smaller;
* with ``--halfway``, both images resampled once into the halfway space (``space-halfway``)
  and their maps to it;
* a JSON sidecar with the engine, device, settings and wall time.

All files are written atomically; an existing output is replaced only when the new one is
complete.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

LABEL_HELP = "name used in the output names (BIDS label, letters and digits)"


def parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder register``."""
    p = argparse.ArgumentParser(
        prog="smoulder register",
        description="Register MOVING to FIXED (rigid, affine or deformable) or, with --halfway, "
        "move both half way to a space between them. Transforms are ITK/ANTs files.",
    )
    p.add_argument("fixed", type=Path, help="reference image (NIfTI)")
    p.add_argument("moving", type=Path, help="image to align (NIfTI)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--transform", choices=["rigid", "affine", "deformable"], default="deformable")
    p.add_argument(
        "--metric",
        choices=["auto", "mi", "ncc"],
        default="auto",
        help="mi across contrasts, ncc within one; auto: mi for rigid/affine, ncc for deformable",
    )
    p.add_argument(
        "--engine", choices=["auto", "greedy", "torch", "fireants", "ants"], default="auto"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--fixed-mask", type=Path, help="binary mask on the fixed grid for the metric")
    p.add_argument("--halfway", action="store_true", help="symmetric registration (two sessions)")
    p.add_argument("--fixed-label", default="fixed", help=LABEL_HELP)
    p.add_argument("--moving-label", default="moving", help=LABEL_HELP)
    p.add_argument("--prefix", default="", help="prepended to every output name, e.g. 'sub-01_'")
    p.add_argument(
        "--interpolation",
        choices=["linear", "bspline", "nearest", "label"],
        default="linear",
        help="resampling of the moving image (label: label-aware, for segmentations)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: all this process may use)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``smoulder register`` and return its exit status."""
    import numpy as np

    from smoulder.errors import InputError
    from smoulder.images import load_image, save_json, save_nifti
    from smoulder.registration.engines import halfway, register
    from smoulder.registration.transforms import (
        AffineTransform,
        TransformChain,
        log_jacobian_map,
        resample,
    )

    for label in (args.fixed_label, args.moving_label):
        if not label.isalnum():
            raise InputError(
                "--fixed-label/--moving-label", expected="letters and digits only", found=label
            )
    fixed, moving = load_image(args.fixed), load_image(args.moving)
    mask = None
    if args.fixed_mask is not None:
        mask_img = load_image(args.fixed_mask)
        if mask_img.shape != fixed.shape:
            raise InputError(
                args.fixed_mask,
                expected=f"the fixed image's grid {fixed.shape}",
                found=f"shape {mask_img.shape}",
            )
        mask = np.asarray(mask_img.dataobj) > 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    fix, mov = args.fixed_label, args.moving_label

    def name(stem: str, ext: str) -> Path:
        return out / f"{args.prefix}{stem}{ext}"

    def save_chain(chain: TransformChain, grid: Any, stem: str) -> Path:
        # one file per direction: a matrix if linear, else the chain sampled on ``grid``
        if all(isinstance(s, AffineTransform) for s in chain.steps):
            matrix = np.eye(4)
            for step in chain.steps:
                matrix = step.matrix @ matrix
            return AffineTransform(matrix).save(name(stem, ".mat"))
        return chain.to_displacement(grid).save(name(stem, ".nii.gz"))

    start = time.perf_counter()
    written: list[Path] = []
    if args.halfway:
        hw = halfway(
            fixed,
            moving,
            transform=args.transform,
            engine=args.engine,
            device=args.device,
            mask_a=mask,
            seed=args.seed,
            threads=args.threads,
        )
        engine, device, wall = hw.engine, hw.device, hw.wall_s
        ref = hw.reference
        written += [
            save_chain(hw.to_a, ref, f"from-{fix}_to-halfway_mode-image_xfm"),
            save_chain(hw.to_b, ref, f"from-{mov}_to-halfway_mode-image_xfm"),
            save_chain(hw.b_to_a, moving, f"from-{fix}_to-{mov}_mode-image_xfm"),
            save_chain(hw.a_to_b, fixed, f"from-{mov}_to-{fix}_mode-image_xfm"),
        ]
        for img, chain, label in ((fixed, hw.to_a, fix), (moving, hw.to_b, mov)):
            moved = resample(img, ref, chain, interpolation=args.interpolation)
            written.append(
                save_nifti(
                    np.asarray(moved.dataobj),
                    ref.affine,
                    name(f"space-halfway_desc-{label}", ".nii.gz"),
                )
            )
        forward = hw.a_to_b
    else:
        reg = register(
            fixed,
            moving,
            transform=args.transform,
            metric=args.metric,
            engine=args.engine,
            device=args.device,
            fixed_mask=mask,
            seed=args.seed,
            threads=args.threads,
        )
        engine, device, wall = reg.engine, reg.device, reg.wall_s
        written += [
            save_chain(reg.forward, fixed, f"from-{mov}_to-{fix}_mode-image_xfm"),
            save_chain(reg.inverse, moving, f"from-{fix}_to-{mov}_mode-image_xfm"),
        ]
        forward = reg.forward
    moved = resample(moving, fixed, forward, interpolation=args.interpolation)
    written.append(
        save_nifti(
            np.asarray(moved.dataobj), fixed.affine, name(f"space-{fix}_desc-{mov}", ".nii.gz")
        )
    )
    if args.transform == "deformable":
        logjac = log_jacobian_map(forward, fixed)
        written.append(
            save_nifti(
                np.asarray(logjac.dataobj),
                fixed.affine,
                name(f"space-{fix}_desc-logjacobian", ".nii.gz"),
            )
        )
    sidecar = {
        "Sources": [str(Path(args.fixed).resolve()), str(Path(args.moving).resolve())],
        "Transform": args.transform,
        "Halfway": bool(args.halfway),
        "Metric": args.metric,
        "Engine": engine,
        "Device": device,
        "Seed": args.seed,
        "RegistrationSeconds": round(wall, 3),
        "TotalSeconds": round(time.perf_counter() - start, 3),
        "Convention": "each from-A_to-B transform maps points of B to points of A, so it "
        "resamples image A onto B's grid (ANTs -t with -r B)",
        "Outputs": [p.name for p in written],
    }
    written.append(save_json(sidecar, name(f"from-{mov}_to-{fix}_desc-registration", ".json")))
    for path in written:
        print(path)
    return 0
