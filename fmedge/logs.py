"""Logging set-up: one line per event, text or JSON, size-rotated files, no secrets.

`fm-edge --log-format json` prints one JSON object per line (time, level, logger,
message); `start` also writes `DATA_DIR/logs/fm-edge.log`, rotated by size. A filter
replaces any configured secret (api_key, api_token, llm_api_key) that would reach a log
line, wherever it came from.
"""

import json
import logging
import os
import sys
import time

LOG_FORMATS = ("text", "json")
LOG_FILE_NAME = "fm-edge.log"
LOG_MAX_BYTES = 5 * 1024 * 1024    # per file; a Pi's SD card should not fill with logs
LOG_BACKUPS = 3
_TEXT_FORMAT = "%(asctime)s fm-edge %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: machine-readable and still one line per event."""

    def format(self, record):
        entry = {"time": _utc(record.created), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class SecretFilter(logging.Filter):
    """Masks configured secrets in every record that passes through a handler."""

    def __init__(self, secrets):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record):
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "****")
            record.msg, record.args = message, ()
        return True


def setup_logging(level="warning", log_format="text", log_dir=None, secrets=(),
                  stream=None):
    """Configure the root logger for one fm-edge process; returns the file path or None."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level.upper())
    formatter = JsonFormatter() if log_format == "json" else _text_formatter()
    secret_filter = SecretFilter(secrets)
    handlers = [logging.StreamHandler(stream or sys.stderr)]
    path = None
    if log_dir:
        os.makedirs(log_dir, mode=0o700, exist_ok=True)
        path = os.path.join(log_dir, LOG_FILE_NAME)
        from logging.handlers import RotatingFileHandler  # only file loggers pay for it

        handlers.append(RotatingFileHandler(
            path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(secret_filter)
        root.addHandler(handler)
    return path


def _text_formatter():
    formatter = logging.Formatter(_TEXT_FORMAT, "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    return formatter


def _utc(timestamp):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + (
        ".%03dZ" % int((timestamp % 1) * 1000))
