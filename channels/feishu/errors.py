"""Feishu delivery errors that the adapter treats specially (importable without lark-oapi)."""

from __future__ import annotations

from channels.base import DeliveryError


class TooLarge(DeliveryError):
    """230025: the card is over the platform's size limit (the adapter splits and retries)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)
