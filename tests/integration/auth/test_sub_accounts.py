"""Sub-accounts on auth's own database (ADR 0017): creation under the master's row
lock (concurrent creations never pass the limit), idempotency per master, one
level only, paging, and the `subs` claim of the master's tokens."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import grpc

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.domain import MAX_SUB_ACCOUNTS
from services.chassis.tokens import b64url_decode
from tests.integration.auth.test_auth_service import _auth, _fails, _free_port, _operator

READ_TRADE = [auth_pb2.API_KEY_SCOPE_READ, auth_pb2.API_KEY_SCOPE_TRADE]


async def _keyed(
    stub: auth_pb2_grpc.AuthServiceStub, md: tuple[tuple[str, str], ...], account_id: str
) -> tuple[tuple[str, str], ...]:
    """A fresh token of a new read+trade key of `account_id`."""
    key = await stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(request_id=f"k-{account_id}", account_id=account_id,
                                     scopes=READ_TRADE),
        metadata=md,
    )  # fmt: skip
    return await _token(stub, key.api_key.api_key_id, key.secret)


async def _token(
    stub: auth_pb2_grpc.AuthServiceStub, key_id: str, secret: str
) -> tuple[tuple[str, str], ...]:
    reply = await stub.IssueToken(
        auth_pb2.IssueTokenRequest(api_key_id=key_id, api_key_secret=secret)
    )
    return (("authorization", f"Bearer {reply.access_token}"),)


def _claims(md: tuple[tuple[str, str], ...]) -> dict[str, object]:
    payload = md[0][1].removeprefix("Bearer ").split(".")[1]
    return json.loads(b64url_decode(payload))  # type: ignore[no-any-return]


async def test_subs_limit_idempotency_and_the_claim(fresh_database_url: str) -> None:
    async with _auth(fresh_database_url, lambda: datetime.now(UTC), _free_port()) as stub:
        ops = await _operator(stub)
        masters = []
        for name in ("firm", "other"):
            made = await stub.CreateAccount(
                auth_pb2.CreateAccountRequest(request_id=name, display_name=name), metadata=ops
            )
            masters.append(made.account.account_id)
        firm, other = masters
        key = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(request_id="k", account_id=firm, scopes=READ_TRADE),
            metadata=ops,
        )
        md = await _token(stub, key.api_key.api_key_id, key.secret)
        assert "subs" not in _claims(md)

        # One more than the limit at once: the master's row lock lets exactly the
        # limit through, whatever the interleaving.
        async def create(i: int) -> str:
            request = auth_pb2.CreateSubAccountRequest(request_id=f"s{i}", display_name=f"d{i}")
            try:
                reply = await stub.CreateSubAccount(request, metadata=md)
            except grpc.aio.AioRpcError as error:
                return str(error.code())
            return reply.account.account_id

        results = await asyncio.gather(*(create(i) for i in range(MAX_SUB_ACCOUNTS + 1)))
        subs = {r for r in results if r.startswith("acc")}
        assert len(subs) == MAX_SUB_ACCOUNTS, results
        assert results.count(str(grpc.StatusCode.FAILED_PRECONDITION)) == 1
        refused = await _fails(
            stub.CreateSubAccount(
                auth_pb2.CreateSubAccountRequest(request_id="more", display_name="x"), metadata=md
            )
        )
        assert refused.reason == "AUTH_SUB_ACCOUNT_LIMIT"

        # Idempotent per master: a retry returns the first; another body is refused;
        # another master's same request id is its own sub.
        created = [r for r in results if r.startswith("acc")]
        done = results.index(created[0])
        again = await stub.CreateSubAccount(
            auth_pb2.CreateSubAccountRequest(request_id=f"s{done}", display_name=f"d{done}"),
            metadata=md,
        )
        assert again.account.account_id == created[0]
        reused = await _fails(
            stub.CreateSubAccount(
                auth_pb2.CreateSubAccountRequest(request_id=f"s{done}", display_name="else"),
                metadata=md,
            )
        )
        assert reused.reason == "AUTH_REQUEST_ID_REUSED"
        theirs = await stub.CreateSubAccount(
            auth_pb2.CreateSubAccountRequest(
                request_id=f"s{done}", display_name=f"d{done}", master_account_id=other
            ),
            metadata=ops,
        )
        assert theirs.account.master_account_id == other
        assert theirs.account.account_id not in subs
        # A retry racing its first attempt: one sub, every answer the same.
        race = auth_pb2.CreateSubAccountRequest(
            request_id="race", display_name="r", master_account_id=other
        )
        answers = await asyncio.gather(
            *(stub.CreateSubAccount(race, metadata=ops) for _ in range(8))
        )
        assert len({a.account.account_id for a in answers}) == 1

        # The master's next token lists every sub; a sub's lists none.
        md = await _token(stub, key.api_key.api_key_id, key.secret)
        assert set(_claims(md)["subs"]) == subs  # type: ignore[arg-type]
        sub_md = await _keyed(stub, md, created[0])
        assert "subs" not in _claims(sub_md)
        nested = await _fails(
            stub.CreateSubAccount(
                auth_pb2.CreateSubAccountRequest(request_id="n", display_name="x"), metadata=sub_md
            )
        )
        assert nested.reason == "AUTH_SUB_ACCOUNT_NESTED"

        # Paged, oldest first, the master's only; a sub's master is NOT_FOUND to it.
        seen: list[str] = []
        token = ""
        while True:
            page = await stub.ListSubAccounts(
                auth_pb2.ListSubAccountsRequest(page_size=40, page_token=token), metadata=md
            )
            seen += [a.account_id for a in page.accounts]
            assert all(a.master_account_id == firm for a in page.accounts)
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == MAX_SUB_ACCOUNTS and set(seen) == subs
        for hidden in (firm, created[1]):
            missing = await _fails(
                stub.GetAccount(auth_pb2.GetAccountRequest(account_id=hidden), metadata=sub_md)
            )
            assert missing.reason == "AUTH_ACCOUNT_NOT_FOUND"
        shown = await stub.GetAccount(
            auth_pb2.GetAccountRequest(account_id=created[1]), metadata=md
        )
        assert shown.account.master_account_id == firm
