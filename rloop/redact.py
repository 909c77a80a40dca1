"""Redaction of secrets that URIs carry, for any text that leaves a process: log lines, the stage's
termination message, the operator's status and Events.

Two parts of a URI can hold a credential: the userinfo (`s3://KEY:SECRET@host/...`) and the query or
fragment (a presigned URL's `?X-Amz-Signature=...`, an SAS token, `#access_token=...`). Both are
replaced by `***`; scheme, host and path stay, so a message still says which object it is about.

Light on purpose (the standard library only): the operator and the stages both import it.
"""

from __future__ import annotations

import re

REDACTED = "***"

# A URI runs from its scheme to the first whitespace, quote or angle bracket (how URIs sit in prose,
# reprs, JSON and log lines). `\b` keeps `xs3://` from matching as `s3://` inside a longer word.
_URI = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*)://([^\s\"'<>`]*)")


def _redact_one(m: re.Match[str]) -> str:
    scheme, rest = m.group(1), m.group(2)
    authority = rest.split("/", 1)[0]
    # The userinfo does not necessarily end at the first '/': an AWS secret key may contain one, so
    # `s3://KEY:SE/CRET@bucket` has the ':' in what looks like the authority and the '@' after it
    # (the same reading as rloop.spec's check that rejects credentials in URI fields).
    if "@" in authority:
        rest = f"{REDACTED}@{rest[authority.rindex('@') + 1:]}"
    elif ":" in authority and "@" in rest:
        rest = f"{REDACTED}@{rest[rest.index('@') + 1:]}"
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = f"{rest[:cut + 1]}{REDACTED}"
    return f"{scheme}://{rest}"


def redact_uris(text: str) -> str:
    """`text` with the userinfo, query and fragment of every URI in it replaced by `***`:
    `s3://k:s@host/p?X-Amz-Signature=abc` → `s3://***@host/p?***`. Text without URIs is unchanged."""
    if "://" not in text:
        return text
    return _URI.sub(_redact_one, text)


def is_redacted(uri: str) -> bool:
    """Whether `uri` has nothing `redact_uris` would hide (no userinfo, query or fragment)."""
    return redact_uris(uri) == uri
