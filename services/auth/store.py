"""auth's tables in PostgreSQL (schema `auth`)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from services.chassis import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    from_row,
    relay_outbox_rows,
)
from services.chassis.fee_tiers import BASE_TIER

from .domain import (
    Account,
    AccountState,
    ApiKey,
    FeeTier,
    KeyState,
    SigningKey,
    TierChange,
    check_new_sub_account,
    rotation_due,
    tier_for_volume,
    volume_tiers,
)

__all__ = ["FeeChange", "FeeTiers", "StateChange", "Store"]

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True, slots=True)
class StateChange:
    """One committed account-state change (AccountStateChange on the wire)."""

    change_seq: int
    account_id: str
    state: int
    reason: str
    change_time: datetime


@dataclass(frozen=True, slots=True)
class FeeChange:
    """One committed fee-tier change (FeeTierChange on the wire): a schedule (no
    account) or one account's tier."""

    change_seq: int
    account_id: str
    fee_tier: str
    assigned: bool
    schedule: tuple[FeeTier, ...] | None
    change_time: datetime


@dataclass(frozen=True, slots=True)
class FeeTiers:
    """The schedule and every account off the base tier, at one change sequence."""

    change_seq: int
    schedule: tuple[FeeTier, ...]
    schedule_time: datetime | None
    accounts: list[tuple[str, str, bool, int]]  # account, tier, assigned, its change's seq


def _schedule_json(schedule: Sequence[FeeTier]) -> str:
    return json.dumps(
        [[t.name, str(t.maker_bps), str(t.taker_bps), str(t.min_volume)] for t in schedule]
    )


def _schedule_of(text: str) -> tuple[FeeTier, ...]:
    return tuple(
        FeeTier(name, Decimal(maker), Decimal(taker), Decimal(volume))
        for name, maker, taker, volume in json.loads(text)
    )


def _fee_change(row: asyncpg.Record) -> FeeChange:
    return FeeChange(
        row["seq"],
        row["account_id"] or "",
        row["fee_tier"],
        row["assigned"],
        _schedule_of(row["schedule"]) if row["schedule"] is not None else None,
        row["change_time"],
    )


_KEY_COLUMNS = (
    "api_key_id, account_id, label, scopes, allowed_cidrs, state, secret_prefix, secret_hash,"
    " create_time, expire_time, revoke_time, last_used_time"
)


def _account(row: asyncpg.Record) -> Account:
    return from_row(
        Account, row, email=row["email"] or "", master_account_id=row["master_account_id"] or ""
    )


def _same_request(row: asyncpg.Record, request_hash: str, what: str) -> None:
    """A request_id seen before (its `row`) must come with the same body: a retry;
    another body is ALREADY_EXISTS."""
    if row["request_hash"] != request_hash:
        raise AlreadyExists("AUTH_REQUEST_ID_REUSED", f"request_id was used for a different {what}")


def _key(row: asyncpg.Record) -> ApiKey:
    return from_row(
        ApiKey, row, scopes=tuple(row["scopes"]), allowed_cidrs=tuple(row["allowed_cidrs"])
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
                _same_request(row, request_hash, "account")
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
                _same_request(done, request_hash, "change")
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

        async def changes(rows: list[asyncpg.Record]) -> None:
            await publish(
                [
                    StateChange(
                        r["seq"], r["account_id"], r["state"], r["reason"], r["change_time"]
                    )
                    for r in rows
                ]
            )

        return await relay_outbox_rows(
            self.pool,
            turn="auth.outbox",
            table="account_state_changes",
            key="seq",
            columns="seq, account_id, state, reason, change_time",
            publish=changes,
            limit=limit,
        )

    async def create_sub_account(
        self,
        *,
        master_account_id: str,
        account_id: str,
        request_id: str,
        request_hash: str,
        display_name: str,
        now: datetime,
    ) -> Account:
        """Idempotent on (master, request_id). The master's row is locked, so two
        concurrent creations count each other against the limit."""
        key = f"sub:{master_account_id}:{request_id}"  # accounts.request_id is global
        async with self.pool.acquire() as conn, conn.transaction():
            # The lock first: a retry racing its first attempt finds its row after it.
            found = await conn.fetchrow(
                "SELECT * FROM accounts WHERE account_id = $1 FOR UPDATE", master_account_id
            )
            row = await conn.fetchrow("SELECT * FROM accounts WHERE request_id = $1", key)
            if row is not None:
                _same_request(row, request_hash, "account")
                return _account(row)
            master = None if found is None else _account(found)
            count = await conn.fetchval(
                "SELECT count(*) FROM accounts WHERE master_account_id = $1", master_account_id
            )
            check_new_sub_account(master, count)
            assert master is not None
            row = await conn.fetchrow(
                """INSERT INTO accounts (account_id, request_id, request_hash, display_name,
                       email, type, state, fee_tier, create_time, update_time,
                       master_account_id)
                   VALUES ($1, $2, $3, $4, NULL, $5, $6, 'default', $7, $7, $8)
                   RETURNING *""",
                account_id,
                key,
                request_hash,
                display_name,
                master.type,
                AccountState.ACTIVE,
                now,
                master_account_id,
            )
            assert row is not None
            return _account(row)

    async def sub_accounts(
        self, master_account_id: str, *, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[Account]:
        """Oldest first; `after` is the (create_time, id) of the previous page's last."""
        rows = await self.pool.fetch(
            """SELECT * FROM accounts WHERE master_account_id = $1
                 AND ($2::timestamptz IS NULL OR (create_time, account_id) > ($2, $3))
               ORDER BY create_time, account_id LIMIT $4""",
            master_account_id,
            after[0] if after else None,
            after[1] if after else "",
            limit,
        )
        return [_account(r) for r in rows]

    async def sub_account_ids(self, master_account_id: str) -> list[str]:
        """What a master's token lists in its `subs` claim (at most MAX_SUB_ACCOUNTS)."""
        rows = await self.pool.fetch(
            "SELECT account_id FROM accounts WHERE master_account_id = $1 ORDER BY account_id",
            master_account_id,
        )
        return [r["account_id"] for r in rows]

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
            _same_request(row, request_hash, "API key")
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

    # ---- fee tiers ----

    async def seed_fee_schedule(self, base: FeeTier) -> None:
        """The catalog's one tier as the schedule, unless one is there already."""
        await self.pool.execute(
            """INSERT INTO fee_tiers (name, maker_fee_bps, taker_fee_bps, min_volume)
               SELECT $1, $2, $3, 0 WHERE NOT EXISTS (SELECT 1 FROM fee_tiers)
               ON CONFLICT DO NOTHING""",
            base.name,
            base.maker_bps,
            base.taker_bps,
        )

    async def fee_schedule(
        self, conn: Connection | None = None
    ) -> tuple[tuple[FeeTier, ...], datetime | None]:
        """(the tiers by min_volume, when an operator last set them)."""
        db = conn or self.pool
        rows = await db.fetch(
            """SELECT name, maker_fee_bps, taker_fee_bps, min_volume FROM fee_tiers
               ORDER BY min_volume"""
        )
        when = await db.fetchval("SELECT schedule_time FROM fee_meta")
        return (
            tuple(
                FeeTier(r["name"], r["maker_fee_bps"], r["taker_fee_bps"], r["min_volume"])
                for r in rows
            ),
            when,
        )

    async def fee_tiers(self) -> FeeTiers:
        """The schedule and every account off the base tier, as one snapshot."""
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            seq = await conn.fetchval("SELECT change_seq FROM fee_meta")
            schedule, when = await self.fee_schedule(conn)
            rows = await conn.fetch(
                """SELECT account_id, fee_tier, fee_tier_assigned, fee_tier_seq FROM accounts
                   WHERE fee_tier <> $1 OR fee_tier_assigned ORDER BY account_id""",
                BASE_TIER,
            )
        return FeeTiers(
            int(seq),
            schedule,
            when,
            [
                (r["account_id"], r["fee_tier"], r["fee_tier_assigned"], r["fee_tier_seq"])
                for r in rows
            ],
        )

    @staticmethod
    async def _next_fee_seq(conn: Connection) -> int:
        # The counter row stays locked until the commit: sequences commit in order.
        seq: int = await conn.fetchval(
            "UPDATE fee_meta SET change_seq = change_seq + 1 RETURNING change_seq"
        )
        return seq

    async def _set_tier(
        self,
        conn: Connection,
        account_id: str,
        tier: str,
        assigned: bool,
        *,
        reason: str,
        changed_by: str,
        now: datetime,
        request: tuple[str, str] | None = None,
    ) -> asyncpg.Record:
        seq = await self._next_fee_seq(conn)
        await conn.execute(
            """INSERT INTO fee_tier_changes (seq, request_id, request_hash, account_id,
                   fee_tier, assigned, reason, changed_by, change_time)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            seq,
            request[0] if request else None,
            request[1] if request else None,
            account_id,
            tier,
            assigned,
            reason,
            changed_by,
            now,
        )
        row = await conn.fetchrow(
            """UPDATE accounts SET fee_tier = $2, fee_tier_assigned = $3, fee_tier_seq = $4,
                   update_time = $5
               WHERE account_id = $1 RETURNING *""",
            account_id,
            tier,
            assigned,
            seq,
            now,
        )
        assert row is not None
        return row

    async def _apply_volume_tiers(
        self,
        conn: Connection,
        schedule: Sequence[FeeTier],
        *,
        reason: str,
        changed_by: str,
        now: datetime,
    ) -> list[TierChange]:
        """Move every account whose tier follows its volume to the tier its last
        measured volume gives (accounts on the base tier without volume cannot move)."""
        rows = await conn.fetch(
            """SELECT account_id, fee_tier, fee_tier_assigned, traded_volume FROM accounts
               WHERE NOT fee_tier_assigned AND (fee_tier <> $1 OR traded_volume > 0)
               ORDER BY account_id FOR UPDATE""",
            BASE_TIER,
        )
        changes = volume_tiers(
            schedule,
            [
                (r["account_id"], r["fee_tier"], r["fee_tier_assigned"], r["traded_volume"])
                for r in rows
            ],
        )
        for change in changes:
            await self._set_tier(
                conn,
                change.account_id,
                change.fee_tier,
                False,
                reason=reason,
                changed_by=changed_by,
                now=now,
            )
        return changes

    async def _done_fee_request(self, conn: Connection, request_id: str, request_hash: str) -> bool:
        done = await conn.fetchrow(
            "SELECT request_hash FROM fee_tier_changes WHERE request_id = $1", request_id
        )
        if done is None:
            return False
        _same_request(done, request_hash, "change")
        return True

    async def set_fee_schedule(
        self,
        schedule: tuple[FeeTier, ...],
        *,
        request_id: str,
        request_hash: str,
        reason: str,
        changed_by: str,
        now: datetime,
    ) -> list[TierChange]:
        """Replace the schedule, then move the accounts on volume tiers to the tier
        the new schedule gives them; idempotent on request_id (a retry changes
        nothing). FAILED_PRECONDITION AUTH_FEE_TIER_IN_USE if a tier an operator
        assigned is missing from the new schedule."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM fee_meta FOR UPDATE")
            if await self._done_fee_request(conn, request_id, request_hash):
                return []
            names = [t.name for t in schedule]
            missing = await conn.fetch(
                """SELECT DISTINCT fee_tier FROM accounts
                   WHERE fee_tier_assigned AND NOT fee_tier = ANY($1::text[])
                   ORDER BY fee_tier""",
                names,
            )
            if missing:
                tiers = ", ".join(r["fee_tier"] for r in missing)
                raise FailedPrecondition(
                    "AUTH_FEE_TIER_IN_USE",
                    f"operators assigned accounts the tiers {tiers}: assign them another first",
                    metadata={"fee_tiers": tiers},
                )
            await conn.execute("DELETE FROM fee_tiers")
            await conn.executemany(
                """INSERT INTO fee_tiers (name, maker_fee_bps, taker_fee_bps, min_volume)
                   VALUES ($1, $2, $3, $4)""",
                [(t.name, t.maker_bps, t.taker_bps, t.min_volume) for t in schedule],
            )
            seq = await self._next_fee_seq(conn)
            await conn.execute(
                """INSERT INTO fee_tier_changes (seq, request_id, request_hash, schedule,
                       reason, changed_by, change_time)
                   VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7)""",
                seq,
                request_id,
                request_hash,
                _schedule_json(schedule),
                reason,
                changed_by,
                now,
            )
            await conn.execute("UPDATE fee_meta SET schedule_time = $1", now)
            return await self._apply_volume_tiers(
                conn, schedule, reason=f"schedule {request_id}", changed_by=changed_by, now=now
            )

    async def set_account_fee_tier(
        self,
        account_id: str,
        tier: str,
        *,
        request_id: str,
        request_hash: str,
        reason: str,
        changed_by: str,
        now: datetime,
    ) -> Account | None:
        """Assign `tier` (empty: back to the volume tier); None for an unknown account.
        Idempotent on request_id (a retry returns the account as it is now)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM fee_meta FOR UPDATE")
            row = await conn.fetchrow(
                "SELECT * FROM accounts WHERE account_id = $1 FOR UPDATE", account_id
            )
            if row is None:
                return None
            if await self._done_fee_request(conn, request_id, request_hash):
                return _account(row)
            schedule, _ = await self.fee_schedule(conn)
            if tier and all(t.name != tier for t in schedule):
                raise InvalidArgument(
                    "AUTH_UNKNOWN_FEE_TIER",
                    f"no tier {tier!r} in the fee schedule",
                    violations=[
                        FieldViolation(
                            "fee_tier", "a tier of the fee schedule", "AUTH_UNKNOWN_FEE_TIER"
                        )
                    ],
                )
            wanted = tier or tier_for_volume(schedule, row["traded_volume"] or Decimal(0))
            row = await self._set_tier(
                conn,
                account_id,
                wanted,
                bool(tier),
                reason=reason,
                changed_by=changed_by,
                now=now,
                request=(request_id, request_hash),
            )
            return _account(row)

    async def measure_volumes(
        self, volumes: Mapping[str, Decimal], *, changed_by: str, now: datetime
    ) -> tuple[int, list[TierChange]]:
        """Keep each account's newly measured volume (accounts not in `volumes`
        traded nothing in the window) and move the accounts on volume tiers to the
        tier it gives. (accounts measured, the changes)."""
        ids, amounts = list(volumes), [volumes[a] for a in volumes]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM fee_meta FOR UPDATE")
            await conn.execute(
                """UPDATE accounts SET traded_volume = 0
                   WHERE traded_volume > 0 AND NOT account_id = ANY($1::text[])""",
                ids,
            )
            measured = await conn.fetchval(
                """WITH v AS (SELECT * FROM unnest($1::text[], $2::numeric[]) AS v(id, volume)),
                        u AS (UPDATE accounts a SET traded_volume = v.volume FROM v
                              WHERE a.account_id = v.id RETURNING 1)
                   SELECT count(*) FROM u""",
                ids,
                amounts,
            )
            await conn.execute("UPDATE fee_meta SET measure_time = $1", now)
            schedule, _ = await self.fee_schedule(conn)
            changes = await self._apply_volume_tiers(
                conn, schedule, reason="30-day volume", changed_by=changed_by, now=now
            )
            return int(measured), changes

    async def publish_fee_changes(
        self, publish: Callable[[list[FeeChange]], Awaitable[None]], limit: int = 100
    ) -> int:
        """As publish_state_changes, for the fee-tier changes."""

        async def changes(rows: list[asyncpg.Record]) -> None:
            await publish([_fee_change(r) for r in rows])

        return await relay_outbox_rows(
            self.pool,
            turn="auth.fee-outbox",
            table="fee_tier_changes",
            key="seq",
            columns="seq, account_id, fee_tier, assigned, schedule::text AS schedule, change_time",
            publish=changes,
            limit=limit,
        )
