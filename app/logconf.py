"""Structured logging: one JSON object per line on stderr, for every process."""

from __future__ import annotations

from typing import Any

from pythonjsonlogger.json import JsonFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"
RENAME = {"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"}


def formatter() -> JsonFormatter:
    return JsonFormatter(FORMAT, rename_fields=RENAME, timestamp=False)


def dict_config(level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` (also gunicorn's ``logconfig_dict``)."""
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "app.logconf.formatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": lvl, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": lvl, "handlers": ["stderr"], "propagate": False},
            # Access lines come from nginx (JSON, with upstream time); none from workers.
            "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
            "uvicorn.error": {"level": lvl, "handlers": ["stderr"], "propagate": False},
            "uvicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
        },
    }


def configure_logging(level: str = "info") -> None:
    import logging.config

    logging.config.dictConfig(dict_config(level))
