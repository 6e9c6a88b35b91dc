"""Command line for ``bigalign compose`` and ``bigalign invert``: transforms built from
transforms (:mod:`bigalign.commands.compose`). See docs/transforms.md.
"""

from __future__ import annotations

from .common import models_text, storage_options
from .export import add_output_args

EPILOG = "Transforms at query time, with the numpy lines that apply an export: docs/transforms.md"


def add_commands(sub) -> dict:
    """Register ``compose`` and ``invert``; return {name: handler(args)}."""
    c = sub.add_parser(
        "compose", help="one transform equal to FIRST then SECOND (v1 -> v2 -> v3 gives "
                        "v1 -> v3)",
        description="Fold two transforms into one: OUTPUT(x) = SECOND(FIRST(x)), means and "
                    "scales included (rotation Q1 Q2, scale s1 s2, source mean of FIRST, "
                    "target mean SECOND(target mean of FIRST)). FIRST's output dimension "
                    "must be SECOND's input dimension; SECOND must not normalise its input "
                    "(a --normalize fit: not foldable, apply the two in sequence). When both "
                    "record model stamps, FIRST's target model must be SECOND's source model. "
                    "A chain whose dims rise then fall (dA < dB > dC) is generally not an "
                    "isometry: it is said and recorded. The inputs' training statistics are "
                    "not kept (they describe neither fit); both inputs are recorded by path "
                    "and digest.",
        epilog=EPILOG)
    c.add_argument("first", help="transform applied first (model A -> B)")
    c.add_argument("second", help="transform applied second (model B -> C)")
    add_output_args(c, "where to save the composed transform (A -> C; a Zarr group)")
    c.add_argument("--allow-model-mismatch", action="store_true",
                   help="compose even when FIRST's target model stamp differs from SECOND's "
                        "source model stamp (both are recorded in the output)")

    i = sub.add_parser(
        "invert", help="the transform back, target -> source (exact when dA == dB)",
        description="Write the inverse map, target -> source: (y - target_mean) Q^T / s + "
                    "source_mean, model stamps swapped. dA == dB: exact, inverse(T(x)) = x. "
                    "dA < dB: a left inverse: exact for vectors T produced; other target "
                    "vectors are first projected onto the dA-dim subspace T maps onto. "
                    "dA > dB (T dropped dims) or a --normalize fit (T dropped the norm): not "
                    "an inverse, refused unless --allow-lossy. What it is is recorded in the "
                    "output's metadata ('inverse').",
        epilog=EPILOG)
    i.add_argument("transform", help="a transform saved by 'bigalign fit' (or compose)")
    add_output_args(i, "where to save the inverse transform (a Zarr group)")
    i.add_argument("--allow-lossy", action="store_true",
                   help="write the pseudo-inverse even when it is not an inverse")
    return {"compose": _compose, "invert": _invert}


def _compose(args) -> int:
    from ..commands.compose import compose

    t = compose(args.first, args.second, output=args.output, overwrite=args.overwrite,
                allow_model_mismatch=args.allow_model_mismatch,
                storage_options=storage_options(args))
    if args.quiet:
        return 0
    m = t.metadata
    (d_a, d_b), (_, d_c) = (tuple(x["dims"]) for x in m["composed_of"])
    iso = ("orthonormal (distances kept up to the scale)" if m["orthonormal"] else
           f"NOT an isometry (max |Q Q^T - I| = {m['orthonormality_error']:.2g}): distances "
           "are not kept")
    print(f"transform {args.output}: {d_a} -> {d_b} -> {d_c} as one {d_a} -> {d_c} map"
          f"{models_text(m)}; scale {t.scale:.6g}; {iso}; normalize={t.normalize}")
    print("  the inputs' training statistics are not kept (they describe neither fit)")
    return 0


def _invert(args) -> int:
    from ..commands.compose import invert

    t = invert(args.transform, allow_lossy=args.allow_lossy, output=args.output,
               overwrite=args.overwrite, storage_options=storage_options(args))
    if args.quiet:
        return 0
    info = t.metadata["inverse"]
    print(f"transform {args.output}: {t.dims[0]} -> {t.dims[1]}{models_text(t.metadata)}, "
          f"{info['meaning']}")  # the meaning starts with the kind, in words
    return 0


__all__ = ["add_commands"]
