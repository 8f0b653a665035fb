"""One structlog configuration for the whole daemon: JSON lines for journald and log shippers,
readable console output when a person watches a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(json: bool | None = None, level: int = logging.INFO) -> None:
    if json is None:
        json = not sys.stdout.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str = "tiktokguard") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
