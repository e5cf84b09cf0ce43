"""Credentials inside URIs: masked wherever a URI is shown or stored.

MLflow, databases and object stores accept credentials inside a URI (``http://user:pass@host``,
``postgresql://user:pass@db/mlflow``) or in its query (``?token=...``, a presigned URL's
``X-Amz-Signature``). Such a URI must reach neither stdout, logs, run files, MLflow params nor a
compiled pipeline: :func:`mask_uri` and :func:`mask_text` replace the secret parts with ``***``
for people to read. Machines that must use credentials take them from their environment (MLflow
reads ``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD`` and ``MLFLOW_TRACKING_TOKEN``; a
Kubeflow pod gets them from a Secret), never from a URI that was shipped to them.

Hand-written on ``urllib.parse``: a URI is rewritten only where it holds a secret, and otherwise
left byte for byte as written (re-encoding it would change what a user recognises).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Query parameters whose value is a secret (matched on the name, case-insensitively).
SECRET_QUERY_NAME = re.compile(
    r"token|secret|passw(or)?d|pwd|signature|credential|api[-_]?key|^key$|^sig$|^auth", re.IGNORECASE
)
# A URI inside free text: scheme://, then anything up to whitespace or a quote. Trailing
# punctuation may come along; it stays where it was, after the masked part.
URI_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def mask_uri(uri: str) -> str:
    """``uri`` with the password of its user info and every secret query value replaced by ``***``."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: not a URI we can take apart
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            netloc = f"{user}:{MASK}@{host}"
    query = _mask_query(parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def mask_text(text: str) -> str:
    """``text`` with every URI in it masked (:func:`mask_uri`): for messages, logs and printed results."""
    return URI_IN_TEXT.sub(lambda match: mask_uri(match.group(0)), text)


def _mask_query(query: str) -> str:
    items = query.split("&") if query else []
    return "&".join(f"{name}={MASK}" if has_value and SECRET_QUERY_NAME.search(name) else item
                    for item in items for name, has_value, _ in [item.partition("=")])


class MaskSecrets(logging.Filter):
    """A handler filter that masks URIs in every record it passes (any logger's, libraries' too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def mask_logging(logger: logging.Logger | None = None) -> None:
    """Install :class:`MaskSecrets` on every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, MaskSecrets) for f in handler.filters):
            handler.addFilter(MaskSecrets())
