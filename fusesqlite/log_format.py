"""How the daemon and the commands write their log: ``event=... key=value`` lines, or
one JSON object per line (``--log-format json``) for log shippers.

Every log call of the product is ``log.x("event=NAME key=%s ...", ...)``; the JSON
form keeps the rendered message and adds each ``key=value`` of it as a field of its
own (a value the message quoted with %r comes unquoted), so a shipper can filter on
``event`` without parsing text.
"""
from __future__ import annotations

import ast
import json
import logging
import re
import sys
from datetime import UTC, datetime

FORMATS = ("text", "json")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: key=value pairs of a message: a value is a Python repr of a string (%r) or runs to the next space
_PAIR = re.compile(r"""(?:^|\s)([a-z_][a-z0-9_]*)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S*)""")

#: fields of the JSON object itself, which a message's keys never replace
_RESERVED = frozenset({"time", "level", "logger", "message", "exception"})


def message_fields(message: str) -> dict[str, str]:
    """The ``key=value`` pairs of a log message, quoted values unquoted."""
    fields: dict[str, str] = {}
    for key, value in _PAIR.findall(message):
        if value[:1] in ("'", '"'):
            try:
                value = str(ast.literal_eval(value))
            except (ValueError, SyntaxError):
                pass
        if key not in _RESERVED:
            fields.setdefault(key, value)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, the
    message's fields, and exception (a traceback, where one was logged)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        out.update(message_fields(message))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(debug: bool, level: int = logging.INFO, log_format: str = "text") -> None:
    """Log to stderr at ``level`` (every commit with ``debug``), as text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if debug else level, handlers=[handler])
    # pyfuse3's per-request debug lines would drown ours
    logging.getLogger("pyfuse3").setLevel(logging.INFO if debug else logging.WARNING)
