"""Slack events benchmark (on demand only; never run in CI). Results: docs/benchmarks.md.

Compares, in alternating runs on the same machine (unpinned by default: the service's edge
worker takes the second core; `--server-cpu` pins each server to one core):

- bridge: the real service with Slack on (HTTP mode) handling `POST /slack/events`: v0
  signature and window, normalization and the inbox insert committed before the 200. Each event
  is a DM that only mentions the bot: stored like any other, but closed on arrival (nothing to run: no runtime,
  no reply), so the figure is the ack path. Reactions are off.
- sdk: slack_bolt's AsyncApp in aiohttp (bench/slack_bolt_server.py) with a listener that only
  acks; nothing is stored. Needs `pip install slack_bolt` (not a dependency of agent-bridge).

Every request is a distinct, freshly signed event (wrk replays a file of them). After each
bridge run the inbox is counted: every 200 must have its row.

    python -m bench.slack_events                 # 3 reps x 10 s each
    python -m bench.slack_events --reps 1 --duration 3

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
from tests.support import slack_payloads as sp
from tests.support.slack_emulator import SlackEmulator

SECRET = "bench-signing-secret"
BOT = "UBOT"
HEADERS = ("X-Slack-Request-Timestamp", "X-Slack-Signature", "-")


def write_requests(path: Path, count: int, prefix: str = "") -> None:
    """`count` distinct signed events for the Lua driver; a `prefix` (the warm-up's) moves the
    messages' ts to another range, since Slack dedupes on channel + ts."""
    base = 1_600_000_000 if prefix else 1_700_000_000
    with path.open("w") as out:
        for n in range(count):
            event = sp.message_event(text=f"<@{BOT}>", channel=f"D{n % 1000}", channel_type="im", user="UBENCH",
                                     ts=f"{base + n}.{n % 1_000_000:06d}")
            body = json.dumps(sp.event_callback(event, event_id=f"Ev{uuid.uuid4().hex}")).encode()
            out.write(request_lines(sp.signed_request(body, signing_secret=SECRET), HEADERS, body))


def bolt_process(api_url: str):
    def start(work: Path, cpu: int | None) -> ServerProcess:
        port = free_port()
        return ServerProcess(
            [sys.executable, "-m", "bench.slack_bolt_server", "--port", str(port), "--signing-secret", SECRET,
             "--api-url", api_url],
            port=port, health_path="/healthz", log_path=work / f"bolt-{port}.log", cwd=work,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HTTPS_PROXY": "", "HTTP_PROXY": ""}, cpu=cpu)

    return start


def main() -> None:
    args = parser(__doc__).parse_args()
    emulator = SlackEmulator(bot_token="xoxb-test", bot_user_id=BOT).start()
    emulator.seed_user("UBENCH", "bench")
    env = {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": emulator.api_url,
           "SLACK_REACTIONS": "false", "HTTPS_PROXY": "", "HTTP_PROXY": ""}
    hook = Webhook("/slack/events", HEADERS, write_requests, bolt_process(emulator.api_url), env)
    try:
        summary = compare(hook, args, Path(tempfile.mkdtemp(prefix="bench-slack-")))
    finally:
        emulator.stop()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
