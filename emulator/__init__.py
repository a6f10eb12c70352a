"""A local Salesforce org and Data Cloud tenant that speaks the documented wire protocol over HTTPS.

Start it with ``python -m emulator serve --data-dir DIR`` and fill it with ``python -m emulator seed``.
"""

from __future__ import annotations

DEFAULT_API_VERSION = "62.0"
