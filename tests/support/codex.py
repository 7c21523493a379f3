"""The real Codex CLI for the tests: where it is, and a throwaway home pointed at the mock model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mock-model"


def codex_binary() -> str:
    """The pinned codex the project's setup installs (`npm ci` -> node_modules), or CODEX_BIN."""
    explicit = os.environ.get("CODEX_BIN")
    if explicit:
        return explicit
    local = ROOT / "node_modules" / ".bin" / "codex"
    if not local.exists():
        raise RuntimeError("codex is not installed: run `npm ci` in the project (./dev test does it)")
    return str(local)


def _catalog(binary: str, home: Path) -> Path:
    """The bundled model catalog with one entry renamed to the mock model. With metadata for the
    model, codex offers `apply_patch` (file changes) and stops warning on every turn."""
    out = subprocess.run([binary, "debug", "models"], env={**os.environ, "CODEX_HOME": str(home)},
                         capture_output=True, text=True, check=True, timeout=60)
    models = json.loads(out.stdout)["models"]
    entry = next((m for m in models if m.get("apply_patch_tool_type") == "freeform"), models[0])
    entry = dict(entry, slug=MODEL, display_name="Mock", base_instructions="You are a test model.",
                 supported_reasoning_levels=[], upgrade=None, support_verbosity=False,
                 include_skills_usage_instructions=False, include_plugin_usage_instructions=False,
                 include_apps_usage_instructions=False, apply_patch_tool_type="freeform")
    path = home / "mock_model_catalog.json"
    path.write_text(json.dumps({"models": [entry]}))
    return path


def codex_home(tmp: Path, base_url: str) -> tuple[Path, list[str]]:
    """A CODEX_HOME under `tmp` and the `-c` overrides that point codex at the mock model, offline."""
    home = tmp / "codex-home"
    home.mkdir(parents=True, exist_ok=True)
    catalog = _catalog(codex_binary(), home)
    overrides = [
        'model_provider="mock"',
        f'model="{MODEL}"',
        'model_providers.mock.name="Mock"',
        f'model_providers.mock.base_url="{base_url}"',
        'model_providers.mock.wire_api="responses"',
        'model_providers.mock.requires_openai_auth=false',
        'model_providers.mock.request_max_retries=0',
        'model_providers.mock.stream_max_retries=0',
        'model_providers.mock.stream_idle_timeout_ms=20000',
        'features.plugins=false',
        'features.unbounded_connection_retries=false',
        f'model_catalog_json="{catalog}"',
    ]
    return home, overrides


def codex_env(home: Path) -> dict[str, str]:
    """The environment codex runs in: a clean HOME (no login profile noise), no real API keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_", "BRIDGE_"))}
    fake_home = home / "user-home"
    fake_home.mkdir(exist_ok=True)
    env.update(CODEX_HOME=str(home), HOME=str(fake_home))
    return env
