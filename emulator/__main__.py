"""Command line: ``python -m emulator serve|seed``."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path


def _loopback_only(host: str) -> str:
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--host {host!r} does not resolve: {exc}") from None
    if not addr.is_loopback:
        raise SystemExit(f"--host {host!r} is not a loopback address: the emulator only listens on this machine")
    return host


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .app import create_app
    from .profiles import get_profile
    from .state import Org

    host = _loopback_only(args.host)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, args.port))  # port 0 picks a free port; connection.json names the real one
    port = sock.getsockname()[1]
    org = Org(Path(args.data_dir), get_profile(args.profile, args.time_scale), host=host, port=port)
    path = org.write_connection_file()
    print(f"emulator: {org.instance_url} profile={org.profile.name} connection file {path}", flush=True)
    config = uvicorn.Config(create_app(org), ssl_certfile=str(org.tls.server_cert), ssl_keyfile=str(org.tls.server_key),
                            log_level=args.log_level, access_log=False, lifespan="on", timeout_keep_alive=75,
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


def seed(args: argparse.Namespace) -> None:
    from .seed import seed_org

    summary = seed_org(Path(args.data_dir), records=args.records, accounts=args.accounts,
                       random_seed=args.random_seed, bad_rows=args.bad_rows, null_keys=args.null_keys)
    for key, value in summary.items():
        print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emulator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the org over HTTPS")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--profile", default="instant", choices=["instant", "realistic"])
    p.add_argument("--time-scale", type=float, default=1.0, help="divide every modelled duration by this factor")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=serve)
    s = sub.add_parser("seed", help="fill the org and its Data Cloud DMO with deterministic data")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--records", type=int, required=True)
    s.add_argument("--accounts", type=int, default=None, help="default: records / 40, at least 10")
    s.add_argument("--random-seed", type=int, default=42)
    s.add_argument("--bad-rows", type=int, default=0)
    s.add_argument("--null-keys", type=int, default=0, help="rows whose ExternalId__c is NULL (otherwise valid)")
    s.set_defaults(func=seed)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
