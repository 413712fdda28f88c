#!/usr/bin/env python3
"""A socketcand client made of python-can's socketcand interface, for the end-to-end tests.

Run it with the interpreter of the virtualenv `cargo xtask vm-test` prepares
(target/python-can-venv/bin/python, pinned in requirements-python-can.txt beside this script).

    socketcand_client.py recv --host H --port P --channel C --count N --timeout S [--send FRAME ...]
        connects (the handshake: hi, open C, rawmode), prints `ready`, sends the --send frames,
        then prints the frames it receives, one `ID#DATA` line each, until N have arrived (exit 0)
        or S seconds have passed (exit 3, after printing those that did arrive).
    socketcand_client.py send --host H --port P --channel C [--linger S] FRAME...
        connects, sends the frames in order, waits S seconds (default 0.5) so the server reads
        them before the connection closes, and prints `sent N`.

Frames are written as candump writes them: `123#DEADBEEF` (standard id, 3 hex digits),
`1ABCDEF0#01` (extended id, 8 hex digits), `123#` (no data); classic CAN only, up to 8 bytes.
Exit status: 0 done, 1 connection or protocol failure, 2 bad arguments, 3 recv timed out.
"""
import argparse
import logging
import string
import sys
import time

import can

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

HEX = set(string.hexdigits)


class Once(logging.Filter):
    """Lets each distinct message through once: python-can retries a refused connection in a tight
    loop for 10 s and warns on every attempt."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def parse_frame(text: str) -> can.Message:
    """`ID#DATA` -> a classic CAN data frame; raises ValueError naming what is wrong."""
    ident, sep, data = text.partition("#")
    if not sep:
        raise ValueError(f"frame {text!r}: no '#' (write ID#DATA, e.g. 123#DEADBEEF)")
    if not ident or not set(ident) <= HEX:
        raise ValueError(f"frame {text!r}: id {ident!r} is not hexadecimal")
    if len(ident) == 3:
        extended, limit = False, 0x7FF
    elif len(ident) == 8:
        extended, limit = True, 0x1FFFFFFF
    else:
        raise ValueError(
            f"frame {text!r}: id {ident!r} must have 3 hex digits (standard) or 8 (extended)"
        )
    arbitration_id = int(ident, 16)
    if arbitration_id > limit:
        raise ValueError(f"frame {text!r}: id {ident!r} exceeds {limit:X}")
    if not set(data) <= HEX or len(data) % 2:
        raise ValueError(f"frame {text!r}: data {data!r} is not whole bytes of hex digits")
    payload = bytes.fromhex(data)
    if len(payload) > 8:
        raise ValueError(f"frame {text!r}: {len(payload)} data bytes, at most 8")
    return can.Message(arbitration_id=arbitration_id, is_extended_id=extended, data=payload)


def format_frame(msg: can.Message) -> str:
    ident = f"{msg.arbitration_id:08X}" if msg.is_extended_id else f"{msg.arbitration_id:03X}"
    return f"{ident}#{bytes(msg.data).hex().upper()}"


def emit(line: str) -> None:
    print(line, flush=True)


def connect(args: argparse.Namespace) -> can.BusABC:
    # Returns once the handshake is done: python-can expects `< hi >`, sends `< open C >` and
    # `< rawmode >` and expects `< ok >` to each.
    return can.Bus(interface="socketcand", host=args.host, port=args.port, channel=args.channel)


def recv(args: argparse.Namespace, frames: list) -> int:
    bus = connect(args)
    try:
        emit("ready")
        for msg in frames:
            bus.send(msg)
        received = 0
        deadline = time.monotonic() + args.timeout
        while received < args.count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            msg = bus.recv(timeout=remaining)
            if msg is None:
                continue
            emit(format_frame(msg))
            received += 1
    finally:
        bus.shutdown()
    if received < args.count:
        print(
            f"socketcand_client: {received} of {args.count} frames in {args.timeout} s",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    return 0


def send(args: argparse.Namespace, frames: list) -> int:
    bus = connect(args)
    try:
        for msg in frames:
            bus.send(msg)
        time.sleep(args.linger)
    finally:
        bus.shutdown()
    emit(f"sent {len(frames)}")
    return 0


def non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} is negative")
        return value

    parse.__name__ = kind.__name__
    return parse


def port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 done, 1 connection or protocol failure, 2 bad arguments, "
        "3 recv timed out.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", required=True, help="socketcand server address")
        sub.add_argument("--port", required=True, type=port, help="socketcand server port")
        sub.add_argument("--channel", required=True, help="the bus to open, e.g. can0")

    r = commands.add_parser("recv", help="print received frames until --count or --timeout")
    common(r)
    r.add_argument("--count", required=True, type=non_negative(int), help="frames to wait for")
    r.add_argument(
        "--timeout", required=True, type=non_negative(float), help="seconds to wait for them"
    )
    r.add_argument(
        "--send", action="append", default=[], metavar="FRAME",
        help="a frame (ID#HEX) to send after `ready`, before receiving; repeatable",
    )

    s = commands.add_parser("send", help="send frames in order")
    common(s)
    s.add_argument(
        "--linger", type=non_negative(float), default=0.5,
        help="seconds to wait after sending, before closing (default 0.5)",
    )
    s.add_argument("frames", nargs="+", metavar="FRAME", help="ID#HEX, e.g. 123#DEADBEEF")

    args = parser.parse_args()
    logging.getLogger("can.interfaces.socketcand.socketcand").addFilter(Once())
    try:
        frames = [parse_frame(f) for f in (args.send if args.command == "recv" else args.frames)]
    except ValueError as err:
        parser.error(str(err))  # exits with status 2

    try:
        return recv(args, frames) if args.command == "recv" else send(args, frames)
    except (OSError, can.CanError) as err:
        # Refused or dropped connections, and handshakes that went wrong (python-can raises
        # TimeoutError, an OSError, when it could not connect for 10 s).
        print(f"socketcand_client: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
