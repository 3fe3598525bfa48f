"""The README's walkthrough, as a new user types it: `cex` CLI, a token, REST with curl."""

from __future__ import annotations

import asyncio

from cex_stack.supervisor import Stack
from tests.cli import cex
from tests.rest import rest_ok


async def test_account_key_token_and_a_protected_call_over_rest(stack: Stack) -> None:
    account = await asyncio.to_thread(cex, stack, "account", "create", "--name", "alice")
    assert account.startswith("acc_")
    exports = await asyncio.to_thread(
        cex, stack, "apikey", "create", "--account", account, "--scopes", "read,trade"
    )
    env = dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines())
    assert set(env) == {"CEX_API_KEY_ID", "CEX_API_KEY_SECRET"}
    token = await asyncio.to_thread(cex, stack, "token", env=env)
    reply = await asyncio.to_thread(rest_ok, stack, f"/v1/accounts/{account}", token)
    assert reply["account"]["account_id"] == account
    assert reply["account"]["display_name"] == "alice"
    # The operator freezes the account: it still reads, with a read-only token.
    frozen = await asyncio.to_thread(cex, stack, "account", "freeze", account, "--reason", "kyc")
    assert frozen == f"{account} ACCOUNT_STATE_SUSPENDED"
    read_only = await asyncio.to_thread(cex, stack, "token", env=env)
    reply = await asyncio.to_thread(rest_ok, stack, f"/v1/accounts/{account}", read_only)
    assert reply["account"]["state"] == "ACCOUNT_STATE_SUSPENDED"
    thawed = await asyncio.to_thread(cex, stack, "account", "unfreeze", account)
    assert thawed == f"{account} ACCOUNT_STATE_ACTIVE"
