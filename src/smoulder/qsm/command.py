"""``smoulder qsm``: QSM, filtered phase and SWI of one multi-echo GRE from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from smoulder.devices import DEVICES

if TYPE_CHECKING:
    import numpy as np


def parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder qsm``."""
    p = argparse.ArgumentParser(
        prog="smoulder qsm",
        description="QSM (ppm) from multi-echo GRE magnitude and phase (BIDS sidecars give "
        "EchoTime and MagneticFieldStrength), with the field maps, filtered phase, SWI and minIP.",
    )
    p.add_argument("--magnitude", nargs="+", type=Path, required=True, help="one file per echo")
    p.add_argument("--phase", nargs="+", type=Path, required=True, help="one file per echo")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--prefix", default="", help="prepended to every output name")
    p.add_argument("--mask", type=Path, help="brain mask on the GRE grid (default: from magnitude)")
    p.add_argument("--method", choices=["tv", "tkd"], default="tv")
    p.add_argument(
        "--reference-mask",
        type=Path,
        help="reference χ to the mean inside this mask on the GRE grid (e.g. ventricular CSF); "
        "default: the mean of the QSM mask",
    )
    p.add_argument(
        "--unwrap",
        choices=["laplacian", "quality"],
        default="laplacian",
        help="spatial unwrapping: least squares (default) or reliability-guided region growing",
    )
    p.add_argument(
        "--data-weight",
        choices=["reliability", "uniform"],
        default="reliability",
        help="TV's data term: weighted by the field's reliability (1/noise, from the magnitudes "
        "and echo times; default) or uniform",
    )
    p.add_argument("--device", choices=DEVICES, default="auto")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``smoulder qsm``; return the exit status."""
    import nibabel as nib
    import numpy as np

    from smoulder.devices import resolve_device
    from smoulder.images import save_json
    from smoulder.qsm.reconstruct import (
        InversionSettings,
        filtered_phase,
        load_echoes,
        magnitude_mask,
        reconstruct,
        swi,
    )

    device = resolve_device(args.device)
    echoes = load_echoes(list(args.magnitude), list(args.phase))
    grid = echoes.magnitude.shape[1:]
    mask = _mask(args.mask, grid) if args.mask else magnitude_mask(echoes.magnitude)
    reference = _mask(args.reference_mask, grid) if args.reference_mask else None
    result = reconstruct(
        echoes,
        mask,
        method=args.method,
        device=device,
        unwrap=args.unwrap,
        reference_mask=reference,
        settings=InversionSettings(data_weight=args.data_weight),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    hp = filtered_phase(echoes)
    swi_img, minip = swi(echoes, hp)
    base = {
        "Sources": echoes.sources,
        "EchoTimes": [t / 1000 for t in echoes.echo_times_ms],
        "MagneticFieldStrength": echoes.b0_tesla,
    }
    outputs = {
        "Chimap": (
            result.chi_ppm,
            {
                "Units": "ppm",
                "Method": result.method,
                "Parameters": result.parameters,
                "Reference": result.parameters["reference"],
                "Device": device,
            },
        ),
        "desc-total_fieldmap": (
            result.total_field_ppm,
            {"Units": "ppm", "Description": "unwrapped multi-echo field"},
        ),
        "desc-local_fieldmap": (
            result.local_field_ppm,
            {"Units": "ppm", "Description": "after V-SHARP"},
        ),
        "desc-qsm_mask": (
            result.mask.astype(np.uint8),
            {"Description": "voxels of the QSM (eroded by V-SHARP)"},
        ),
        "desc-filtered_phase": (
            hp,
            {"Units": "rad", "Description": "homodyne high-pass filtered phase, last echo"},
        ),
        "desc-swi_MEGRE": (
            swi_img,
            {"Description": "SWI: magnitude x negative-phase mask^4, last echo"},
        ),
        "desc-minip_MEGRE": (
            minip,
            {"Description": "minimum intensity projection of the SWI, 8 mm slab"},
        ),
    }
    from smoulder.images import write_nifti

    for name, (data, side) in outputs.items():
        path = args.out / f"{args.prefix}{name}.nii.gz"
        write_nifti(nib.Nifti1Image(np.asarray(data), echoes.affine), path)
        save_json({**base, **side}, path.with_name(path.name.replace(".nii.gz", ".json")))
    t = result.timings
    print(
        f"QSM ({result.method}, {device}) in {sum(t.values()):.1f} s: {json.dumps({k: round(v, 2) for k, v in t.items()})}; {len(outputs)} maps in {args.out}"
    )
    return 0


def _mask(path: Path, grid: tuple[int, ...]) -> np.ndarray:
    """Return the mask in ``path`` as booleans, checked to lie on the GRE grid ``grid``."""
    import nibabel as nib
    import numpy as np

    from smoulder.errors import InputError

    mask = np.asarray(nib.load(path).dataobj) > 0  # type: ignore[attr-defined]
    if mask.shape != grid:
        raise InputError(
            str(path), expected=f"a mask on the GRE grid {grid}", found=f"{mask.shape}"
        )
    return mask
