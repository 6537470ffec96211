"""Security headers for the pages the gateway serves (the dashboard and any static file).

The Content-Security-Policy is strict: nothing loads but this origin's own
resources, and inline `<script>`/`<style>` blocks run only if their SHA-256
is listed, so an injected script (a stored account name rendered into the
page, say) never runs. The hashes are taken from the page itself each time it
is served, so a rebuilt dashboard needs no edit here. No CORS header is ever
sent: the API is called by SDKs and the dashboard is same-origin, so browsers
on other origins may not read any answer.
"""

from __future__ import annotations

import base64
import hashlib
import re

_INLINE = {tag: re.compile(rf"<{tag}(?![^>]*\bsrc=)[^>]*>(.*?)</{tag}>", re.DOTALL | re.IGNORECASE)
           for tag in ("script", "style")}


def inline_hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions for the inline `tag` blocks of `html`, as browsers hash them."""
    return [f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
            for body in _INLINE[tag].findall(html)]


def content_security_policy(html: str) -> str:
    scripts = " ".join(["'self'", *inline_hashes(html, "script")])
    styles = " ".join(["'self'", *inline_hashes(html, "style")])
    return ("default-src 'none'; "
            f"script-src {scripts}; style-src {styles}; "
            "connect-src 'self'; img-src 'self' data:; font-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'")


def page_headers(html: str) -> dict[str, str]:
    return {
        "content-security-policy": content_security_policy(html),
        "x-content-type-options": "nosniff",
        "x-frame-options": "DENY",
        "referrer-policy": "no-referrer",
        "cache-control": "no-store",
    }
