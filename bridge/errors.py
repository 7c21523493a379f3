"""Exceptions shared across layers that must stay light to import (the HTTP edge workers load
this, and not the store)."""


class Unavailable(RuntimeError):
    """A transient outage of something the service needs (its store out of reach): a request
    that meets it is answered 503, to be sent again, rather than 500."""
