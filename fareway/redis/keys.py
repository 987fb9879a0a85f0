"""Every Redis key Fareway uses, built here and nowhere else (Lua scripts get theirs as KEYS).

Keys are hash-tagged by what they belong to, so that the keys one script or transaction touches
share a Redis Cluster slot (a cluster refuses a script or a MULTI across slots: CROSSSLOT):

  team      fw:{<team>}:...           a team's limits, budgets, spend, ledger, rollups and request ids
  model     fw:fair:{<model>}, fw:{routing:<model>}:...   a model's fair-share counters, prefix homes
  worker    fw:{worker:<id>}:...      a worker's device time
  registry  fw:{registry}:...         the workers and gateways alive now (entries expire in seconds)
  gateway   fw:{gateway:<id>}:...     a gateway's journal of runs in flight and its liveness
  global    fw:...                    API keys, the price book, and the indexes of teams and workers

A global key is untagged, read and written on its own, never in a script or a transaction with another
key, so the global keys spread over the cluster (every request's key lookup is not one node's). Where
two are written together they are written in an order that leaves no harm half done: an API key before
its index entry (fareway/auth.py), a price book version before the current version names it
(accounting/pricebook_store.py); a recorded team joins fw:teams beside, not inside, the ledger script.
tests/fareway/test_redis_cluster.py checks every script call and transaction for one slot.

Team family                      holds
  limits                         scope -> its rate limits and fair share (fareway/quota.py)
  rate                           <scope>:rpm, <scope>:tpm -> theoretical arrival time (us)
  inflight:<scope>               sorted set: request id -> when its concurrency slot lapses (us)
  budgets                        scope -> its monthly budget
  spend:<YYYY-MM>                <scope>:<basis>, <scope>:reserved_<basis> -> nano-dollars
  reservations                   <project>:<request id> -> what a running request holds
  alerts                         stream of soft-budget crossings
  ledger                         stream of usage records (accounting/ledger.py)
  usage:<project>:<request id>   the ledger entry of a recorded request (deduplication)
  rollup:<level>:<bucket>        rollups by hour (h) and month (m) (accounting/rollups.py)
  rollup:<level>                 sorted set: the level's buckets, scored by their start
  idem:<project>:<request id>    a request_id's claim and outcome (gateway/idempotency.py)
"""

from __future__ import annotations

import hashlib

PREFIX = "fw"

# --- global ---------------------------------------------------------------------------------------

API_KEYS = "fw:apikeys"
"""hash: key id -> the key's entry (api_key below)."""
API_KEY_REVOCATIONS = "fw:apikeys:revoked"
"""A pub/sub channel (not a key): the digest of each key revoked, for gateways caching keys."""
TEAMS = "fw:teams"
"""set: every team that recorded usage."""
PRICE_BOOK_VERSIONS = "fw:pricebook:versions"
"""hash: version -> the price book (JSON); versions are immutable."""
PRICE_BOOK_CURRENT = "fw:pricebook:current"
"""The version in force."""
DEVICE_TIME_WORKERS = "fw:capacity:workers"
"""set: every worker that reported device time."""


def api_key(key: str) -> str:
    """hash: one API key's team, project, role and dates, under its SHA-256 digest (never the key)."""
    return f"fw:apikey:{hashlib.sha256(key.encode()).hexdigest()}"


# --- team ------------------------------------------------------------------------------------------

def _team(team: str, rest: str) -> str:
    return f"fw:{{{team}}}:{rest}"


def limits(team: str) -> str:
    return _team(team, "limits")


LIMITS_PATTERN = "fw:{*}:limits"
"""SCAN pattern of every team's limits (an admin's listing, never the request path)."""


def team_of(key: str) -> str:
    """The team a team key belongs to."""
    return key.split("{", 1)[1].split("}", 1)[0]


def rate(team: str) -> str:
    return _team(team, "rate")


def inflight(team: str, scope: str) -> str:
    return _team(team, f"inflight:{scope}")


def budgets(team: str) -> str:
    return _team(team, "budgets")


def spend(team: str, month: str) -> str:
    return _team(team, f"spend:{month}")


def reservations(team: str) -> str:
    return _team(team, "reservations")


def alerts(team: str) -> str:
    return _team(team, "alerts")


def ledger(team: str) -> str:
    return _team(team, "ledger")


def recorded(team: str, project: str, request_id: str) -> str:
    return _team(team, f"usage:{project}:{request_id}")


def rollup(team: str, level: str, bucket: str) -> str:
    return _team(team, f"rollup:{level}:{bucket}")


def rollup_index(team: str, level: str) -> str:
    return _team(team, f"rollup:{level}")


def request_id_claim(team: str, project: str, request_id: str) -> str:
    return _team(team, f"idem:{project}:{request_id}")


# --- model -----------------------------------------------------------------------------------------

def fair_counters(model: str) -> str:
    """hash: "team<US>project" -> the tenant's virtual token counter (gateway/fair_counters.py)."""
    return f"fw:fair:{{{model}}}"


def prefix_homes(model: str) -> tuple[str, str, str]:
    """The model's prefix homes (gateway/shared_homes.py): homes (prefix digest -> worker and tokens),
    used (sorted set: digest -> last claimed) and held (worker -> prefix tokens homed on it)."""
    prefix = f"fw:{{routing:{model}}}:"
    return prefix + "homes", prefix + "used", prefix + "held"


# --- worker ----------------------------------------------------------------------------------------

def device_time(worker_id: str, hour: str) -> str:
    """hash: device_ns, idle_ns of one worker in one hour (accounting/capacity.py)."""
    return f"fw:{{worker:{worker_id}}}:capacity:{hour}"


def device_time_hours(worker_id: str) -> str:
    """sorted set: the hours a worker reported, scored by their start."""
    return f"fw:{{worker:{worker_id}}}:capacity:hours"


def worker_info(worker_id: str) -> str:
    """hash: a worker's hardware class, device count and model, as it last reported them."""
    return f"fw:{{worker:{worker_id}}}:info"


# --- registry --------------------------------------------------------------------------------------

REGISTERED_WORKERS = "fw:{registry}:workers"
"""sorted set: worker id -> when its entry expires (unix s) (fareway/registry.py)."""


def registered_worker(worker_id: str) -> str:
    """hash: a worker's registration and its latest load; expires unless renewed."""
    return f"fw:{{registry}}:worker:{worker_id}"


def gateways(model: str) -> str:
    """sorted set: gateway id -> when its membership lapses (unix s), for the replicas serving a model."""
    return f"fw:{{registry}}:gateways:{model}"


# --- gateway ---------------------------------------------------------------------------------------

JOURNALED_GATEWAYS = "fw:journal:gateways"
"""set: the gateways that journaled runs (gateway/journal.py)."""


def gateway_journal(gateway_id: str) -> str:
    """hash: call id -> a run the gateway sent to a worker and has not recorded yet."""
    return f"fw:{{gateway:{gateway_id}}}:journal"


def gateway_alive(gateway_id: str) -> str:
    """Exists while the gateway runs (it renews the key's expiry)."""
    return f"fw:{{gateway:{gateway_id}}}:alive"


def gateway_sweeping(gateway_id: str) -> str:
    """Held (with an expiry) by the gateway sweeping a lapsed gateway's journal."""
    return f"fw:{{gateway:{gateway_id}}}:sweeping"
