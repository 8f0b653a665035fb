"""Command line (docs/design.md §3): `tiktokguard serve`, `check`, `devices` and the rest.

Exit status: 0 success (for `check`: the name would be resolved), 1 `check` says blocked or
refused, 2 bad usage or configuration (nothing was bound).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import os
import signal
import sys
import time
from collections.abc import Sequence

from tiktokguard import __version__
from tiktokguard.config import Config, ConfigError, Overrides, load_config
from tiktokguard.devices import cli as devices_cli
from tiktokguard.policy.clients import Device, DeviceIndex
from tiktokguard.policy.domains import ListError
from tiktokguard.policy.engine import Verdict

EXIT_OK, EXIT_BLOCKED, EXIT_USAGE = 0, 1, 2
EXIT_RETRY = 1  # serve: worth trying again (systemd restarts it)
# What a shell reports for a command ended by SIGPIPE (`cmd | head -1`), as cat or grep end.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
# Every exit status, by command (docs/reference.md is generated from this).
EXIT_CODES: tuple[tuple[str, int, str], ...] = (
    ("serve", EXIT_OK, "stopped by SIGTERM or SIGINT, queries in flight answered"),
    ("serve", EXIT_RETRY, "a listen address not (yet) there or in use, or an unexpected error "
                          "after start (a traceback): systemd restarts it"),
    ("serve", EXIT_USAGE, "bad configuration or list file, a file or folder it may not use "
                          "(named), a state database newer than this version: one line on "
                          "stderr; the unit does not restart (RestartPreventExitStatus=2)"),
    ("check", EXIT_OK, "the name would be resolved for that client"),
    ("check", EXIT_BLOCKED, "the name would be blocked (or the client refused)"),
    ("check", EXIT_USAGE, "bad usage or configuration"),
    ("devices, tokens, audit, incidents", EXIT_OK, "done"),
    ("devices, tokens, audit, incidents", 1, "the API said no (4xx/5xx); its error on stderr"),
    ("devices, tokens, audit, incidents", EXIT_USAGE,
     "bad usage, no token, or the API cannot be reached"),
    ("migrate", EXIT_OK, "every row copied"),
    ("migrate", EXIT_USAGE, "bad usage or configuration, the database unreachable, or the "
                            "target not empty: nothing was copied"),
    ("every command but serve", EXIT_BROKEN_PIPE,
     "its output's reader went away (`| head -1`): it ended quietly, as other Unix tools do"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiktokguard",
        description="DNS enforcement daemon: TikTok and ByteDance denied to managed devices.")
    parser.add_argument("--version", action="version", version=f"tiktokguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the DNS resolver and the HTTP API")
    serve.add_argument("--config", help="TOML config file (default: the embedded default)")
    serve.add_argument("--dns-listen", action="append", default=[], metavar="HOST:PORT",
                       help="DNS address (UDP and TCP); repeatable; replaces [dns] listen")
    serve.add_argument("--http-listen", metavar="HOST:PORT",
                       help='HTTP address; "" turns HTTP off; replaces [http] listen')
    serve.add_argument("--upstream", action="append", default=[], metavar="HOST[:PORT]",
                       help="upstream resolver; repeatable; replaces [dns] upstreams")
    serve.add_argument("--state-dir", metavar="DIR", help="state folder; replaces [state] dir")
    serve.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                       help="log format (auto: console on a terminal, JSON otherwise)")

    check = sub.add_parser("check", help="show how a name would be decided for a client")
    check.add_argument("name", help="the query name, e.g. www.tiktok.com")
    check.add_argument("--client", metavar="IP",
                       help="client address (default: one in the first managed network)")
    check.add_argument("--config", help="TOML config file (default: the embedded default)")
    check.add_argument("--state-dir", metavar="DIR",
                       help="state folder whose allowlisted devices count (default: the config's)")
    check.add_argument("--without-devices", action="store_true",
                       help="decide without the allowlisted devices (no state to read)")

    devices_cli.add_parser(sub)

    migrate = sub.add_parser("migrate", help="copy a single box's SQLite state into the shared "
                                             "PostgreSQL store of --config")
    migrate.add_argument("--from-sqlite", required=True, metavar="DIR",
                         help="the state folder holding tiktokguard.sqlite3")
    migrate.add_argument("--config", required=True,
                         help="the TOML config whose [store] names the PostgreSQL database")
    return parser


def _fail(message: str) -> int:
    print(f"tiktokguard: {message}", file=sys.stderr)
    return EXIT_USAGE


def _default_client(config: Config) -> str:
    if not config.policy.managed_networks:
        return "127.0.0.1"
    network = config.policy.managed_networks[0]
    return str(network.network_address + (1 if network.num_addresses > 1 else 0))


class MissingState(Exception):
    pass


def _stored_devices(config: Config) -> DeviceIndex:
    """The allowlisted devices in the store, so that `check` decides as the daemon does (a
    shared store that cannot be reached: the devices as last known on this machine)."""
    from tiktokguard.daemon import DB_FILE, SNAPSHOT_FILE
    from tiktokguard.devices.model import DeviceRecord
    from tiktokguard.devices.store import SqliteStore, StoreUnavailable

    if config.store.backend == "postgres":
        from tiktokguard.devices.pgstore import PostgresStore, read_password

        async def shared() -> list[Device]:
            store = await PostgresStore.open(config.store.dsn,
                                             read_password(config.store.password_file),
                                             config.store.instance)
            try:
                return [record.to_device() for record in await store.load_devices()]
            finally:
                await store.close()
        try:
            return DeviceIndex(asyncio.run(shared()))
        except StoreUnavailable:
            import json

            try:
                data = json.loads((config.state.dir / SNAPSHOT_FILE).read_text())
                return DeviceIndex(DeviceRecord.from_json(d).to_device()
                                   for d in data["devices"])
            except (OSError, ValueError, KeyError, TypeError):
                return DeviceIndex()

    path = config.state.dir / DB_FILE
    if not path.is_file():
        raise MissingState(f"no state database at {path}: the allowlisted devices are unknown, "
                           "so the answer could be wrong; give --state-dir (or the daemon's "
                           "--config), or --without-devices")

    async def load() -> list[Device]:
        store = await SqliteStore.open(path)
        try:
            return [record.to_device() for record in await store.load_devices()]
        finally:
            await store.close()

    return DeviceIndex(asyncio.run(load()))


def cmd_check(args: argparse.Namespace) -> int:
    from tiktokguard.core import build_engine

    try:
        config = load_config(args.config, Overrides(state_dir=args.state_dir))
        devices = DeviceIndex() if args.without_devices else _stored_devices(config)
        engine = build_engine(config, devices)
    except (ConfigError, ListError, MissingState) as exc:
        return _fail(str(exc))
    client = args.client or _default_client(config)
    try:
        ipaddress.ip_address(client)
    except ValueError:
        return _fail(f"--client: {client!r} is not an IP address")
    try:
        decision = engine.decide_text(client, args.name, time.time())
    except ValueError as exc:
        return _fail(f"invalid name {args.name!r}: {exc}")
    print(f"{decision.verdict}\tclient={client} ({decision.client_class.value})"
          f"\trule={decision.rule or '-'}"
          + (f"\texception={decision.exception}" if decision.exception else ""))
    blocked = decision.verdict in (Verdict.BLOCKED, Verdict.REFUSED)
    return EXIT_BLOCKED if blocked else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from tiktokguard import logs
    from tiktokguard.daemon import Daemon
    from tiktokguard.devices.store import SchemaTooNew, StoreUnavailable

    overrides = Overrides(dns_listen=tuple(args.dns_listen), http_listen=args.http_listen,
                          upstreams=tuple(args.upstream), state_dir=args.state_dir)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        return _fail(str(exc))
    logs.configure(json={"auto": None, "json": True, "console": False}[args.log_format])
    try:
        daemon = Daemon(config, overrides)
    except ListError as exc:
        return _fail(str(exc))
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(daemon.run())
    except OSError as exc:
        message = str(exc.strerror or exc)
        if exc.filename:  # a file-system error names its path
            message = f"{exc.filename}: {message}"
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            # At boot the address may not be up yet, or the old process not gone: systemd
            # tries again (exit 1 is not in RestartPreventExitStatus).
            print(f"tiktokguard: {message}", file=sys.stderr)
            return EXIT_RETRY
        return _fail(message)
    except (SchemaTooNew, StoreUnavailable) as exc:
        # One line, and an exit status systemd does not restart: a newer database, or a
        # password file that cannot be read (a database that is down does not stop the start).
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tiktokguard.daemon import DB_FILE, in_use
    from tiktokguard.devices.store import StoreUnavailable

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    if config.store.backend != "postgres":
        return _fail(f"{config.source}: [store] backend: migrate copies into \"postgres\"")
    from tiktokguard.devices.migrate import MigrateError, copy_sqlite
    from tiktokguard.devices.pgstore import PostgresStore, read_password

    if in_use(Path(args.from_sqlite)):
        print(f"tiktokguard: warning: a running tiktokguard uses {args.from_sqlite}: this "
              "copies its state as it is now, and what it changes afterwards stays behind. "
              "Stop it first (systemctl stop tiktokguard), then migrate.", file=sys.stderr)

    async def run() -> dict[str, int]:
        store = await PostgresStore.open(config.store.dsn,
                                         read_password(config.store.password_file),
                                         config.store.instance)
        try:
            return await copy_sqlite(Path(args.from_sqlite) / DB_FILE, store)
        finally:
            await store.close()

    try:
        counts = asyncio.run(run())
    except (MigrateError, StoreUnavailable) as exc:
        return _fail(str(exc))
    print("copied: " + ", ".join(f"{n} {table}" for table, n in counts.items()))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    try:
        if args.command == "migrate":
            code = cmd_migrate(args)
        elif args.command in devices_cli.COMMANDS:
            code = devices_cli.run(args)
        else:
            code = cmd_check(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`tiktokguard devices list | head -1`): end quietly, as other
        # Unix tools do. stdout goes to /dev/null so that the flush at exit does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
