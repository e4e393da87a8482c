"""AWS Signature Version 4 for S3 requests (unsigned payload, as GET and HEAD need)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import urllib.parse

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _quote(text: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(text, safe=safe)


def sign(method: str, url: str, headers: dict[str, str], *, access_key: str, secret_key: str,
         region: str, session_token: str | None = None, now: datetime.datetime | None = None,
         payload_sha256: str = EMPTY_SHA256, service: str = "s3") -> dict[str, str]:
    """Return ``headers`` plus x-amz-date, x-amz-content-sha256, (token) and Authorization."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    parts = urllib.parse.urlsplit(url)
    out = dict(headers)
    out["x-amz-date"] = amz_date
    out["x-amz-content-sha256"] = payload_sha256
    if session_token:
        out["x-amz-security-token"] = session_token
    host = parts.netloc
    signed = {"host": host, **{k.lower(): v.strip() for k, v in out.items()
                               if k.lower().startswith("x-amz-") or k.lower() == "range"}}
    names = sorted(signed)
    canonical_query = "&".join(
        f"{_quote(k)}={_quote(v)}" for k, v in sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))
    canonical = "\n".join([
        method,
        _quote(urllib.parse.unquote(parts.path) or "/", safe="-_.~/"),
        canonical_query,
        "".join(f"{n}:{signed[n]}\n" for n in names),
        ";".join(names),
        payload_sha256,
    ])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), day), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                            f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return out
