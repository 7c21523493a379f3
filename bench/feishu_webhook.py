"""Feishu webhook benchmark (on demand only; never run in CI). Results: docs/benchmarks.md.

Compares, in alternating runs on the same machine (unpinned by default: the service's edge
worker takes the second core; `--server-cpu` pins each server to one core):

- bridge: the real service with Feishu on (webhook, encrypt key and token set) handling
  `POST /feishu/events`: signature, timestamp window, decryption, token, normalization and the
  inbox insert committed before the 200 (group commit). Each event is a direct message that only
  @mentions the bot: stored like any other, but closed on arrival (nothing to run: no runtime, no reply), so
  the figure is the ack path, as in the SDK baseline. Reactions are off.
- sdk: lark-oapi's EventDispatcherHandler in an aiohttp app (bench/feishu_sdk_server.py):
  token, signature, decryption and dispatch to a handler that does nothing; nothing is stored.

Every request is a distinct, freshly signed and encrypted event (wrk replays a file of them).
After each bridge run the inbox is counted: every 200 must have its row.
Also measured: the bridge's start-up time and idle RSS with Feishu enabled.

    python -m bench.feishu_webhook                 # 3 reps x 10 s each
    python -m bench.feishu_webhook --reps 1 --duration 3

Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

from bench.launcher import ROOT, ServerProcess, free_port
from bench.webhooks import Webhook, compare, parser, request_lines
from tests.support import feishu_payloads as fp
from tests.support.feishu_emulator import FeishuEmulator

TOKEN = "bench-token"
KEY = "bench-encrypt-key"
BOT = "ou_bot"
HEADERS = ("X-Lark-Request-Timestamp", "X-Lark-Request-Nonce", "X-Lark-Signature")


def write_requests(path: Path, count: int, prefix: str = "") -> None:
    """`count` distinct signed, encrypted events for the Lua driver (event and message ids are
    random, so files written with any `prefix` never collide)."""
    mention = [fp.mention("@_user_1", BOT, "Bot")]
    with path.open("w") as out:
        for n in range(count):
            event = fp.message_event(token=TOKEN, text="@_user_1", chat_id=f"oc_b{n % 1000}", chat_type="p2p",
                                     mentions=mention, sender_open_id="ou_bench")
            headers, body = fp.webhook_request(event, encrypt_key=KEY, nonce=uuid.uuid4().hex[:16])
            out.write(request_lines(headers, HEADERS, body))


def sdk_process(work: Path, cpu: int | None) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        [sys.executable, "-m", "bench.feishu_sdk_server", "--port", str(port), "--encrypt-key", KEY, "--token", TOKEN],
        port=port, health_path="/healthz", log_path=work / f"sdk-{port}.log", cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cpu=cpu)


def main() -> None:
    args = parser(__doc__).parse_args()
    emulator = FeishuEmulator(app_id=f"cli_bench{uuid.uuid4().hex[:6]}", app_secret="secret", bot_open_id=BOT).start()
    env = {"FEISHU_APP_ID": emulator.app_id, "FEISHU_APP_SECRET": "secret", "FEISHU_VERIFICATION_TOKEN": TOKEN,
           "FEISHU_ENCRYPT_KEY": KEY, "FEISHU_DOMAIN": emulator.url, "FEISHU_REACTIONS": "false"}
    hook = Webhook("/feishu/events", HEADERS, write_requests, sdk_process, env)
    try:
        summary = compare(hook, args, Path(tempfile.mkdtemp(prefix="bench-feishu-")))
    finally:
        emulator.stop()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
