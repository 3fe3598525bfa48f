"""funding's own settings, read once from the environment, and the per-asset rules."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from services.chassis.markets import DEFAULT_CATALOG, Catalog, load_catalog
from services.chassis.settings import env_fields, env_str

__all__ = [
    "DEFAULT_APPROVAL_THRESHOLDS",
    "DEFAULT_ASSETS",
    "AssetRules",
    "FundingConfig",
    "rules_from",
    "thresholds_from",
]


@dataclass(frozen=True, slots=True)
class AssetRules:
    """How an asset moves in and out. Amounts are decimal strings in the asset's units."""

    asset: str
    network: str
    address_pattern: str
    min_withdrawal: str
    withdrawal_fee: str
    deposit_confirmations: int
    withdrawal_confirmations: int
    min_deposit: str = "0"

    def address_ok(self, address: str) -> bool:
        return re.fullmatch(self.address_pattern, address) is not None

    @property
    def min_withdrawal_decimal(self) -> Decimal:
        return Decimal(self.min_withdrawal)


_ADDRESS = {
    "bitcoin": r"(bc1|tb1|bcrt1)[02-9ac-hj-np-z]{8,87}|bcrt1q[0-9a-f]{38}",
    "ethereum": r"0x[0-9a-fA-F]{40}",
}
# Confirmations (deposit, withdrawal) per network: custody's concern, not a price.
_CONFIRMATIONS = {"bitcoin": (3, 3), "ethereum": (4, 3)}


def rules_from(catalog: Catalog) -> dict[str, AssetRules]:
    """Each withdrawable asset's rules. Its network, fee and minimum come from the
    market catalog (services/chassis/markets.py), the one place fees are kept and
    shown from (auth's GetFees); the address shapes and confirmations are funding's."""
    rules = {}
    for symbol, asset in catalog.assets.items():
        if asset.network not in _ADDRESS:
            continue
        deposit, withdrawal = _CONFIRMATIONS[asset.network]
        rules[symbol] = AssetRules(
            symbol,
            asset.network,
            _ADDRESS[asset.network],
            format(asset.min_withdrawal, "f"),
            format(asset.withdrawal_fee, "f"),
            deposit,
            withdrawal,
        )
    return rules


DEFAULT_ASSETS: Mapping[str, AssetRules] = rules_from(DEFAULT_CATALOG)

# Withdrawals of more than this (the amount, in the asset's units) wait for an
# operator's approval; an asset not named never does.
DEFAULT_APPROVAL_THRESHOLDS: Mapping[str, str] = {"BTC": "10", "ETH": "200", "USDT": "250000"}


def thresholds_from(text: str) -> dict[str, str]:
    """`FUNDING_APPROVAL_THRESHOLDS`: "BTC=10,USDT=250000" ("off": none)."""
    if text.strip().lower() == "off":
        return {}
    found = {}
    for item in text.split(","):
        if not item.strip():
            continue
        asset, sep, amount = item.partition("=")
        if not sep or not asset.strip() or Decimal(amount.strip()) < 0:
            raise ValueError(f"FUNDING_APPROVAL_THRESHOLDS: {item!r} is not ASSET=AMOUNT")
        found[asset.strip()] = amount.strip()
    return found


@dataclass(frozen=True, slots=True)
class FundingConfig:
    """
    chain_target: the chain/custody service (the simulator locally), host:port.
    ledger_target / risk_target: where LedgerService / RiskService are called;
        default the mesh (CEX_MESH_ADDR) with :authority ledger / risk.
    instance: this replica's lease owner name; a restarted replica with the same
        name takes its sagas back at once (others wait for the lease to expire).
    withdrawal_deadline_s / deposit_deadline_s: after this a saga that is not
        done is compensated or, where that is unsafe, marked STUCK.
    address_cooling_s: how long a new allowlist address waits before it is
        usable, and a turn-off of the allowlist before it takes effect.
    approval_thresholds: per asset, the amount above which a withdrawal waits
        for an operator's approval; approval_timeout_s: how long it may wait
        (from the request) before it is rejected and its hold voided;
        approval_poll_s: how often a waiting saga looks (an approve or reject
        wakes it at once).
    account_state_max_age_s: a withdrawal is broadcast only if auth answered
        the frozen accounts within this long (else they are reloaded first; if
        auth cannot answer, the broadcast waits): a missed freeze push cannot
        let a frozen account's withdrawal out.
    """

    chain_target: str = "127.0.0.1:50049"
    ledger_target: str | None = None
    risk_target: str | None = None
    instance: str = field(default_factory=socket.gethostname)
    concurrency: int = 64
    lease_s: float = 15.0
    poll_s: float = 0.2
    step_timeout_s: float = 5.0
    withdrawal_deadline_s: float = 3600.0
    deposit_deadline_s: float = 86400.0
    compensation_window_s: float = 600.0
    confirmation_poll_s: float = 0.5
    chain_poll_s: float = 0.5
    outbox_poll_s: float = 0.2
    outbox: bool = True
    watch_chain: bool = True
    address_cooling_s: float = 86400.0
    approval_thresholds: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_APPROVAL_THRESHOLDS)
    )
    approval_timeout_s: float = 86400.0
    approval_poll_s: float = 5.0
    account_state_max_age_s: float = 10.0
    assets: Mapping[str, AssetRules] = field(default_factory=lambda: dict(DEFAULT_ASSETS))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FundingConfig:
        env = os.environ if env is None else env
        return cls(
            instance=env_str(env, "FUNDING_INSTANCE", socket.gethostname()) or "funding",
            approval_thresholds=thresholds_from(
                env_str(env, "FUNDING_APPROVAL_THRESHOLDS")
                or ",".join(f"{a}={v}" for a, v in DEFAULT_APPROVAL_THRESHOLDS.items())
            ),
            assets=rules_from(load_catalog(env)),
            **env_fields(
                cls,
                env,
                "FUNDING_",
                "chain_target",
                "ledger_target",
                "risk_target",
                "concurrency",
                "lease_s",
                "poll_s",
                "step_timeout_s",
                "withdrawal_deadline_s",
                "deposit_deadline_s",
                "compensation_window_s",
                "confirmation_poll_s",
                "chain_poll_s",
                "outbox",
                "watch_chain",
                "address_cooling_s",
                "approval_timeout_s",
                "approval_poll_s",
                "account_state_max_age_s",
            ),
        )
