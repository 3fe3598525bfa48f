"""auth's tables in PostgreSQL (schema `auth`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from services.chassis import AlreadyExists, FailedPrecondition

from .domain import Account, AccountState, ApiKey, KeyState, SigningKey, rotation_due

__all__ = ["StateChange", "Store"]


@dataclass(frozen=True, slots=True)
class StateChange:
    """One committed account-state change (AccountStateChange on the wire)."""

    change_seq: int
    account_id: str
    state: int
    reason: str
    change_time: datetime


_KEY_COLUMNS = (
    "api_key_id, account_id, label, scopes, allowed_cidrs, state, secret_prefix, secret_hash,"
    " create_time, expire_time, revoke_time, last_used_time"
)


def _account(row: asyncpg.Record) -> Account:
    return Account(
        account_id=row["account_id"],
        display_name=row["display_name"],
        email=row["email"] or "",
        type=row["type"],
        state=row["state"],
        fee_tier=row["fee_tier"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


def _key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        api_key_id=row["api_key_id"],
        account_id=row["account_id"],
        label=row["label"],
        scopes=tuple(row["scopes"]),
        allowed_cidrs=tuple(row["allowed_cidrs"]),
        state=row["state"],
        secret_prefix=row["secret_prefix"],
        secret_hash=row["secret_hash"],
        create_time=row["create_time"],
        expire_time=row["expire_time"],
        revoke_time=row["revoke_time"],
        last_used_time=row["last_used_time"],
    )


def _signing(row: asyncpg.Record) -> SigningKey:
    return SigningKey(
        kid=row["kid"],
        private_pem=bytes(row["private_pem"]),
        create_time=row["create_time"],
        activate_time=row["activate_time"],
        retire_time=row["retire_time"],
    )


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # ---- accounts ----

    async def create_account(
        self,
        *,
        account_id: str,
        request_id: str,
        request_hash: str,
        display_name: str,
        email: str,
        type_: int,
        now: datetime,
    ) -> Account:
        """Idempotent on request_id: the first account for it, or ALREADY_EXISTS."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO accounts (account_id, request_id, request_hash, display_name,
                       email, type, state, fee_tier, create_time, update_time)
                   VALUES ($1, $2, $3, $4, NULLIF($5, ''), $6, $7, 'default', $8, $8)
                   ON CONFLICT (request_id) DO NOTHING RETURNING *""",
                account_id,
                request_id,
                request_hash,
                display_name,
                email,
                type_,
                AccountState.ACTIVE,
                now,
            )
            if row is None:
                row = await conn.fetchrow(
                    "SELECT * FROM accounts WHERE request_id = $1", request_id
                )
                assert row is not None
                if row["request_hash"] != request_hash:
                    raise AlreadyExists(
                        "AUTH_REQUEST_ID_REUSED", "request_id was used for a different account"
                    )
            return _account(row)

    async def set_account_state(
        self,
        *,
        account_id: str,
        state: int,
        reason: str,
        request_id: str,
        request_hash: str,
        changed_by: str,
        now: datetime,
    ) -> Account | None:
        """Idempotent on request_id (a retry returns the account as it is now; another
        body is ALREADY_EXISTS). None for an unknown account; a closed account stays
        closed (FAILED_PRECONDITION)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM accounts WHERE account_id = $1 FOR UPDATE", account_id
            )
            if row is None:
                return None
            done = await conn.fetchrow(
                "SELECT request_hash FROM account_state_changes WHERE request_id = $1",
                request_id,
            )
            if done is not None:
                if done["request_hash"] != request_hash:
                    raise AlreadyExists(
                        "AUTH_REQUEST_ID_REUSED", "request_id was used for a different change"
                    )
                return _account(row)
            if row["state"] == AccountState.CLOSED and state != AccountState.CLOSED:
                raise FailedPrecondition("AUTH_ACCOUNT_CLOSED", "a closed account stays closed")
            # The next change sequence: the counter row stays locked until the
            # commit, so sequences commit in order and none is skipped.
            seq = await conn.fetchval(
                "UPDATE account_state_meta SET change_seq = change_seq + 1 RETURNING change_seq"
            )
            await conn.execute(
                """INSERT INTO account_state_changes
                       (request_id, request_hash, account_id, state, reason, changed_by,
                        change_time, seq, published)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, false)""",
                request_id,
                request_hash,
                account_id,
                state,
                reason,
                changed_by,
                now,
                seq,
            )
            row = await conn.fetchrow(
                """UPDATE accounts SET state = $2, update_time = $3, state_seq = $4,
                       state_reason = $5
                   WHERE account_id = $1 RETURNING *""",
                account_id,
                state,
                now,
                seq,
                reason,
            )
            assert row is not None
            return _account(row)

    async def frozen_accounts(self) -> tuple[int, list[StateChange]]:
        """(the change sequence, every account not ACTIVE with its latest change),
        read in one statement: one snapshot."""
        rows = await self.pool.fetch(
            """SELECT m.change_seq, a.account_id, a.state, a.state_seq, a.state_reason,
                      a.update_time
               FROM account_state_meta m
               LEFT JOIN accounts a ON a.state <> $1
               ORDER BY a.account_id""",
            AccountState.ACTIVE,
        )
        seq = int(rows[0]["change_seq"]) if rows else 0
        return seq, [
            StateChange(
                r["state_seq"], r["account_id"], r["state"], r["state_reason"], r["update_time"]
            )
            for r in rows
            if r["account_id"] is not None
        ]

    async def publish_state_changes(
        self, publish: Callable[[list[StateChange]], Awaitable[None]], limit: int = 100
    ) -> int:
        """Hand the oldest unpublished state changes to `publish`, then mark them; one
        publisher at a time, in sequence order. A crash after publishing and before
        the mark publishes them again (same sequence numbers)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('auth.outbox'))"):
                return 0
            rows = await conn.fetch(
                """SELECT seq, account_id, state, reason, change_time FROM account_state_changes
                   WHERE NOT published ORDER BY seq LIMIT $1""",
                limit,
            )
            if not rows:
                return 0
            await publish(
                [
                    StateChange(
                        r["seq"], r["account_id"], r["state"], r["reason"], r["change_time"]
                    )
                    for r in rows
                ]
            )
            await conn.execute(
                "UPDATE account_state_changes SET published = true WHERE seq = ANY($1::bigint[])",
                [r["seq"] for r in rows],
            )
            return len(rows)

    async def account(self, account_id: str) -> Account | None:
        row = await self.pool.fetchrow("SELECT * FROM accounts WHERE account_id = $1", account_id)
        return None if row is None else _account(row)

    # ---- API keys ----

    async def create_key(
        self, key: ApiKey, *, request_id: str, request_hash: str
    ) -> tuple[ApiKey, bool]:
        """(the key, created now?). A retry with the same request_id returns the first key."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""INSERT INTO api_keys ({_KEY_COLUMNS}, request_id, request_hash)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                    ON CONFLICT (account_id, request_id) DO NOTHING RETURNING *""",
                key.api_key_id,
                key.account_id,
                key.label,
                list(key.scopes),
                list(key.allowed_cidrs),
                key.state,
                key.secret_prefix,
                key.secret_hash,
                key.create_time,
                key.expire_time,
                key.revoke_time,
                key.last_used_time,
                request_id,
                request_hash,
            )
            if row is not None:
                return _key(row), True
            row = await conn.fetchrow(
                "SELECT * FROM api_keys WHERE account_id = $1 AND request_id = $2",
                key.account_id,
                request_id,
            )
            assert row is not None
            if row["request_hash"] != request_hash:
                raise AlreadyExists(
                    "AUTH_REQUEST_ID_REUSED", "request_id was used for a different API key"
                )
            return _key(row), False

    async def key(self, api_key_id: str) -> ApiKey | None:
        row = await self.pool.fetchrow("SELECT * FROM api_keys WHERE api_key_id = $1", api_key_id)
        return None if row is None else _key(row)

    async def list_keys(
        self, account_id: str, *, state: int, limit: int, after: tuple[datetime, str] | None
    ) -> list[ApiKey]:
        """Newest first; `after` is the (create_time, id) of the last key of the previous page."""
        rows = await self.pool.fetch(
            f"""SELECT {_KEY_COLUMNS} FROM api_keys
                WHERE account_id = $1 AND ($2 = 0 OR state = $2)
                  AND ($3::timestamptz IS NULL OR (create_time, api_key_id) < ($3, $4))
                ORDER BY create_time DESC, api_key_id DESC LIMIT $5""",
            account_id,
            state,
            after[0] if after else None,
            after[1] if after else "",
            limit,
        )
        return [_key(r) for r in rows]

    async def revoke_key(self, api_key_id: str, *, reason: str, now: datetime) -> ApiKey | None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE api_keys SET state = $2, revoke_time = $3, revoke_reason = $4
                   WHERE api_key_id = $1 AND state = $5 RETURNING *""",
                api_key_id,
                KeyState.REVOKED,
                now,
                reason,
                KeyState.ACTIVE,
            )
            if row is not None:
                await conn.execute(
                    """INSERT INTO api_key_events (api_key_id, event, reason, event_time)
                       VALUES ($1, 'revoked', $2, $3)""",
                    api_key_id,
                    reason,
                    now,
                )
                return _key(row)
        return await self.key(api_key_id)

    async def touch_key(self, api_key_id: str, now: datetime) -> None:
        await self.pool.execute(
            "UPDATE api_keys SET last_used_time = $2 WHERE api_key_id = $1", api_key_id, now
        )

    # ---- signing keys ----

    async def signing_keys(self) -> list[SigningKey]:
        rows = await self.pool.fetch("SELECT * FROM signing_keys ORDER BY activate_time")
        return [_signing(r) for r in rows]

    async def rotate_if_due(
        self,
        *,
        kid: str,
        private_pem: bytes,
        now: datetime,
        rotate_after: timedelta,
        publish_ahead: timedelta,
        retire_after: timedelta,
    ) -> bool:
        """Add a key when one is due (under a lock: one rotation among replicas).

        The first key signs at once. A later one is published `publish_ahead`
        before it signs (so every JWKS cache has it by then); the key it replaces
        stays published until its last token has expired (`retire_after`).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('cex.auth.rotate'))")
            rows = await conn.fetch("SELECT * FROM signing_keys")
            keys: Sequence[SigningKey] = [_signing(r) for r in rows]
            if not rotation_due(keys, now, rotate_after=rotate_after):
                return False
            activate = now + publish_ahead if keys else now
            await conn.execute(
                """UPDATE signing_keys SET retire_time = $1
                   WHERE retire_time IS NULL""",
                activate + retire_after,
            )
            await conn.execute(
                """INSERT INTO signing_keys (kid, private_pem, create_time, activate_time)
                   VALUES ($1, $2, $3, $4)""",
                kid,
                private_pem,
                now,
                activate,
            )
            return True
