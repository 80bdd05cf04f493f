"""The ``arr`` command: each subcommand maps onto the config and one entry point."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from arr.config import ConfigError, check_files, load_config, parse_address, router_secret

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from arr.config import Config
    from arr.server import Router


def _run(main: "Coroutine[object, object, object]") -> None:
    """MAIN on uvloop where installed, through a loop factory (event-loop
    policies are deprecated from Python 3.14)."""
    factory = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # the router works on the stock loop, only slower
        logging.getLogger("arr").warning("uvloop not installed; using the default asyncio loop")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def build_router(config: "Config") -> "Router":
    """The router for a config: with the BPF handoff engine in nat mode."""
    from arr.metrics import Metrics
    from arr.server import Router

    if config.router.mode != "nat" or not config.pools:
        return Router(config)
    from handoff.engine import RouterHandoff

    secret = router_secret(config)
    metrics = Metrics()
    engine = RouterHandoff(config.handoff, config.all_targets(), metrics, secret=secret,
                           node_id=f"router@{socket.gethostname()}/{config.router.listen[0]}:{config.router.listen[1]}")
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
    try:
        _run(run(build_router(config), config_path=str(args.config)))
    except OSError as exc:
        return _startup_failed("arr serve", exc)
    return 0


def _startup_failed(what: str, exc: OSError) -> int:
    """A port in use, a socket path taken: one line, no traceback."""
    print(f"{what}: cannot start: {exc.strerror or exc}"
          f"{f' ({exc.filename})' if exc.filename else ''}", file=sys.stderr)
    return 1


def _agent(args: argparse.Namespace) -> int:
    from handoff.agent import load_agent_config, run_agent

    settings = load_agent_config(args.config)
    _check_agent_files(settings)
    try:
        _run(run_agent(settings))
    except OSError as exc:
        return _startup_failed("arr agent", exc)
    return 0


def _check_agent_files(settings: object) -> None:
    from handoff.control import load_psk

    try:
        load_psk(settings.secret_file)  # type: ignore[attr-defined]
    except ValueError as exc:
        raise ConfigError(f"agent.secret_file: {exc}") from None


def _admin(args: argparse.Namespace) -> int:
    """``arr targets|drain|enable|weight|reload|status|migrate``: one admin request."""
    import json

    from arr.admin import AdminError, request

    payload = {k: getattr(args, k) for k in ("target", "weight") if getattr(args, k, None) is not None}
    timeout = 30.0
    if args.command == "migrate":
        payload = {"from": args.source, "to": args.destination, "client": args.client, "port": args.port,
                   "max": args.max, "mode": args.mode, "wait": args.wait}
        payload = {k: v for k, v in payload.items() if v is not None}
        timeout = (args.wait or MOVE_WAIT_CEILING) + 30.0
    elif args.command == "drain" and args.move:
        payload.update(move=True, **({"within": args.within} if args.within is not None else {}))
        timeout = (args.within if args.within is not None else MOVE_WAIT_CEILING) + 30.0
    elif args.command == "drain" and args.within is not None:
        print("arr drain: --within needs --move", file=sys.stderr)
        return 2
    try:
        result = request(args.command, payload, path=args.socket, timeout=timeout)
    except AdminError as exc:
        print(f"arr {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.json or args.command in ("status", "reload"):
        print(json.dumps(result, indent=2))
    elif args.command == "migrate" or isinstance(result, dict):
        report = result if args.command == "migrate" else result["moved"]
        print(describe_move(report))
    else:
        print(f"{'pool':<12} {'target':<24} {'address':<22} {'weight':>6} {'state':<9} "
              f"{'in flight':>9} {'handed off':>10}")
        for t in result:
            state = "draining" if t["draining"] else "up" if t["healthy"] else "down"
            print(f"{t['pool']:<12} {t['target']:<24} {t['address']:<22} {t['weight']:>6} {state:<9} "
                  f"{t['in_flight']:>9} {t['handed_off']:>10}")
    return 0


MOVE_WAIT_CEILING = 3600.0
"""The longest wait a move may be given (arr/admin.py checks it)."""


def describe_move(report: dict) -> str:
    """One line a person reads: what a migration did."""
    skipped = ", ".join(f"{why} {n}" for why, n in report["skipped"].items()) or "none"
    left = ", ".join(f"{why} {n}" for why, n in report["left"].items()) or "none"
    return (f"migrate {report['from']} -> {report['to'] or 'policy'} ({report['mode']}): "
            f"{report['selected']} selected, {report['moved']} moved, {report['reset']} reset, "
            f"skipped: {skipped}; not selected: {left}; {report['seconds']:.2f} s")


def _conns(args: argparse.Namespace) -> int:
    from handoff.inspect import main as conns_main

    return conns_main(args)


def _check(args: argparse.Namespace) -> int:
    """A router config, or an agent config (a file with an [agent] table):
    parsed, validated, and the files it names read as the process would."""
    import tomllib
    from pathlib import Path

    try:
        is_agent = "agent" in tomllib.loads(Path(args.config).read_text())
    except (OSError, ValueError):
        is_agent = False  # load_config names the problem
    if is_agent:
        from handoff.agent import load_agent_config

        settings = load_agent_config(args.config)
        _check_agent_files(settings)
        print(f"{args.config}: ok (agent, listen {settings.listen[0]}:{settings.listen[1]})")
        return 0
    config = load_config(args.config)
    check_files(config)
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


LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    from arr.admin import DEFAULT_SOCKET
    from arr.version import describe

    # --log-level before or after the subcommand: the subcommands' copy does
    # not overwrite the main one unless given (SUPPRESS).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help="application log level (default info; the access log has its own destination)")
    parser = argparse.ArgumentParser(prog="arr", description="Layer-7 routing with direct server return.",
                                     parents=[common])
    parser.add_argument("--version", action="version", version=describe())
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    serve = command("serve", help="run the router")
    serve.add_argument("--config", required=True, help="TOML configuration file")
    serve.add_argument("--listen", help="override router.listen (host:port)")
    serve.add_argument("--mode", choices=("nat", "proxy"), help="override router.mode")
    serve.set_defaults(func=_serve)

    agent = command("agent", help="run the target-side handoff agent")
    agent.add_argument("--config", required=True, help="TOML configuration file ([agent])")
    agent.set_defaults(func=_agent)

    conns = command("conns", help="list handed-off connections (reads the pinned maps)")
    from handoff.inspect import add_arguments as add_conns_arguments

    add_conns_arguments(conns)
    conns.set_defaults(func=_conns)

    check = command("check-config", help="validate a configuration file and exit")
    check.add_argument("config")
    check.set_defaults(func=_check)

    admin_help = {"targets": "list targets: state, weight, in flight, handed off (admin socket)",
                  "drain": "stop sending new requests to a target; in-flight ones finish",
                  "enable": "undo drain", "weight": "set a target's weight at run time",
                  "reload": "reload the configuration file (as SIGHUP), report what changed",
                  "status": "the running router: version, uptime, connections",
                  "migrate": "move handed-off connections from one target to another (live or reset)"}
    for name, text in admin_help.items():
        admin = command(name, help=text)
        if name in ("drain", "enable", "weight"):
            admin.add_argument("target", help="a target's name or host:port")
        if name == "weight":
            admin.add_argument("weight", type=int)
        if name == "drain":
            admin.add_argument("--move", action="store_true",
                               help="also move its handed-off connections away (live; busy ones once "
                                    "their response is acknowledged)")
            admin.add_argument("--within", type=float, metavar="SECONDS",
                               help="with --move: how long a busy connection may take (default "
                                    "handoff.migrate_wait)")
        if name == "migrate":
            admin.add_argument("--from", dest="source", required=True, metavar="TARGET",
                               help="the target to move connections off (name or host:port)")
            admin.add_argument("--to", dest="destination", metavar="TARGET",
                               help="where their next requests go (default: the policy decides)")
            admin.add_argument("--client", metavar="CIDR", help="only clients in this network")
            admin.add_argument("--port", metavar="N[-M]", help="only clients from these source ports")
            admin.add_argument("--max", type=int, metavar="N", help="at most this many connections")
            admin.add_argument("--mode", choices=("live", "reset"), default="live",
                               help="live: move without the client noticing (default); reset: reset "
                                    "them, their reconnections go to --to")
            admin.add_argument("--wait", type=float, metavar="SECONDS",
                               help="live: how long a connection in the middle of a response may take "
                                    "(default handoff.migrate_wait)")
        admin.add_argument("--socket", default=os.environ.get("ARR_ADMIN_SOCKET", DEFAULT_SOCKET),
                           help=f"admin socket (default $ARR_ADMIN_SOCKET or {DEFAULT_SOCKET})")
        admin.add_argument("--json", action="store_true")
        admin.set_defaults(func=_admin)

    command("bench", help="benchmark arr against HAProxy, nginx and a direct connection "
                                 "(arguments go to the harness: arr bench --help)")

    demo = command("demo", help="build a namespace cluster, download through the router")
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
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"arr: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
