"""Credentials inside URIs, masked wherever a config or a path is recorded.

A tracking store or a storage URI may carry its credentials (``postgresql://mlflow:S3cret@db/mlflow``, pyarrow's
``s3://KEY:SECRET@bucket/path``). denseqa records its config with every output (``denseqa.json``, ``manifest.json``,
``eval.json``, the run folder's ``config.yaml``), as MLflow parameters, and in its log: each of those gets the URI
with the password part masked, never the password. Credentials belong in the tools' own environment variables
(``MLFLOW_TRACKING_URI``, ``AWS_SECRET_ACCESS_KEY``) or files, which denseqa never records.

By hand: a regular expression over strings, because the values are free text (a URI may sit inside an error
message) and no library we depend on masks the userinfo of arbitrary URIs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# scheme://user:password@  ->  scheme://user:***@   (a user without a password is not a secret, and stays). The
# password runs to the last "@" of the URI: a secret may hold "/" (AWS's often do) or "@", written raw.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):(?P<password>\S+)@(?=[^@\s]*(?:\s|$))")


def masked(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ``***``."""
    return _USERINFO.sub(rf"\g<head>:{MASK}@", text)


def masked_values(value: Any) -> Any:
    """A copy of a config-like value (dicts, lists, strings) with every string :func:`masked`."""
    if isinstance(value, str):
        return masked(value)
    if isinstance(value, dict):
        return {key: masked_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(masked_values(item) for item in value)
    return value


class MaskingFilter(logging.Filter):
    """A log handler's filter that masks credentials in each record's message, its arguments included."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: left to logging's own error report, as without this filter
            return True
        safe = masked(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True
