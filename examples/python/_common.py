"""What every example shares: the connection settings from the environment."""

from __future__ import annotations

import json
import os
import sys

from cex_sdk import Client


def client_from_env() -> Client:
    """A client of CEX_TARGET (default the local edge) with the key in CEX_API_KEY_ID/SECRET."""
    key_id, secret = os.environ.get("CEX_API_KEY_ID"), os.environ.get("CEX_API_KEY_SECRET")
    if not key_id or not secret:
        sys.exit("set CEX_API_KEY_ID and CEX_API_KEY_SECRET (cex apikey create prints them)")
    return Client.from_api_key(os.environ.get("CEX_TARGET", "127.0.0.1:50050"), key_id, secret)


def emit(**fields: object) -> None:
    """One JSON line on stdout."""
    print(json.dumps(fields, default=str), flush=True)
