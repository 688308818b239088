"""``python -m bot.emulator --port 8081``: run the emulator standalone until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from .server import Emulator


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bot.emulator",
                                 description="Local Telegram Bot API emulator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--spec", default=None, help="path to api.json (default: auto-detect)")
    ap.add_argument("--username", default="hopnhat_bot", help="bot username for getMe")
    ap.add_argument("--token", default=None, help="pre-register this bot token")
    ap.add_argument("--privacy-mode", action="store_true",
                    help="hide non-command group messages, like Telegram's default")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    emu = Emulator(spec_path=args.spec, bot_username=args.username, bot_token=args.token,
                   privacy_mode=args.privacy_mode)
    url = await emu.start(host=args.host, port=args.port)
    print(f"Bot API emulator on {url} (control API under {url}/_emulator/)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await emu.stop()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
