"""``bedrock-emulator``: run the Bedrock Runtime emulator as its own process.

Prints one line per region (``us-east-1 https://localhost:9001``), then the CA path and the
accepted credentials, and serves until Ctrl-C. Benchmarks and the README demo drive it through the
``/_emulator/`` control API on any region port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping

from .server import DEMO_ACCESS_KEY_ID, DEMO_SECRET_ACCESS_KEY, Emulator


def _credential_pair(text: str) -> tuple[str, str]:
    access_key_id, sep, secret = text.partition(":")
    if not sep or not access_key_id or not secret:
        raise argparse.ArgumentTypeError("expected ACCESS_KEY_ID:SECRET")
    return access_key_id, secret


def _bearer_token(text: str) -> tuple[str, str | None]:
    token, _, region = text.partition("@")
    return token, region or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bedrock-emulator",
        description="Emulate Amazon Bedrock Runtime (one port per region) for tests and demos.",
    )
    parser.add_argument("--regions", default="us-east-1,us-west-2", help="comma-separated regions")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a generated test CA")
    parser.add_argument(
        "--port", type=int, default=0, help="first region's port; the next regions use +1, +2 (0: free ports)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--credentials",
        action="append",
        type=_credential_pair,
        default=[],
        metavar="AKID:SECRET",
        help="accepted key pair (repeatable); the demo pair is always accepted",
    )
    parser.add_argument(
        "--bearer-token",
        action="append",
        type=_bearer_token,
        default=[],
        metavar="TOKEN[@REGION]",
        help="accepted Bedrock API key, optionally for one region only (repeatable)",
    )
    parser.add_argument("--cert-dir", default=None, help="where the test CA and server certificate live")
    parser.add_argument("--clock-skew", type=float, default=300, help="accepted clock skew in seconds")
    parser.add_argument("--fast", action="store_true", help="no per-event delay in streams")
    parser.add_argument(
        "--stamp-events", action="store_true",
        help="put each stream event's send time (monotonic ns) in its padding field p, for benchmarks",
    )
    parser.add_argument(
        "--record-limit", type=int, default=10000, help="requests kept for /_emulator/requests (0: all)"
    )
    return parser


def accepted_credentials(pairs: list[tuple[str, str]], environ: Mapping[str, str]) -> dict[str, str]:
    """The demo pair, the environment's pair when no --credentials were given, and the given ones."""
    credentials = {DEMO_ACCESS_KEY_ID: DEMO_SECRET_ACCESS_KEY}
    if not pairs and environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        credentials[environ["AWS_ACCESS_KEY_ID"]] = environ["AWS_SECRET_ACCESS_KEY"]
    credentials.update(pairs)
    return credentials


@contextlib.contextmanager
def _signals_blocked(signals: set[signal.Signals]) -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):  # Windows: signals always go to the main thread
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    regions = [region.strip() for region in args.regions.split(",") if region.strip()]
    credentials = accepted_credentials(args.credentials, os.environ)
    emulator = Emulator(
        regions=regions,
        tls=args.tls,
        credentials=credentials,
        bearer_tokens=dict(args.bearer_token),
        host=args.host,
        cert_dir=args.cert_dir,
        clock_skew_s=args.clock_skew,
        fast=args.fast,
        stamp_events=args.stamp_events,
        port=args.port,
        record_limit=args.record_limit or None,
    )
    stopping = threading.Event()
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Handlers for both: a SIGINT ignored by a non-interactive parent shell must still stop us.
    for stop_signal in stop_signals:
        signal.signal(stop_signal, lambda *_: stopping.set())
    # The server thread inherits a mask that blocks them, so they reach the waiting main thread.
    with _signals_blocked(stop_signals):
        emulator.start()
    for region in regions:
        print(f"{region} {emulator.endpoint_url(region)}")
    if emulator.ca_path:
        print(f"CA {emulator.ca_path}")
    print(f"demo credentials {DEMO_ACCESS_KEY_ID} {DEMO_SECRET_ACCESS_KEY}")
    print("accepted access keys: " + ", ".join(sorted(credentials)))
    sys.stdout.flush()
    try:
        while not stopping.wait(3600):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
