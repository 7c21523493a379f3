"""The session commands: `/new`, `/sessions`, `/switch`, `/resume`, `/cwd`, `/model`, `/mode`.

A conversation holds named sessions, one active; each keeps its runtime thread, workspace and
settings, so switching back returns to the same agent context. Binding an existing runtime thread
(`/resume`) or a workspace (`/cwd`) and the `trusted` mode are for admins; `/cwd` only binds
inside the allowed roots.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from bridge import presenter
from bridge.pipeline.sessions import SessionResolver
from bridge.store import conversations
from bridge.store.db import Database
from channels.base import ConversationKey, Reply

MODES = ("strict", "default", "trusted")


class SessionCommands:
    def __init__(self, db: Database, sessions: SessionResolver, *, is_admin: Callable[[str, str], bool],
                 allowed_roots: list[Path], busy: Callable[[str], bool]) -> None:
        self.db = db
        self.sessions = sessions
        self.is_admin = is_admin
        self.allowed_roots = [root.resolve() for root in allowed_roots]
        self.busy = busy

    async def handle(self, name: str, args: str, key: str, user: str, *, is_group: bool) -> Reply:
        conv = ConversationKey.parse(key)
        admin = self.is_admin(conv.channel, user)
        current = await self.sessions.resolve(key, is_group=is_group)
        if name in ("new", "switch", "resume") and self.busy(key):
            return presenter.busy_for(name)
        if name == "new":
            return await self._new(key, current, args.strip() or None)
        if name == "sessions":
            return await self._list(current)
        if name == "switch":
            return await self._switch(key, current, args.strip())
        if name == "resume":
            if not admin:
                return presenter.admins_only("/resume")
            return await self._resume(key, current, args.strip())
        if name == "cwd":
            if not args.strip():
                return Reply(text=f"Workspace: `{current.workspace}`")
            if not admin:
                return presenter.admins_only("/cwd")
            return await self._cwd(key, current, args.strip())
        if name == "model":
            return await self._setting(key, current, "model", args.strip() or None)
        if name == "mode":
            mode = args.strip().lower()
            if not mode:
                return Reply(text=f"Approval mode: `{current.settings.get('mode', 'default')}`")
            if mode not in MODES:
                return Reply(text="Usage: `/mode strict|default|trusted`")
            if mode == "trusted" and not admin:
                return presenter.admins_only("/mode trusted")
            return await self._setting(key, current, "mode", mode)
        raise ValueError(name)

    async def _new(self, key: str, current: conversations.SessionRef, name: str | None) -> Reply:
        async def _create(conn):
            return await conversations.new_session(conn, current.conversation_id, name=name,
                                                   runtime=self.sessions.runtime, workspace=current.workspace)

        try:
            session = await self.db.write(_create)
        except ValueError as exc:
            return Reply(text=f"Not created: {exc}.")
        self.sessions.forget(key)
        return Reply(text=f"🆕 New session `{session.name}` (the previous one, `{current.name}`, is kept: "
                          f"`/switch {current.name}` returns to it).")

    async def _list(self, current: conversations.SessionRef) -> Reply:
        rows = await self.db.read(lambda c: conversations.list_sessions(c, current.conversation_id, archived=True))
        return presenter.session_list(rows, active_id=current.session_id)

    async def _switch(self, key: str, current: conversations.SessionRef, target: str) -> Reply:
        if not target:
            return Reply(text="Usage: `/switch <name or number>` (see `/sessions`).")
        rows = await self.db.read(lambda c: conversations.list_sessions(c, current.conversation_id, archived=True))
        chosen = None
        if target.isdigit() and 1 <= int(target) <= len(rows):
            chosen = rows[int(target) - 1]
            if chosen.status == "archived":
                return Reply(text=f"Session {target} (`{chosen.name}`) is archived; `/sessions` lists the others.")
        else:
            chosen = next((r for r in rows if r.name == target and r.status != "archived"), None)
        if chosen is None:
            return Reply(text=f"No session `{target}` here; `/sessions` lists them.")
        if chosen.id == current.session_id:
            return Reply(text=f"Already in session `{chosen.name}`.")
        await self.db.write(lambda c: conversations.activate(c, current.conversation_id, chosen.id))
        self.sessions.forget(key)
        return Reply(text=f"↩️ Switched to session `{chosen.name}`.")

    async def _resume(self, key: str, current: conversations.SessionRef, thread_id: str) -> Reply:
        if not thread_id or len(thread_id) > 200 or any(ch.isspace() for ch in thread_id):
            return Reply(text="Usage: `/resume <runtime thread id>` (e.g. a Codex session id from `codex resume`).")

        async def _create(conn):
            return await conversations.new_session(conn, current.conversation_id, name=None,
                                                   runtime=self.sessions.runtime, workspace=current.workspace,
                                                   runtime_thread_id=thread_id)

        session = await self.db.write(_create)
        self.sessions.forget(key)
        return Reply(text=f"🔗 Session `{session.name}` is bound to thread `{thread_id}`; the next message "
                          "continues it.")

    async def _cwd(self, key: str, current: conversations.SessionRef, path: str) -> Reply:
        target = Path(os.path.expanduser(path))
        if not target.is_absolute():
            target = Path(current.workspace) / target
        target = target.resolve()
        if not any(target == root or root in target.parents for root in self.allowed_roots):
            roots = ", ".join(f"`{r}`" for r in self.allowed_roots)
            return Reply(text=f"Not allowed: `{target}` is outside the allowed roots ({roots}; "
                              "`BRIDGE_ALLOWED_ROOTS`).")
        if not target.is_dir():
            return Reply(text=f"Not a directory: `{target}`.")
        await self.db.write(lambda c: conversations.update_session(c, current.session_id, workspace=str(target)))
        self.sessions.forget(key)
        return Reply(text=f"📁 Workspace of session `{current.name}`: `{target}`.")

    async def _setting(self, key: str, current: conversations.SessionRef, name: str, value: str | None) -> Reply:
        if value is None:
            return Reply(text=f"{name.capitalize()}: `{current.settings.get(name) or 'default'}`")
        settings = dict(current.settings)
        if value == "default":
            settings.pop(name, None)
        else:
            settings[name] = value
        await self.db.write(lambda c: conversations.update_session(c, current.session_id, settings=settings))
        self.sessions.forget(key)
        said = f"{name.capitalize()} of session `{current.name}`: `{value}`."
        if name == "model" and current.runtime == "shell":
            said += " The shell runtime runs no model: it applies when the session's runtime has one (codex)."
        return Reply(text=said)
