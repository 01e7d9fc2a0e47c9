"""The `fastckpt` command: `convert`, `verify`, `inspect` and `bench` (each registers the
same way).

Heavy imports (Keras, TensorFlow) happen inside the subcommands, so `fastckpt --help` is
instant, and `convert`, `inspect` and `verify` run without Keras where the format allows.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence

# Benchmarks run with the BLAS library's own CPU detection (docs: performance.md).
_BENCH_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fastckpt.bench.settings import BACKENDS, SECTIONS

    p = sub.add_parser(
        "bench",
        help="compare fastckpt with Keras, safetensors and the I/O floors on this machine",
        description="Runs the benchmark in the current folder and writes results.json, "
        "results.md and PNG plots to --out. The default run takes about 10-15 minutes on 2 "
        "cores; --quick about 2; --full adds 4 GiB checkpoints and 20,000 variables.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, few rounds (~2 min)")
    size.add_argument("--full", action="store_true", help="up to 4 GiB and 20,000 variables")
    p.add_argument("--out", default="bench-results", help="results folder (default: %(default)s)")
    p.add_argument(
        "--disk",
        default=None,
        help="folder on a real file system for the disk target (default: inside --out)",
    )
    p.add_argument(
        "--tmpfs",
        default="/dev/shm",
        help="folder on tmpfs for the in-memory target (default: %(default)s; 'none' skips it)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="SECTION",
        help=f"run only these sections (repeatable or comma-separated): {', '.join(SECTIONS)}",
    )
    p.add_argument(
        "--backend",
        action="append",
        default=None,
        choices=BACKENDS,
        help="the whole-fit section's Keras backends (repeatable; default: every one this "
        "environment can import)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if any(k in os.environ for k in _BENCH_UNSET):
        env = {k: v for k, v in os.environ.items() if k not in _BENCH_UNSET}
        os.execve(sys.executable, [sys.executable, "-m", "fastckpt.cli", *argv], env)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from fastckpt.bench.runner import Options, main_exit_code, run
    from fastckpt.bench.settings import SECTIONS

    sections: list[str] = []
    for item in args.only or []:
        sections += [s.strip() for s in item.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(
            f"fastckpt bench: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    opts = Options(
        mode="quick" if args.quick else "full" if args.full else "default",
        out=args.out,
        disk=args.disk,
        tmpfs=None if args.tmpfs.lower() == "none" else args.tmpfs,
        sections=tuple(sections) or SECTIONS,
        plots=not args.no_plots,
        command="fastckpt " + shlex.join(argv),
        backends=tuple(args.backend or ()),
    )
    return main_exit_code(run(opts))


def _add_convert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert",
        help="copy a checkpoint into another format, streamed, then verify it",
        description="Writes SRC in the format DST's suffix names (.weights.h5, .weights.json, "
        ".keras, .h5, .safetensors, .zst.safetensors), then checks every tensor of DST "
        "against SRC. Keras's own files are sources like any other. Between the Keras "
        "weights layouts nothing is loaded (no Keras needed, memory stays bounded); the "
        "legacy .h5 layout goes through the model, rebuilt with Keras. Progress goes to "
        "stderr: a bar on a terminal, plain lines otherwise. Exit status: 0 written and "
        "verified, 1 the written file did not match (it is removed), 2 the conversion "
        "cannot be made (missing or damaged source, a format that cannot hold it).",
    )
    p.add_argument("source", metavar="SRC")
    p.add_argument("destination", metavar="DST")
    p.add_argument(
        "--max-shard-size",
        type=float,
        default=None,
        metavar="GB",
        help="for a .weights.json destination: the largest shard (default: 5)",
    )
    p.add_argument(
        "--compression",
        choices=["zstd"],
        default=None,
        help="write the zstd container (implied by a .zst.safetensors name)",
    )
    p.add_argument("--threads", type=int, default=None, help="reader and writer threads")
    p.add_argument("--no-verify", action="store_true", help="skip the check of DST against SRC")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import dataclasses

    from fastckpt._progress import rate_text, size_text
    from fastckpt.conversion import CopyMismatchError, convert

    shard = args.max_shard_size
    if shard is None and args.destination.endswith(".weights.json"):
        shard = 5.0
    try:
        result = convert(
            args.source,
            args.destination,
            max_shard_size=shard,
            compression=args.compression,
            threads=args.threads,
            verify=not args.no_verify,
            verbose=not args.quiet,
        )
    except CopyMismatchError as e:
        print(f"fastckpt convert: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"fastckpt convert: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=1))
        return 0
    print(
        f"{result.source} -> {result.path}: {result.tensors} tensors, "
        f"{size_text(result.tensor_bytes)} in {result.seconds:.2f} s "
        f"({rate_text(result.tensor_bytes, result.seconds)}), {size_text(result.bytes)} "
        f"written" + (", verified" if result.verified else ", not verified")
    )
    return 0


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect",
        help="list a checkpoint's tensors: name, dtype, shape, bytes",
        description="Lists the tensors of a .safetensors, .zst.safetensors, .weights.h5, "
        ".weights.json, .keras or legacy .h5 checkpoint without loading a model. Exit "
        "status: 0 listed, 2 the file cannot be read as a checkpoint.",
    )
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_inspect)


def _inspect(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from fastckpt.inspection import describe

    try:
        info = describe(args.path)
    except (OSError, ValueError) as e:  # missing, unreadable, damaged, not a checkpoint
        print(f"{args.path}: cannot inspect: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(
        f"{info['path']}: {info['format']}, {info['file_bytes']:,} bytes, "
        f"{len(info['tensors'])} tensors, {info['tensor_bytes']:,} bytes of tensors"
        + (", with model config" if info["has_model_config"] else "")
    )
    width = max((len(t["name"]) for t in info["tensors"]), default=4)
    stored = any("stored_bytes" in t for t in info["tensors"])
    for t in info["tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        line = f"  {t['name']:<{width}}  {t['dtype']:<8}  {shape:<16}  {t['bytes']:>14,}"
        if stored:
            line += f"  {t['stored_bytes']:>14,} stored"
        print(line)
    return 0


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="check a checkpoint's structure and checksums",
        description="Exit status: 0 every file is sound, 1 some file is damaged, 2 some file "
        "cannot be read at all.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from fastckpt.verify import verify

    status = 0
    for path in args.paths:
        try:
            report = verify(path)
        except (OSError, ValueError) as e:
            print(f"{path}: cannot verify: {e}", file=sys.stderr)
            status = 2
            continue
        print(report)
        if not report.ok:
            status = max(status, 1)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastckpt` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="fastckpt", description="Durable, fast, background checkpoints for Keras."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_verify(sub)
    _add_inspect(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    code: int = args.handler(args, argv)
    return code


if __name__ == "__main__":
    sys.exit(main())
