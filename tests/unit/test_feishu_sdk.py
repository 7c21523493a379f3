"""channels/feishu/sdk.py: lark-oapi loads only the APIs the channel uses, and stays whole for
code that wants all of it. Each case runs in a fresh interpreter (an import is once per process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_channel_loads_messaging_and_contacts_only():
    out = run("""
        import sys
        from channels.feishu.api import FeishuApi
        api = FeishuApi(app_id="cli_a", app_secret="s", domain="http://127.0.0.1:9")
        assert callable(api.client.im.message.acreate) and callable(api.client.contact.user.aget)
        assert api.client.config.enable_set_token and api.client.config.app_id == "cli_a"
        loaded = [m for m in sys.modules if m.startswith("lark_oapi")]
        assert "lark_oapi.client" not in sys.modules
        assert not [m for m in loaded if m.startswith(("lark_oapi.api.hire", "lark_oapi.api.corehr"))]
        print(len(loaded))
    """)
    assert int(out) < 1500  # the whole package is about 10,000 modules


def test_the_whole_package_is_still_there_on_first_use():
    run("""
        import channels.feishu.sdk
        import lark_oapi as lark
        client = lark.Client.builder().app_id("cli_a").app_secret("s").build()
        assert callable(client.im.v1.message.acreate) and callable(client.hire.v1.job.aget)
        assert lark.EventDispatcherHandler and lark.ws.Client and lark.JSON
        from lark_oapi.api.im.v1 import *  # noqa: F403
        assert CreateMessageRequest  # noqa: F405
        try:
            lark.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("a missing name must raise AttributeError")
    """)


def test_a_process_that_already_imported_the_package_keeps_it():
    run("""
        import sys
        import lark_oapi
        import channels.feishu.sdk as sdk
        assert not [f for f in sys.meta_path if type(f).__name__ == "_DeferringFinder"]
        api = sdk.OpenApi(app_id="cli_a", app_secret="s", domain="http://127.0.0.1:9", timeout=1)
        assert api.im.message is not None and "lark_oapi.client" in sys.modules
    """)


def test_the_long_connection_client_loads_without_every_api():
    run("""
        import sys
        from channels.feishu.sdk import LogLevel
        import lark_oapi.ws.client as ws
        assert ws.Client and LogLevel.WARNING
        assert "lark_oapi.client" not in sys.modules
    """)
