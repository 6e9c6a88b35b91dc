"""Command line for transforms at query time: ``export``, ``compose`` and ``invert``.

Thin, like cli.py: parse, call :mod:`bigalign.transforms`, print what was written to stdout;
log lines (warnings such as a non-isometric composition) go to stderr. Bad input raises
:class:`bigalign.InputError` (exit code 2). See docs/transforms.md.
"""

from __future__ import annotations

import json

from .cli import add_storage_option, storage_options
from .transforms import SNIPPETS, compose, export, invert

EPILOG = "Transforms at query time, with the numpy lines that apply an export: docs/transforms.md"


def _output_args(p, what: str) -> None:
    p.add_argument("-o", "--output", required=True, help=what)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output written by bigalign (never anything "
                        "else); a rerun with the same inputs and options is a no-op anyway")
    add_storage_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")


def add_commands(sub) -> dict:
    """Register subcommands on the argparse ``sub`` parsers; return {name: handler(args)}."""
    e = sub.add_parser(
        "export", help="write a transform as plain arrays (npz, JSON, safetensors) for "
                       "serving stacks without bigalign",
        description="Write TRANSFORM's map in both directions as plain arrays: 'forward' "
                    "(source -> target, old -> new model: for documents) and, where one "
                    "exists, 'inverse' (target -> source, new -> old: for queries in a "
                    "dual-read). Each direction is matrix M = scale * rotation, source_mean, "
                    "target_mean and a normalize flag; y = (normalize(x) - source_mean) @ M + "
                    "target_mean reproduces 'bigalign apply' / Transform.transform. The "
                    "inverse is exact when dA == dB, a left inverse (a projection onto the "
                    "fitted subspace) when dA < dB, and left out with the reason recorded "
                    "when it would be lossy (dA > dB, or a --normalize fit) unless "
                    "--allow-lossy. Written under a temporary name and renamed into place.",
        epilog=EPILOG)
    e.add_argument("transform", help="a transform saved by 'bigalign fit' (or compose/invert)")
    _output_args(e, "the file to write (.npz, .json or .safetensors)")
    e.add_argument("--format", choices=("npz", "npy", "json", "safetensors"),
                   help="npz (alias npy): numpy's archive of arrays; json: plain lists (about "
                        "20 bytes a number: ~700 MB at d = 4096); safetensors: raw tensors "
                        "with a JSON header. Default: from the output's suffix")
    e.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="dtype of the stored arrays (default float64, exact; float32 halves "
                        "the size and equals apply's float32 arithmetic)")
    e.add_argument("--no-inverse", action="store_true",
                   help="write the forward direction only")
    e.add_argument("--allow-lossy", action="store_true",
                   help="also write the inverse when it is only a pseudo-inverse (dA > dB: "
                        "the map lost dims; --normalize fits: the norm is lost)")

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
    _output_args(c, "where to save the composed transform (A -> C; a Zarr group)")
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
    _output_args(i, "where to save the inverse transform (a Zarr group)")
    i.add_argument("--allow-lossy", action="store_true",
                   help="write the pseudo-inverse even when it is not an inverse")
    return {"export": _export, "compose": _compose, "invert": _invert}


def _models(meta: dict) -> str:
    s, t = meta.get("source_model"), meta.get("target_model")
    if s is None and t is None:
        return ""
    show = lambda m: "?" if m is None else (m if isinstance(m, str) else json.dumps(m))  # noqa: E731
    return f", models {show(s)} -> {show(t)}"


def _export(args) -> int:
    r = export(args.transform, args.output, args.format, dtype=args.dtype,
               inverse=not args.no_inverse, allow_lossy=args.allow_lossy,
               overwrite=args.overwrite, storage_options=storage_options(args))
    d_a, d_b = r.dims
    head = "already there, nothing to do:" if r.nothing_to_do else "wrote"
    print(f"{head} {args.output} ({r.format}, {r.dtype}, {r.bytes:,} bytes{_models(r.metadata)})")
    print(f"  forward: {d_a} -> {d_b} (old -> new: documents)")
    if r.inverse:
        print(f"  inverse: {d_b} -> {d_a} (new -> old: queries), {r.inverse}: "
              f"{r.metadata['inverse']['meaning']}")
    else:
        print(f"  inverse: none ({r.inverse_omitted})")
    if not args.quiet:
        snippet, placeholder = SNIPPETS[r.format]
        snippet = snippet.replace(json.dumps(placeholder), json.dumps(str(args.output)))
        snippet = snippet.replace(placeholder, str(args.output)).replace(
            "old2new.transform", str(args.transform))
        print("apply it with plain numpy (x: rows of the source model):\n")
        print("\n".join(("    " + line).rstrip() for line in snippet.splitlines()))
    return 0


def _compose(args) -> int:
    t = compose(args.first, args.second, output=args.output, overwrite=args.overwrite,
                allow_model_mismatch=args.allow_model_mismatch,
                storage_options=storage_options(args))
    m = t.metadata
    (d_a, d_b), (_, d_c) = (tuple(x["dims"]) for x in m["composed_of"])
    iso = ("orthonormal (distances kept up to the scale)" if m["orthonormal"] else
           f"NOT an isometry (max |Q Q^T - I| = {m['orthonormality_error']:.2g}): distances "
           "are not kept")
    print(f"transform {args.output}: {d_a} -> {d_b} -> {d_c} as one {d_a} -> {d_c} map"
          f"{_models(m)}; scale {t.scale:.6g}; {iso}; normalize={t.normalize}")
    print("  the inputs' training statistics are not kept (they describe neither fit)")
    return 0


def _invert(args) -> int:
    t = invert(args.transform, allow_lossy=args.allow_lossy, output=args.output,
               overwrite=args.overwrite, storage_options=storage_options(args))
    info = t.metadata["inverse"]
    print(f"transform {args.output}: {t.dims[0]} -> {t.dims[1]}{_models(t.metadata)}, "
          f"{info['kind']}: {info['meaning']}")
    return 0


__all__ = ["add_commands"]
