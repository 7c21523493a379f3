"""Alembic migration environment of agent-bridge (the only way the schema is created)."""

# The newest revision in versions/ (a test checks it against Alembic's own view). The service
# compares the database with it to decide whether Alembic needs to run at all.
HEAD = "0012"
