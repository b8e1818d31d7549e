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
from typing import TYPE_CHECKING, Any

from smoulder.devices import DEVICES
from smoulder.registration import ENGINES

if TYPE_CHECKING:
    from argparse import Namespace

    import numpy as np
    from nibabel import Nifti1Image as Image

    from smoulder.registration.engines import Halfway, Registration
    from smoulder.registration.transforms import TransformChain

    #: What a registration wrote, its fixed → moving chain, and its result.
    Written = tuple[list[Path], TransformChain, Registration | Halfway]

LABEL_HELP = "name used in the output names (BIDS label, letters and digits)"
DESCRIPTION = (
    "Register MOVING to FIXED (rigid, affine or deformable) or, with --halfway, move both half "
    "way to a space between them. Transforms are ITK/ANTs files."
)


def parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder register``."""
    p = argparse.ArgumentParser(prog="smoulder register", description=DESCRIPTION)
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
    p.add_argument("--engine", choices=ENGINES, default="auto")
    p.add_argument("--device", choices=DEVICES, default="auto")
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
    from smoulder.images import load_image, save_json

    for label in (args.fixed_label, args.moving_label):
        if not label.isalnum():
            from smoulder.errors import InputError

            raise InputError(
                "--fixed-label/--moving-label", expected="letters and digits only", found=label
            )
    fixed, moving = load_image(args.fixed), load_image(args.moving)
    mask = None
    if args.fixed_mask is not None:
        from smoulder.registration.transforms import require_mask

        mask = require_mask(load_image(args.fixed_mask), fixed, what=str(args.fixed_mask))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    estimate = _halfway if args.halfway else _register
    written, forward, used = estimate(args, fixed, moving, mask)
    written += _on_fixed_grid(args, fixed, moving, forward)
    sidecar = {
        "Sources": [str(Path(args.fixed).resolve()), str(Path(args.moving).resolve())],
        "Transform": args.transform,
        "Halfway": bool(args.halfway),
        "Metric": args.metric,
        "Engine": used.engine,
        "Device": used.device,
        "Seed": args.seed,
        "RegistrationSeconds": round(used.wall_s, 3),
        "TotalSeconds": round(time.perf_counter() - start, 3),
        "Convention": "each from-A_to-B transform maps points of B to points of A, so it "
        "resamples image A onto B's grid (ANTs -t with -r B)",
        "Outputs": [p.name for p in written],
    }
    stem = f"from-{args.moving_label}_to-{args.fixed_label}_desc-registration"
    written.append(save_json(sidecar, _path(args, stem, ".json")))
    for path in written:
        print(path)
    return 0


def _path(args: Namespace, stem: str, ext: str) -> Path:
    """Return the output path ``<out>/<prefix><stem><ext>``.

    The names follow BIDS entities (``from-``, ``to-``, ``space-``, ``desc-``) but are not
    built with :func:`smoulder.derivatives.bids_name`: ``--prefix`` is free text (often empty,
    so there may be no ``sub-`` entity) and the resampled images keep the name of their
    ``desc`` without a suffix, as they always have.
    """
    return args.out / f"{args.prefix}{stem}{ext}"


def _save_chain(args: Namespace, chain: TransformChain, grid: Image, stem: str) -> Path:
    """Return the one file written for ``chain``: a matrix if linear, else the chain sampled
    as a displacement field on ``grid``."""
    import numpy as np

    from smoulder.registration.transforms import AffineTransform

    matrices = [s.matrix for s in chain.steps if isinstance(s, AffineTransform)]
    if len(matrices) == len(chain.steps):
        matrix = np.eye(4)
        for step in matrices:
            matrix = step @ matrix
        return AffineTransform(matrix).save(_path(args, stem, ".mat"))
    return chain.to_displacement(grid).save(_path(args, stem, ".nii.gz"))


def _options(args: Namespace) -> dict[str, Any]:
    """Return the keywords :func:`register` and :func:`halfway` both take from the command."""
    names = ("transform", "engine", "device", "seed", "threads")
    return {name: getattr(args, name) for name in names}


def _register(args: Namespace, fixed: Image, moving: Image, mask: np.ndarray | None) -> Written:
    """Return the files of ``moving`` registered to ``fixed``, the forward chain, the result."""
    from smoulder.registration.engines import register

    reg = register(fixed, moving, metric=args.metric, fixed_mask=mask, **_options(args))
    fix, mov = args.fixed_label, args.moving_label
    written = [
        _save_chain(args, reg.forward, fixed, f"from-{mov}_to-{fix}_mode-image_xfm"),
        _save_chain(args, reg.inverse, moving, f"from-{fix}_to-{mov}_mode-image_xfm"),
    ]
    return written, reg.forward, reg


def _halfway(args: Namespace, fixed: Image, moving: Image, mask: np.ndarray | None) -> Written:
    """Return the files of the halfway registration of the two images (maps and both images
    in the halfway space), the fixed → moving chain and the result."""
    import numpy as np

    from smoulder.images import save_nifti
    from smoulder.registration.engines import halfway
    from smoulder.registration.transforms import resample

    hw = halfway(fixed, moving, mask_a=mask, **_options(args))
    fix, mov, ref = args.fixed_label, args.moving_label, hw.reference
    written = [
        _save_chain(args, hw.to_a, ref, f"from-{fix}_to-halfway_mode-image_xfm"),
        _save_chain(args, hw.to_b, ref, f"from-{mov}_to-halfway_mode-image_xfm"),
        _save_chain(args, hw.b_to_a, moving, f"from-{fix}_to-{mov}_mode-image_xfm"),
        _save_chain(args, hw.a_to_b, fixed, f"from-{mov}_to-{fix}_mode-image_xfm"),
    ]
    for img, chain, label in ((fixed, hw.to_a, fix), (moving, hw.to_b, mov)):
        moved = resample(img, ref, chain, interpolation=args.interpolation)
        path = _path(args, f"space-halfway_desc-{label}", ".nii.gz")
        written.append(save_nifti(np.asarray(moved.dataobj), ref.affine, path))
    return written, hw.a_to_b, hw


def _on_fixed_grid(
    args: Namespace, fixed: Image, moving: Image, chain: TransformChain
) -> list[Path]:
    """Return the files of the moving image on the fixed grid and, for a deformable map, of
    its log-Jacobian determinant there."""
    import numpy as np

    from smoulder.images import save_nifti
    from smoulder.registration.transforms import log_jacobian_map, resample

    fix, mov = args.fixed_label, args.moving_label
    moved = resample(moving, fixed, chain, interpolation=args.interpolation)
    path = _path(args, f"space-{fix}_desc-{mov}", ".nii.gz")
    written = [save_nifti(np.asarray(moved.dataobj), fixed.affine, path)]
    if args.transform == "deformable":
        logjac = log_jacobian_map(chain, fixed)
        path = _path(args, f"space-{fix}_desc-logjacobian", ".nii.gz")
        written.append(save_nifti(np.asarray(logjac.dataobj), fixed.affine, path))
    return written
