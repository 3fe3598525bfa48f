"""Frozen accounts (issue 21): the copy every service keeps of auth's SUSPENDED and
CLOSED accounts, from the push and the backstop reload, and the authenticator's
refusals of a frozen account's calls that need more than `read`."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cex.auth.v1 import auth_pb2
from services.chassis import INTERNAL, AccountStates, ExchangeError, Policy, user
from services.chassis.authn import ON_BEHALF_HEADER, Authenticator
from services.chassis.interceptors import _rechecked
from services.chassis.tokens import StaticKeys, sign

ACTIVE = auth_pb2.ACCOUNT_STATE_ACTIVE
SUSPENDED = auth_pb2.ACCOUNT_STATE_SUSPENDED
CLOSED = auth_pb2.ACCOUNT_STATE_CLOSED


def _change(seq: int, account: str, state: int) -> auth_pb2.AccountStateChange:
    return auth_pb2.AccountStateChange(change_seq=seq, account_id=account, state=state)


class Auth:
    """auth's truth, as GetFrozenAccounts answers it."""

    def __init__(self) -> None:
        self.seq = 0
        self.states: dict[str, tuple[int, int]] = {}
        self.loads = 0

    def change(self, account: str, state: int) -> auth_pb2.AccountStateChange:
        self.seq += 1
        self.states[account] = (state, self.seq)
        return _change(self.seq, account, state)

    async def load(self) -> auth_pb2.GetFrozenAccountsResponse:
        self.loads += 1
        return auth_pb2.GetFrozenAccountsResponse(
            change_seq=self.seq,
            accounts=[
                _change(seq, account, state)
                for account, (state, seq) in self.states.items()
                if state != ACTIVE
            ],
        )


def _frozen(states: AccountStates) -> dict[str, int]:
    return {a: f.state for a in ("a", "b", "c") if (f := states.frozen(a)) is not None}


async def test_the_push_freezes_and_reactivates_in_sequence() -> None:
    auth = Auth()
    states = AccountStates(auth.load)
    await states.reload()
    states.apply(auth.change("a", SUSPENDED))
    states.apply(auth.change("b", CLOSED))
    assert _frozen(states) == {"a": SUSPENDED, "b": CLOSED} and states.change_seq == 2
    states.apply(auth.change("a", ACTIVE))
    assert _frozen(states) == {"b": CLOSED} and states.change_seq == 3
    states.apply(_change(1, "a", SUSPENDED))  # a redelivery of an old change
    assert _frozen(states) == {"b": CLOSED}
    assert not states._wake.is_set()  # in sequence: no reload asked


async def test_a_missed_push_is_a_gap_and_the_reload_catches_it() -> None:
    auth = Auth()
    states = AccountStates(auth.load)
    await states.reload()
    auth.change("a", SUSPENDED)  # its push is lost
    states.apply(auth.change("b", SUSPENDED))
    assert _frozen(states) == {"b": SUSPENDED}  # the change heard is applied at once...
    assert states.change_seq == 0 and states._wake.is_set()  # ...and the gap asks for a reload
    await states.reload()
    assert _frozen(states) == {"a": SUSPENDED, "b": SUSPENDED} and states.change_seq == 2


async def test_the_last_push_missed_is_caught_by_the_timer() -> None:
    auth = Auth()
    states = AccountStates(auth.load, reload_s=0.05)
    runner = asyncio.ensure_future(states.run())
    try:
        await asyncio.sleep(0.02)
        auth.change("c", SUSPENDED)  # no push at all, no later change to show a gap
        for _ in range(50):
            if states.frozen("c"):
                break
            await asyncio.sleep(0.01)
        assert _frozen(states) == {"c": SUSPENDED} and states.change_seq == 1
    finally:
        runner.cancel()


async def test_a_change_heard_during_a_reload_survives_its_older_answer() -> None:
    auth = Auth()
    states = AccountStates(auth.load)
    auth.change("a", SUSPENDED)
    older = await auth.load()  # auth answered at seq 1...
    states.apply(_change(1, "a", SUSPENDED))
    states.apply(auth.change("a", ACTIVE))  # ...and seq 2 arrived before the answer did
    states.replace(older)
    assert _frozen(states) == {} and states.change_seq == 2


async def test_fresh_reloads_an_old_copy_and_is_unavailable_without_auth() -> None:
    now = [100.0]
    auth = Auth()
    states = AccountStates(auth.load, clock=lambda: now[0])
    await states.fresh(10.0)
    await states.fresh(10.0)
    assert auth.loads == 1
    now[0] += 11
    auth.change("a", SUSPENDED)
    await states.fresh(10.0)
    assert auth.loads == 2 and states.frozen("a") is not None

    async def down() -> auth_pb2.GetFrozenAccountsResponse:
        raise OSError("auth is away")

    stale = AccountStates(down)
    with pytest.raises(ExchangeError) as refused:
        await stale.fresh(10.0)
    assert refused.value.reason == "AUTH_ACCOUNT_STATES_UNAVAILABLE"


# -- the authenticator ------------------------------------------------------------

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000
ORDER = "cex.auth.v1.AuthService"  # any service's descriptor will do: rules by method name
RULES = {
    "GetAccount": user("read"),
    "SetAccountState": user("admin"),
    "CreateApiKey": user("trade"),
    "RevokeApiKey": user(),
    "ListApiKeys": user("trade", services=True),
    "GetFrozenAccounts": INTERNAL,
}


def _token(subject: str, scopes: tuple[str, ...]) -> str:
    return sign(KEY, "k1", subject=subject, key_id="ak_1", scopes=scopes, issued_at=NOW,
                ttl_s=300, token_id="t")  # fmt: skip


async def _authenticator() -> tuple[Authenticator, AccountStates, Auth]:
    from cex.auth.v1 import auth_pb2 as a

    auth = Auth()
    states = AccountStates(auth.load)
    await states.reload()
    authn = Authenticator(
        [Policy.of(a.DESCRIPTOR.services_by_name["AuthService"], RULES)],
        StaticKeys(lambda: {"k1": KEY.public_key()}),  # type: ignore[arg-type]
        clock=lambda: NOW + 1,
        account_states=states,
    )
    return authn, states, auth


async def _outcome(authn: Authenticator, method: str, md: list[tuple[str, str]]) -> str:
    try:
        await authn.check(f"/{ORDER}/{method}", md)
    except ExchangeError as error:
        return f"{error.code.name} {error.reason}"
    return "OK"


async def test_a_frozen_account_keeps_reads_and_loses_the_rest() -> None:
    authn, states, auth = await _authenticator()
    md = [("authorization", f"Bearer {_token('acc_1', ('read', 'trade', 'admin'))}")]
    assert await _outcome(authn, "CreateApiKey", md) == "OK"
    states.apply(auth.change("acc_1", SUSPENDED))
    assert await _outcome(authn, "CreateApiKey", md) == "PERMISSION_DENIED AUTH_ACCOUNT_SUSPENDED"
    assert await _outcome(authn, "SetAccountState", md) == (
        "PERMISSION_DENIED AUTH_ACCOUNT_SUSPENDED"
    )
    assert await _outcome(authn, "GetAccount", md) == "OK"  # reads stay
    assert await _outcome(authn, "RevokeApiKey", md) == "OK"  # killing its own keys too
    states.apply(auth.change("acc_1", CLOSED))
    assert await _outcome(authn, "CreateApiKey", md) == "PERMISSION_DENIED AUTH_ACCOUNT_CLOSED"
    other = [("authorization", f"Bearer {_token('acc_2', ('trade',))}")]
    assert await _outcome(authn, "CreateApiKey", other) == "OK"


async def test_a_service_acting_on_its_own_authority_is_not_refused() -> None:
    """A follow-up a service makes for a frozen user (cancel-on-disconnect, a
    compensation) goes through; the user's own call was refused where it entered."""
    authn, states, auth = await _authenticator()
    states.apply(auth.change("acc_1", SUSPENDED))
    user_token = _token("acc_1", ("read", "trade"))
    md = [
        ("authorization", f"Bearer {_token('svc:order', ('internal',))}"),
        (ON_BEHALF_HEADER, f"Bearer {user_token}"),
    ]
    assert await _outcome(authn, "ListApiKeys", md) == "OK"
    assert await _outcome(authn, "CreateApiKey", md) == "PERMISSION_DENIED AUTH_ACCOUNT_SUSPENDED"


async def test_a_stream_is_refused_at_its_next_message_after_a_freeze() -> None:
    authn, states, auth = await _authenticator()
    md = [("authorization", f"Bearer {_token('acc_1', ('trade',))}")]
    ctx = await authn.check(f"/{ORDER}/CreateApiKey", md)
    assert ctx is not None and ctx.writes

    async def messages() -> object:
        for i in range(3):
            yield i

    seen = []
    with pytest.raises(ExchangeError) as refused:
        async for m in _rechecked(messages(), lambda: authn.still_allowed(ctx)):  # type: ignore[arg-type]
            seen.append(m)
            states.apply(auth.change("acc_1", SUSPENDED))
    assert seen == [0] and refused.value.reason == "AUTH_ACCOUNT_SUSPENDED"
