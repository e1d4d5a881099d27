"""Orbax's own log lines that say nothing to a user, kept off the console in one place."""

from __future__ import annotations

import logging


def quiet() -> None:
    """Idempotent."""
