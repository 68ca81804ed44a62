"""`tcpcp`: the operator's umbrella command.

Subcommands live next to the code they drive. Each module named in SUBCOMMANDS defines
`register(subparsers)`, adding its own parser and setting `func=<callable(args) -> int>`.
Benchmarks are modules `ops.bench.<name>` with `add_arguments(parser)` and `run(args) -> int`;
`tcpcp bench <name>` runs one.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from ops import logs

SUBCOMMANDS = (
    "ops.labcli",
    "ops.passcli",
    "store.inspectcli",
)


def _bench_names() -> list[str]:
    import ops.bench

    modules = pkgutil.iter_modules(ops.bench.__path__)
    return sorted(m.name for m in modules if not m.name.startswith("_"))


def _register_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench",
        help="run a benchmark (figures printed and saved under bench/)",
        description=(
            "Benchmarks measure tcpcp on this machine, in the lab: each prints its figures and "
            "writes them to bench/<name>.json, as ratios against a baseline measured in the same "
            "run where a ratio makes sense. Speed is measured here, never asserted in tests. "
            "`tcpcp bench NAME --help` describes one."),
    )
    names = bench.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name in _bench_names():
        module = importlib.import_module(f"ops.bench.{name}")
        p = names.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcpcp",
        description=(
            "tcpcp: fail-over checkpointing for live TCP connections. "
            "Operator commands: the network-namespace lab, connection passing, "
            "checkpoint inspection and benchmarks."
        ),
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default=None,
        help="log output: JSON lines or readable console (default: console on a terminal, "
        "else JSON; env TCPCP_LOG_FORMAT)",
    )
    parser.add_argument("--log-level", default=None,
                        help="log level (default info; env TCPCP_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # that part has not landed yet
        module.register(sub)
    _register_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(fmt=args.log_format, level=args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
