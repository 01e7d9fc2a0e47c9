"""The `fastckpt` command: `fastckpt verify PATH...`, `fastckpt inspect PATH`.

Each subcommand is one function taking its parsed arguments and returning the exit status,
so more subcommands slot in beside these.
"""

from __future__ import annotations

import argparse
import sys


def _verify(args: argparse.Namespace) -> int:
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


def _inspect(args: argparse.Namespace) -> int:
    from fastckpt import _readers

    try:
        checkpoint = _readers.open_checkpoint(args.path, legacy=True)
    except (OSError, ValueError) as e:
        print(f"{args.path}: cannot open: {e}", file=sys.stderr)
        return 2
    total = sum(t.nbytes for t in checkpoint.tensors.values())
    print(f"{args.path}: {len(checkpoint.tensors)} tensors, {total} bytes")
    for key, value in checkpoint.metadata.items():
        shown = value if len(value) <= 60 else f"{value[:57]}..."
        print(f"  meta {key} = {shown}")
    if checkpoint.model_config is not None:
        print(f"  model config: {len(checkpoint.model_config)} characters of JSON")
    for name, t in checkpoint.tensors.items():
        print(f"  {name}  {t.dtype}{list(t.shape)}  {t.nbytes} bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 damaged, 2 unreadable)."""
    parser = argparse.ArgumentParser(prog="fastckpt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check structure and checksums")
    verify.add_argument("paths", nargs="+", metavar="PATH")
    verify.set_defaults(run=_verify)
    inspect = commands.add_parser("inspect", help="list tensors and metadata")
    inspect.add_argument("path", metavar="PATH")
    inspect.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
