"""lark-oapi, loaded by the parts this channel uses.

The package's `__init__` imports every API of the platform (60 services, ~10,000 modules): about
140 MB and 2-5 s, whatever the caller needs. Here a finder on `sys.meta_path` defers the body of
`lark_oapi/__init__.py` and of every package under `lark_oapi.api` until a name the package itself
defines is first looked up (PEP 562's module `__getattr__`). Importing a submodule does not run
its parent package's body any more, so `lark_oapi.api.im.v1` brings only the messaging API and its
models (~10 MB, 0.2 s).

Nothing changes for code that wants the whole package: `import lark_oapi as lark; lark.Client`
runs the deferred body on that first lookup, and everything is there. The finder is installed
only while `lark_oapi` is not yet imported; a process that already holds the whole package keeps
it.

`OpenApi` stands in for `lark.Client`, whose builder constructs every service: it holds the same
`Config` and the two API versions this channel calls (im v1, contact v3), plus a raw request.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

ROOT = "lark_oapi"
DEFERRED = (ROOT, ROOT + ".api")  # these packages, and every package below the second
_lock = threading.RLock()


def _deferred(name: str) -> bool:
    return name == DEFERRED[0] or name == DEFERRED[1] or name.startswith(DEFERRED[1] + ".")


class _DeferredBody(importlib.abc.Loader):
    """Creates the package as its own loader would, and runs its body on first need."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, get_data, ...
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        loader = self.loader
        state = {"ran": False}

        def __getattr__(attr: str) -> Any:
            with _lock:
                if not state["ran"]:
                    state["ran"] = True
                    try:
                        loader.exec_module(module)
                    finally:
                        if module.__dict__.get("__getattr__") is __getattr__:
                            del module.__dict__["__getattr__"]
            try:
                return module.__dict__[attr]
            except KeyError:
                raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}") from None

        module.__getattr__ = __getattr__  # type: ignore[method-assign]


class _DeferringFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not _deferred(name):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.submodule_search_locations is None or spec.loader is None:
            return spec  # a plain module is imported as usual
        spec.loader = _DeferredBody(spec.loader)
        return spec


def _install() -> None:
    with _lock:
        if ROOT in sys.modules or any(isinstance(f, _DeferringFinder) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _DeferringFinder())


_install()

# Below: what this channel uses. Each import brings its own modules and no others.
from lark_oapi.api.contact.v3 import GetUserRequest  # noqa: E402
from lark_oapi.api.contact.v3.version import V3 as ContactV3  # noqa: E402
from lark_oapi.api.im.v1 import (  # noqa: E402
    CreateMessageReactionRequest,
    CreateMessageReactionRequestBody,
    CreateMessageRequest,
    CreateMessageRequestBody,
    DeleteMessageReactionRequest,
    Emoji,
    GetMessageResourceRequest,
    ListMessageReactionRequest,
    PatchMessageRequest,
    PatchMessageRequestBody,
    ReplyMessageRequest,
    ReplyMessageRequestBody,
)
from lark_oapi.api.im.v1.version import V1 as ImV1  # noqa: E402
from lark_oapi.core.enum import AccessTokenType, HttpMethod, LogLevel  # noqa: E402
from lark_oapi.core.http import Transport  # noqa: E402
from lark_oapi.core.log import logger as sdk_logger  # noqa: E402
from lark_oapi.core.model import BaseRequest, BaseResponse, Config, RequestOption  # noqa: E402
from lark_oapi.core.token.auth import verify  # noqa: E402
from lark_oapi.core.token.manager import TokenManager  # noqa: E402

__all__ = [
    "AccessTokenType", "BaseRequest", "CreateMessageReactionRequest", "CreateMessageReactionRequestBody",
    "CreateMessageRequest", "CreateMessageRequestBody", "DeleteMessageReactionRequest", "Emoji",
    "GetMessageResourceRequest", "GetUserRequest", "HttpMethod", "ListMessageReactionRequest", "LogLevel", "OpenApi",
    "PatchMessageRequest",
    "PatchMessageRequestBody", "ReplyMessageRequest", "ReplyMessageRequestBody", "RequestOption", "TokenManager",
]


class OpenApi:
    """One app's `Config` and the API versions the channel calls on it (`lark.Client`'s job,
    without constructing the platform's other 58 services)."""

    def __init__(self, *, app_id: str, app_secret: str, domain: str, timeout: float,
                 log_level: LogLevel = LogLevel.ERROR) -> None:
        config = Config()
        config.app_id = app_id
        config.app_secret = app_secret
        config.domain = domain  # validated by the settings (https, or http on loopback only)
        config.timeout = timeout
        config.enable_set_token = True  # the token goes with each call; see channels/feishu/api.py
        config.log_level = log_level
        sdk_logger.setLevel(int(log_level.value))
        self.config = config
        self.im = ImV1(config)
        self.contact = ContactV3(config)

    async def arequest(self, request: BaseRequest, option: RequestOption) -> BaseResponse:
        """A request with no typed resource in the SDK; the answer's body is left unparsed in
        `.raw` (`code` stays None)."""
        verify(self.config, request, option)
        response = BaseResponse()
        response.raw = await Transport.aexecute(self.config, request, option)
        return response
