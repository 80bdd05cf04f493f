"""The ``arr`` command: each subcommand maps onto the config and one entry point."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from typing import TYPE_CHECKING

from arr.config import ConfigError, load_config, parse_address

if TYPE_CHECKING:
    from arr.config import Config
    from arr.server import Router


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # the router works on the stock loop, only slower
        logging.getLogger("arr").warning("uvloop not installed; using the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def build_router(config: "Config") -> "Router":
    """The router for a config: with the BPF handoff engine in nat mode."""
    from arr.metrics import Metrics
    from arr.server import Router

    if config.router.mode != "nat" or not config.pools:
        return Router(config)
    from handoff.control import load_psk
    from handoff.engine import RouterHandoff

    assert config.router.secret_file is not None
    try:
        secret = load_psk(config.router.secret_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"router.secret_file: {exc}") from None
    metrics = Metrics()
    engine = RouterHandoff(config.handoff, config.all_targets(), metrics, secret=secret,
                           node_id=f"router@{config.router.listen[0]}:{config.router.listen[1]}")
    return Router(config, handoff=engine, metrics=metrics)


def _serve(args: argparse.Namespace) -> int:
    from arr.server import run

    config = load_config(args.config)
    overrides = {}
    if args.listen:
        overrides["listen"] = parse_address(args.listen, "--listen")
    if args.mode:
        overrides["mode"] = args.mode
    if overrides:
        config = dataclasses.replace(config, router=dataclasses.replace(config.router, **overrides))
    _install_uvloop()
    asyncio.run(run(build_router(config)))
    return 0


def _agent(args: argparse.Namespace) -> int:
    from handoff.agent import load_agent_config, run_agent

    settings = load_agent_config(args.config)
    _install_uvloop()
    asyncio.run(run_agent(settings))
    return 0


def _conns(args: argparse.Namespace) -> int:
    from handoff.inspect import main as conns_main

    return conns_main(args)


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.pools)} pool(s), {len(config.rules)} rule(s), "
          f"mode {config.router.mode}, listen {config.router.listen[0]}:{config.router.listen[1]})")
    return 0


def _bench(argv: list[str]) -> int:
    """``arr bench ARGS``: every argument goes to the harness as it is."""
    try:
        from benchmarks import main as bench_main
    except ImportError:
        print("arr bench: the benchmark harness needs the 'bench' extra "
              "(make bench, or pip install 'arr[bench]')", file=sys.stderr)
        return 2
    return bench_main(argv)


def _demo(args: argparse.Namespace) -> int:
    from arr.demo import main as demo_main

    return demo_main(args)


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
             "G": 1 << 30, "GIB": 1 << 30}
    number = text.rstrip("BbIiKkMmGg")
    unit = text[len(number):].upper()
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 1024, 64KiB, 64MiB")
    return int(number) * units[unit]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arr", description="Layer-7 routing with direct server return.")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the router")
    serve.add_argument("--config", required=True, help="TOML configuration file")
    serve.add_argument("--listen", help="override router.listen (host:port)")
    serve.add_argument("--mode", choices=("nat", "proxy"), help="override router.mode")
    serve.set_defaults(func=_serve)

    agent = sub.add_parser("agent", help="run the target-side handoff agent")
    agent.add_argument("--config", required=True, help="TOML configuration file ([agent])")
    agent.set_defaults(func=_agent)

    conns = sub.add_parser("conns", help="list handed-off connections (reads the pinned maps)")
    from handoff.inspect import add_arguments as add_conns_arguments

    add_conns_arguments(conns)
    conns.set_defaults(func=_conns)

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config")
    check.set_defaults(func=_check)

    sub.add_parser("bench", help="benchmark arr against HAProxy, nginx and a direct connection "
                                 "(arguments go to the harness: arr bench --help)")

    demo = sub.add_parser("demo", help="build a namespace cluster, download through the router")
    demo.add_argument("--mode", choices=("nat", "proxy"), default="nat")
    demo.add_argument("--size", type=_size, default=_size("64MiB"), help="object size (default 64MiB)")
    demo.add_argument("--targets", type=int, default=2)
    demo.add_argument("--requests", type=int, default=4, help="downloads to make (default 4)")
    demo.add_argument("--topology", choices=("bridge", "gateway"), default="bridge")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"arr: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
