"""The store's tables (SQLAlchemy Core). The schema is created only by Alembic migrations in
`migrations/`; a test checks that the migrations and these definitions agree.

Times are epoch seconds (float) so that SQLite and PostgreSQL store them alike.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Every inbound event a channel accepted, persisted before the platform is acknowledged.
# `dedupe_key` makes it unique: the platform's message id when the event carries one (a message
# runs once, whether it is redelivered under its event id or re-sent under a new one), else the
# event id. `event_key` (the event id) is kept for the record, unindexed: one unique key, one
# random index page written per message. Status: accepted -> processing -> done | skipped | failed.
inbound_events = Table(
    "inbound_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("channel", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("event_key", String(255), nullable=False),
    Column("dedupe_key", String(255), nullable=False, unique=True),
    Column("conversation_key", String(255), nullable=False),
    Column("sender_id", String(255), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("status", String(16), nullable=False, default="accepted"),
    Column("reply_ref", String(64), nullable=True),
    Column("received_at", Float, nullable=False),
    Column("processed_at", Float, nullable=True),
    Column("error", Text, nullable=True),
    Index("ix_inbound_events_status_id", "status", "id"),
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(255), nullable=False, unique=True),
    Column("channel", String(32), nullable=False),
    Column("chat_id", String(255), nullable=False),
    Column("thread_id", String(255), nullable=True),
    Column("is_group", Integer, nullable=False, default=0),
    Column("active_session_id", Integer, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("conversation_id", Integer, ForeignKey("conversations.id"), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("runtime", String(32), nullable=False),
    Column("runtime_thread_id", String(255), nullable=True),
    Column("workspace", Text, nullable=False),
    Column("status", String(16), nullable=False, default="active"),
    Column("created_at", Float, nullable=False),
    Column("last_active_at", Float, nullable=False),
    Column("settings", Text, nullable=True),  # JSON: the session's model and approval mode
)

# Every runtime thread a session was bound to (Codex threads): active, or lost (could not be
# resumed) with the reason; `sessions.runtime_thread_id` is the current one.
runtime_threads = Table(
    "runtime_threads",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session_id", Integer, ForeignKey("sessions.id"), nullable=False, index=True),
    Column("runtime", String(32), nullable=False),
    Column("thread_id", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
)

# The turn ledger: one inbound message -> at most one turn -> one final reply.
# Status: running -> completed | failed | interrupted | stopped.
turns = Table(
    "turns",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("inbound_event_id", Integer, ForeignKey("inbound_events.id"), nullable=False, unique=True),
    Column("conversation_id", Integer, ForeignKey("conversations.id"), nullable=False),
    Column("session_id", Integer, ForeignKey("sessions.id"), nullable=False, index=True),
    Column("requested_by", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("input_text", Text, nullable=False),
    Column("reply_ref", String(64), nullable=True),
    Column("output", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("received_at", Float, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    Index("ix_turns_status", "status"),
)

# Bot messages by logical reference. The pipeline speaks of `ref`; the delivery worker records the
# platform's own id once the send went through, so later edits can address it.
bot_messages = Table(
    "bot_messages",
    metadata,
    Column("ref", String(64), primary_key=True),
    Column("conversation_key", String(255), nullable=False),
    Column("platform_message_id", String(255), nullable=True),
    Column("created_at", Float, nullable=False),
)

# Durable outbound operations. Status: pending -> delivered | dead | superseded.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("channel", String(32), nullable=False),
    Column("conversation_key", String(255), nullable=False),
    Column("op", String(16), nullable=False),
    Column("message_ref", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("status", String(16), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("delivered_at", Float, nullable=True),
    Index("ix_outbox_status_next", "status", "next_attempt_at"),
    Index("ix_outbox_conversation_status", "conversation_key", "status", "id"),
)

# Pending and decided approvals of the human gate.
# Status: pending -> approved | approved_for_session | denied | stopped | expired | interrupted.
approvals = Table(
    "approvals",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("conversation_id", Integer, ForeignKey("conversations.id"), nullable=False),
    Column("session_id", Integer, ForeignKey("sessions.id"), nullable=False),
    Column("turn_id", Integer, ForeignKey("turns.id"), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("summary", Text, nullable=False),
    Column("detail", JSON, nullable=False),
    Column("requested_by", String(255), nullable=False),
    Column("status", String(24), nullable=False, default="pending"),
    Column("decided_by", String(255), nullable=True),
    Column("decided_at", Float, nullable=True),
    Column("requested_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("card_ref", String(64), nullable=True),
    # what "approve for session" matches later requests on (kind + exact request), and the
    # inbound event that asked, so Retry can run that message again
    Column("match_key", String(255), nullable=True),
    Column("inbound_event_id", Integer, nullable=True),
    Column("answer", Text, nullable=True),  # a question's answer (an option or free text)
    Index("ix_approvals_status", "status"),
    Index("ix_approvals_session_match", "session_id", "match_key"),
)

# Append-only record of the gate: every request, decision, expiry, interruption, retry and refused
# click. Nothing updates or deletes these rows.
approval_audit = Table(
    "approval_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("approval_id", String(64), nullable=False, index=True),
    Column("at", Float, nullable=False, index=True),
    Column("event", String(24), nullable=False),
    Column("actor", String(255), nullable=True),
    Column("conversation_key", String(255), nullable=False),
    Column("detail", JSON, nullable=False),
)


# Routines: where each routine's schedule stands (the last due time handled; an enable/disable
# override), and one receipt per run. A run is claimed by inserting its (routine, due_at) row:
# the unique key makes each due time run once, whichever replica gets there first.
routine_state = Table(
    "routine_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("last_due_at", Float, nullable=False),
    Column("next_due_at", Float, nullable=True),
    Column("enabled", Integer, nullable=True),
    Column("updated_at", Float, nullable=False),
)

# Which replica runs a conversation (several replicas on one PostgreSQL database): its turns, its
# queue and its deliveries belong to the lease's owner until the lease runs out unrenewed
# (bridge/pipeline/ownership.py). Empty on SQLite, where one process runs everything.
conversation_leases = Table(
    "conversation_leases",
    metadata,
    Column("conversation_key", String(255), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
)

routine_runs = Table(
    "routine_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("routine", String(64), nullable=False),
    Column("due_at", Float, nullable=False),
    Column("manual", Integer, nullable=False, default=0),
    Column("status", String(16), nullable=False),  # running | completed | failed | interrupted | missed
    Column("owner", String(128), nullable=True),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("output", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("delivered_to", Text, nullable=True),  # JSON list of targets
    Column("note", Text, nullable=True),
    UniqueConstraint("routine", "due_at", name="uq_routine_runs_due"),
    Index("ix_routine_runs_status", "status"),
)

# Files people attach, for the replica that runs their turn (several replicas with data dirs of
# their own; channels/files.py): keyed by their path below the attachments folder, kept for
# BRIDGE_SHARED_FILES_DAYS. Empty on SQLite, where one process keeps them on its disk.
shared_files = Table(
    "shared_files",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("size", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_shared_files_created_at", "created_at"),
)
