"""auth's rules, without I/O, clocks or randomness (those are passed in).

Accounts, API keys (secrets kept only as scrypt hashes), who may act on which
account, what a token may carry and for how long, when signing keys rotate, and
fee tiers: what a schedule may hold and which tier a volume earns (ADR 0016).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from services.chassis import (
    AuthContext,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Violations,
)
from services.chassis import owned_account as chassis_owned_account
from services.chassis.money import MoneyError, parse_decimal

__all__ = [
    "BASE_TIER",
    "MAX_SUB_ACCOUNTS",
    "SCOPES",
    "Account",
    "ApiKey",
    "FeeTier",
    "KeyState",
    "SigningKey",
    "TierChange",
    "check_issue",
    "check_new_sub_account",
    "hash_secret",
    "owned_account",
    "parse_schedule",
    "rotation_due",
    "secret_matches",
    "tier_for_volume",
    "token_ttl",
    "validate_cidrs",
    "validate_new_key",
    "volume_tiers",
]

SCOPES = ("read", "trade", "withdraw", "admin")
# scrypt cost: 2**14 x 8 x 1 takes 16 MiB and tens of milliseconds per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class KeyState:
    ACTIVE = 1
    REVOKED = 2
    EXPIRED = 3


class AccountState:
    ACTIVE = 1
    SUSPENDED = 2
    CLOSED = 3


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    display_name: str
    email: str
    type: int
    state: int
    fee_tier: str
    create_time: datetime
    update_time: datetime
    fee_tier_assigned: bool = False
    traded_volume: Decimal | None = None  # 30-day, as last measured
    master_account_id: str = ""  # a sub-account's master (ADR 0017)


@dataclass(frozen=True, slots=True)
class ApiKey:
    api_key_id: str
    account_id: str
    label: str
    scopes: tuple[str, ...]
    allowed_cidrs: tuple[str, ...]
    state: int
    secret_prefix: str
    secret_hash: str
    create_time: datetime
    expire_time: datetime | None = None
    revoke_time: datetime | None = None
    last_used_time: datetime | None = None

    def state_at(self, now: datetime) -> int:
        if self.state == KeyState.ACTIVE and self.expire_time and self.expire_time <= now:
            return KeyState.EXPIRED
        return self.state


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_pem: bytes
    create_time: datetime
    activate_time: datetime  # signs from here (published in the JWKS before that)
    retire_time: datetime | None  # leaves the JWKS here (after its last token expired)


# ---- secrets -------------------------------------------------------------------


def hash_secret(secret: str, salt: bytes, *, n: int = SCRYPT_N) -> str:
    digest = hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024 * 1024
    )
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def secret_matches(secret: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(
        secret.encode(),
        salt=bytes.fromhex(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        maxmem=64 * 1024 * 1024,
    )
    return hmac.compare_digest(candidate.hex(), digest)


# ---- who may act on what -------------------------------------------------------


def owned_account(ctx: AuthContext, requested: str, *, resource: str = "account") -> str:
    """The account a call acts on (see `services.chassis.owned_account`)."""
    return chassis_owned_account(ctx, requested, component="AUTH", resource=resource)


# Every token a master is issued lists its subs (ADR 0017): the bound keeps
# the token (and each verification's JSON) small.
MAX_SUB_ACCOUNTS = 100


def no_such_account() -> NotFound:
    return NotFound("AUTH_ACCOUNT_NOT_FOUND", "no such account")


def found_account(account: Account | None) -> Account:
    """The account a call names, which must exist (None: NOT_FOUND)."""
    if account is None:
        raise no_such_account()
    return account


def check_new_sub_account(master: Account | None, sub_count: int) -> None:
    """May `master` (None: no such account) have one more sub-account?"""
    master = found_account(master)
    if master.master_account_id:
        raise FailedPrecondition(
            "AUTH_SUB_ACCOUNT_NESTED", "a sub-account cannot have sub-accounts of its own"
        )
    if master.state != AccountState.ACTIVE:
        raise FailedPrecondition(
            "AUTH_ACCOUNT_NOT_ACTIVE", "only an active account can create sub-accounts"
        )
    if sub_count >= MAX_SUB_ACCOUNTS:
        raise FailedPrecondition(
            "AUTH_SUB_ACCOUNT_LIMIT",
            f"an account has at most {MAX_SUB_ACCOUNTS} sub-accounts",
            metadata={"limit": str(MAX_SUB_ACCOUNTS)},
        )


def validate_cidrs(cidrs: Iterable[str]) -> tuple[str, ...]:
    normalized, violations = [], []
    for i, cidr in enumerate(cidrs):
        try:
            normalized.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
        except ValueError:
            violations.append(FieldViolation(f"allowed_cidrs[{i}]", f"{cidr!r} is not a CIDR"))
    if violations:
        raise InvalidArgument("AUTH_INVALID_CIDR", "bad allow-list entry", violations=violations)
    return tuple(normalized)


def validate_new_key(
    ctx: AuthContext,
    scopes: Sequence[str],
    cidrs: Sequence[str],
    expire_time: datetime | None,
    now: datetime,
) -> None:
    """A key may grant only what its creator holds (admins and services: anything)."""
    if not scopes:
        raise InvalidArgument(
            "AUTH_SCOPE_REQUIRED",
            "an API key needs at least one scope",
            violations=[FieldViolation("scopes", "at least one of read, trade, withdraw, admin")],
        )
    if not (ctx.is_service or ctx.can("admin")):
        beyond = set(scopes) - ctx.scopes
        if beyond:
            raise PermissionDenied(
                "AUTH_SCOPE_MISSING",
                f"cannot grant scopes the caller lacks: {', '.join(sorted(beyond))}",
                metadata={"missing_scopes": " ".join(sorted(beyond))},
            )
    if "withdraw" in scopes and not cidrs:
        raise InvalidArgument(
            "AUTH_ALLOW_LIST_REQUIRED",
            "a key with the withdraw scope needs an IP allow-list",
            violations=[FieldViolation("allowed_cidrs", "required with the withdraw scope")],
        )
    if expire_time is not None and expire_time <= now:
        raise InvalidArgument(
            "AUTH_INVALID_EXPIRE_TIME",
            "expire_time is in the past",
            violations=[FieldViolation("expire_time", "must be in the future")],
        )


# ---- issuing tokens ----------------------------------------------------------


def _invalid() -> Unauthenticated:
    # One answer for unknown key and wrong secret: nothing to probe.
    return Unauthenticated("AUTH_INVALID_CREDENTIALS", "unknown API key or wrong secret")


def check_issue(
    key: ApiKey | None,
    account: Account | None,
    *,
    secret_ok: bool,
    client_ip: str,
    requested: Sequence[str],
    now: datetime,
) -> tuple[str, ...]:
    """The scopes a token may carry, or why none is issued."""
    if key is None or account is None or not secret_ok:
        raise _invalid()
    state = key.state_at(now)
    if state == KeyState.REVOKED:
        raise Unauthenticated("AUTH_KEY_REVOKED", "this API key was revoked")
    if state == KeyState.EXPIRED:
        raise Unauthenticated("AUTH_KEY_EXPIRED", "this API key has expired")
    if account.state not in (AccountState.ACTIVE, AccountState.SUSPENDED):
        raise PermissionDenied("AUTH_ACCOUNT_NOT_ACTIVE", "the account is closed")
    if key.allowed_cidrs and not _allowed(client_ip, key.allowed_cidrs):
        raise Unauthenticated(
            "AUTH_ADDRESS_NOT_ALLOWED",
            f"caller address {client_ip or 'unknown'} is not in this key's allow-list",
            metadata={"client_address": client_ip},
        )
    beyond = set(requested) - set(key.scopes)
    if beyond:
        raise PermissionDenied(
            "AUTH_SCOPE_MISSING",
            f"the key lacks scope {', '.join(sorted(beyond))}",
            metadata={"missing_scopes": " ".join(sorted(beyond))},
        )
    granted = tuple(sorted(set(requested))) if requested else key.scopes
    if account.state == AccountState.SUSPENDED:
        # Frozen: no trading, no withdrawals; the owner can still look.
        granted = tuple(s for s in granted if s == "read")
        if not granted:
            raise PermissionDenied(
                "AUTH_ACCOUNT_SUSPENDED", "the account is suspended: only read access"
            )
    return granted


def _allowed(client_ip: str, cidrs: Iterable[str]) -> bool:
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(c, strict=False) for c in cidrs)


def token_ttl(requested_s: int, *, default_s: int, max_s: int) -> int:
    if requested_s < 0:
        raise InvalidArgument(
            "AUTH_INVALID_TTL",
            "ttl must not be negative",
            violations=[FieldViolation("ttl", "must be positive")],
        )
    return min(requested_s or default_s, max_s)


# ---- signing key rotation ----------------------------------------------------


def rotation_due(keys: Sequence[SigningKey], now: datetime, *, rotate_after: timedelta) -> bool:
    """A new key is due when none exists or the newest one is older than `rotate_after`."""
    if not keys:
        return True
    newest = max(keys, key=lambda k: k.activate_time)
    return now - newest.activate_time >= rotate_after


def signing_key(keys: Sequence[SigningKey], now: datetime) -> SigningKey | None:
    """The newest key already active: the one that signs."""
    active = [k for k in keys if k.activate_time <= now]
    return max(active, key=lambda k: k.activate_time) if active else None


def published(keys: Sequence[SigningKey], now: datetime) -> list[SigningKey]:
    """The JWKS: every key not retired yet, including the next one (pre-published)."""
    return [k for k in keys if k.retire_time is None or k.retire_time > now]


# ---- fee tiers -----------------------------------------------------------------
#
# A schedule is a list of tiers, each with maker and taker rates in basis points
# of what the party receives and the 30-day traded volume from which an account
# earns it. "default" is every new account's tier and the lowest (min_volume 0).
# An account's tier is the one an operator assigned, else the highest tier its
# measured volume reaches (up and down: a quiet month moves it back).

BASE_TIER = "default"
MAX_TIERS = 32
MIN_MAKER_BPS = Decimal(-100)  # a 1 % rebate: match's floor for a maker rate
MAX_BPS = Decimal(1000)  # 10 %: match's ceiling for a rate
_TIER_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")
_BPS_PLACES = 2


@dataclass(frozen=True, slots=True)
class FeeTier:
    name: str
    maker_bps: Decimal  # negative: a rebate, paid from the fee account
    taker_bps: Decimal
    min_volume: Decimal

    @property
    def maker_rate(self) -> Decimal:
        return self.maker_bps / 10_000

    @property
    def taker_rate(self) -> Decimal:
        return self.taker_bps / 10_000


@dataclass(frozen=True, slots=True)
class TierChange:
    account_id: str
    fee_tier: str


def _decimal(v: Violations, field: str, text: str, what: str) -> Decimal | None:
    """`text` as a decimal; None, with a violation saying it must be `what`, if it is not."""
    try:
        return parse_decimal(text)
    except MoneyError:
        v.add(field, what, "AUTH_INVALID_DECIMAL")
        return None


def _bps(v: Violations, field: str, text: str, low: Decimal) -> Decimal | None:
    value = _decimal(v, field, text, "a plain decimal number of basis points")
    if value is None:
        return None
    if value.as_tuple().exponent < -_BPS_PLACES:  # type: ignore[operator]
        v.add(field, f"at most {_BPS_PLACES} decimals", "AUTH_FEE_BPS_TOO_PRECISE")
        return None
    if not low <= value <= MAX_BPS:
        v.add(field, f"from {low} to {MAX_BPS} basis points", "AUTH_FEE_BPS_OUT_OF_RANGE")
        return None
    return value


def _min_volume(v: Violations, at: str, name: str, text: str) -> Decimal | None:
    value = _decimal(v, at, text, "a plain decimal number")
    if value is None:
        return None
    problem = ""
    if value < 0:
        problem = "not negative"
    elif name == BASE_TIER and value != 0:
        problem = f"{BASE_TIER!r} starts at 0"
    elif name != BASE_TIER and value == 0:
        problem = f"only {BASE_TIER!r} starts at 0"
    if problem:
        v.add(at, problem, "AUTH_INVALID_MIN_VOLUME")
        return None
    return value


def _tier(v: Violations, i: int, row: tuple[str, str, str, str]) -> FeeTier | None:
    name, maker, taker, volume = row
    at = f"tiers[{i}]."
    if not _TIER_NAME.match(name):
        v.add(at + "name", "1 to 32 of a-z, 0-9, _ and -", "AUTH_INVALID_TIER_NAME")
    maker_bps = _bps(v, at + "maker_fee_bps", maker, MIN_MAKER_BPS)
    taker_bps = _bps(v, at + "taker_fee_bps", taker, Decimal(0))
    min_volume = _min_volume(v, at + "min_volume", name, volume)
    if maker_bps is None or taker_bps is None or min_volume is None:
        return None
    return FeeTier(name, maker_bps, taker_bps, min_volume)


def parse_schedule(tiers: Sequence[tuple[str, str, str, str]]) -> tuple[FeeTier, ...]:
    """(name, maker_bps, taker_bps, min_volume) rows as a schedule, by min_volume
    ascending; INVALID_ARGUMENT `AUTH_INVALID_FEE_SCHEDULE` with every violation."""
    v = Violations()
    if not tiers:
        v.add("tiers", f"at least one tier ({BASE_TIER!r})", "AUTH_FIELD_REQUIRED")
    if len(tiers) > MAX_TIERS:
        v.add("tiers", f"at most {MAX_TIERS} tiers", "AUTH_TOO_MANY_TIERS")
    parsed: dict[int, FeeTier] = {}
    for i, row in enumerate(tiers[:MAX_TIERS]):
        tier = _tier(v, i, row)
        if tier is None:
            continue
        if any(t.name == tier.name for t in parsed.values()):
            v.add(f"tiers[{i}].name", f"{tier.name!r} appears twice", "AUTH_DUPLICATE_TIER")
        elif any(t.min_volume == tier.min_volume for t in parsed.values()):
            v.add(f"tiers[{i}].min_volume", "another tier has it", "AUTH_INVALID_MIN_VOLUME")
        else:
            parsed[i] = tier
    if tiers and all(row[0] != BASE_TIER for row in tiers):
        v.add("tiers", f"must include {BASE_TIER!r} (min_volume 0)", "AUTH_BASE_TIER_REQUIRED")
    # The fees of any trade cover its rebate: a rebate tier's maker may meet the
    # cheapest taker.
    rebate = max((-t.maker_bps for t in parsed.values()), default=Decimal(0))
    for i, tier in parsed.items():
        if tier.taker_bps < rebate:
            v.add(
                f"tiers[{i}].taker_fee_bps",
                f"at least the largest maker rebate of the schedule ({rebate})",
                "AUTH_TAKER_FEE_BELOW_REBATE",
            )
    v.raise_if_any("AUTH_INVALID_FEE_SCHEDULE")
    return tuple(sorted(parsed.values(), key=lambda t: t.min_volume))


def tier_for_volume(schedule: Sequence[FeeTier], volume: Decimal) -> str:
    """The highest tier whose threshold `volume` reaches (`schedule` by min_volume)."""
    found = BASE_TIER
    for tier in schedule:
        if volume >= tier.min_volume:
            found = tier.name
    return found


def volume_tiers(
    schedule: Sequence[FeeTier],
    accounts: Iterable[tuple[str, str, bool, Decimal | None]],
    volumes: Mapping[str, Decimal] | None = None,
) -> list[TierChange]:
    """The accounts whose tier their volume changes: (account, tier, assigned,
    last volume) rows, with `volumes` newly measured (an account measured without
    fills has volume 0); assigned tiers stay (an operator's choice overrides)."""
    changes = []
    for account_id, tier, assigned, last in accounts:
        if assigned:
            continue
        volume = volumes.get(account_id, Decimal(0)) if volumes is not None else last
        wanted = tier_for_volume(schedule, volume or Decimal(0))
        if wanted != tier:
            changes.append(TierChange(account_id, wanted))
    return changes
