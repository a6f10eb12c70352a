"""Partitions of the source key space: half-open ranges open at both ends, plus a bucket for NULL keys, plus
(with ``partition_key=account``) *lanes*: explicit lists of large Accounts loaded on their own, and *groups*: several
serial partitions loaded by one task, one internal batch of each per Bulk job (``members``).

A partition travels through XCom as a small dict (``Partition.to_dict``); it never carries rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PARTITION_KEYS = ("external_id", "account")


@dataclass(frozen=True)
class Partition:
    """Rows whose partition column is in ``[lower, upper)``; ``None`` bounds are open; ``null_bucket`` is IS NULL.

    ``accounts`` (a lane): the rows whose partition column is one of these values; bounds unused unless
    ``with_range``, which adds the rows in ``[lower, upper)`` (minus ``exclude``) to fill the lane's last batch.
    ``exclude``: values inside ``[lower, upper)`` that belong to lanes.
    ``members``: a group of serial partitions (their own bounds; this one's are unused) that one task loads together,
    each Bulk job holding one internal batch of each member (see ``group_partitions``).
    """

    index: int
    count: int
    key: str  # "external_id" or "account"
    lower: str | None
    upper: str | None
    null_bucket: bool = False
    expected_rows: int = 0
    accounts: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    with_range: bool = False
    members: tuple[Partition, ...] = ()

    @property
    def serial(self) -> bool:
        """Loaded one Bulk job of at most one internal batch at a time (see ``LoadPartitionOperator``), so that no
        two batches of an Account partition ever run at once."""
        return self.key == "account"

    @property
    def label(self) -> str:
        """What the Airflow UI shows for this map index, e.g. ``P03 [OPP-0420…, OPP-0630)``."""
        if self.members:
            n = len(self.members)
            return f"P{self.index:02d} {n} lanes " + ", ".join(m.tag for m in self.members[:3]) + \
                (f" +{n - 3}" if n > 3 else "")
        if self.null_bucket:
            return f"P{self.index:02d} NULL {self.key}"
        lo = "−∞" if self.lower is None else _short(self.lower)
        hi = "+∞" if self.upper is None else _short(self.upper)
        if self.accounts:
            first = _short(self.accounts[0])
            lane = f"{self.key} {first}" if len(self.accounts) == 1 else \
                f"{len(self.accounts)} {self.key}s {first} +{len(self.accounts) - 1}"
            return f"P{self.index:02d} {lane}" + (f" & [{lo}, {hi})" if self.with_range else "")
        return f"P{self.index:02d} [{lo}, {hi})"

    @property
    def tag(self) -> str:
        """A few characters that tell a group's member apart: its first Account, its lower bound or NULL."""
        if self.null_bucket:
            return "NULL"
        if self.accounts:
            return _short(self.accounts[0])
        return "−∞" if self.lower is None else _short(self.lower)

    def to_dict(self) -> dict[str, Any]:
        # Lists, not tuples: XCom stores JSON (a tuple would be stored with its Python class).
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "accounts": list(self.accounts),
                "exclude": list(self.exclude), "members": [m.to_dict() for m in self.members], "label": self.label}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        fields: dict[str, Any] = {k: data[k] for k in ("index", "count", "key", "lower", "upper", "null_bucket",
                                                        "expected_rows", "with_range") if k in data}
        for name in ("accounts", "exclude"):
            if data.get(name):
                fields[name] = tuple(data[name])
        if data.get("members"):
            fields["members"] = tuple(cls.from_dict(m) for m in data["members"])
        return cls(**fields)

    @property
    def bounds(self) -> list[Any]:
        """What identifies the partition's rows (a ledger written for other bounds is never resumed)."""
        if self.members:
            return [self.key, "members", [m.bounds for m in self.members]]
        bounds: list[Any] = [self.key, self.lower, self.upper, self.null_bucket]
        if self.accounts or self.exclude:
            bounds += [list(self.accounts), list(self.exclude)]
        if self.with_range:
            bounds.append("with_range")
        return bounds

    def contains(self, value: str | None) -> bool:
        if self.members:
            return any(m.contains(value) for m in self.members)
        if self.null_bucket:
            return value is None
        if value is None:
            return False
        if value in self.accounts:
            return True
        if self.accounts and not self.with_range:
            return False
        return (self.lower is None or value >= self.lower) and (self.upper is None or value < self.upper) \
            and value not in self.exclude


def group_partitions(partitions: Sequence[Partition], per_group: int) -> list[Partition]:
    """Serial partitions in groups of up to ``per_group`` (one task each), similar sizes together: a group's jobs hold
    one batch of each member, so a group takes as many jobs as its largest member has batches.

    With ``per_group`` 1 (or partitions that are not serial) the partitions are returned as they are.
    """
    if per_group <= 1 or len(partitions) <= 1 or not all(p.serial for p in partitions):
        return list(partitions)
    ordered = sorted(partitions, key=lambda p: -p.expected_rows)
    count = -(-len(ordered) // per_group)
    # Consecutive slices of the size order (round robin would mix the largest with the smallest).
    size, extra = divmod(len(ordered), count)
    groups: list[Partition] = []
    start = 0
    for g in range(count):
        end = start + size + (1 if g < extra else 0)
        members = tuple(ordered[start:end])
        groups.append(Partition(index=g, count=count, key=members[0].key, lower=None, upper=None,
                                expected_rows=sum(m.expected_rows for m in members), members=members))
        start = end
    return groups


def _short(value: str, width: int = 12) -> str:
    return value if len(value) <= width else value[:width] + "…"


def partition_column(partition: Partition, key_column: str, account_column: str) -> str:
    return account_column if partition.key == "account" else key_column


def order_columns(partition: Partition, key_column: str, account_column: str) -> list[str]:
    """Rows stream in this order; ``account`` keeps one Account's Opportunities together (no lock contention)."""
    return [account_column, key_column] if partition.key == "account" else [key_column]


def quote_ident(name: str) -> str:
    """A double-quoted SQL identifier (names come from the validated settings file, never from data)."""
    return '"' + name.replace('"', '""') + '"'


def range_query(partition: Partition, *, dmo: str, columns: list[str], key_column: str, account_column: str,
                resume_after: list[str | None] | None = None) -> tuple[str, dict[str, Any]]:
    """SQL and ``sqlParameters`` values that select one partition's rows in stream order.

    ``resume_after`` is the ordering key of the last row already committed (``order_columns`` order): the
    query then starts strictly after it, so a retried task never re-reads committed rows. Values from data
    are parameters, never text in the SQL.
    """
    part_col = quote_ident(partition_column(partition, key_column, account_column))
    order = order_columns(partition, key_column, account_column)
    where: list[str] = []
    params: dict[str, Any] = {}
    if partition.null_bucket:
        where.append(f"{part_col} IS NULL")
    elif partition.accounts and not partition.with_range:
        where.append(f"{part_col} IN ({value_list('lane', partition.accounts, params)})")
    else:
        in_range: list[str] = []
        if partition.lower is not None:
            in_range.append(f"{part_col} >= :lower")
            params["lower"] = partition.lower
        if partition.upper is not None:
            in_range.append(f"{part_col} < :upper")
            params["upper"] = partition.upper
        if partition.lower is None and partition.upper is None:
            # The only data partition (n=1): "(-inf, +inf)" must still leave NULL keys to the NULL bucket.
            in_range.append(f"{part_col} IS NOT NULL")
        if partition.exclude:
            in_range.append(f"{part_col} NOT IN ({value_list('ex', partition.exclude, params)})")
        if partition.accounts:  # a lane that also takes a range
            where.append(f"({part_col} IN ({value_list('lane', partition.accounts, params)}) OR ("
                         + " AND ".join(in_range) + "))")
        else:
            where += in_range
    if resume_after is not None:
        where.append(_after_predicate(order, resume_after, params))
    sql = f"SELECT {', '.join(quote_ident(c) for c in columns)} FROM {quote_ident(dmo)}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    # NULLS FIRST spelled out: Data Cloud (Hyper, like PostgreSQL) puts NULLs LAST for ASC by default, and
    # ``_after_predicate`` resumes assuming they come first; under NULLS LAST a resume after (account, key)
    # skipped the account's NULL-key rows that came after it.
    sql += " ORDER BY " + ", ".join(f"{quote_ident(c)} NULLS FIRST" for c in order)
    return sql, params


def value_list(prefix: str, values: Sequence[str], params: dict[str, Any]) -> str:
    """``:lane_0, :lane_1, …`` with each value added to ``params`` (values from data are never SQL text)."""
    names = []
    for i, value in enumerate(values):
        params[f"{prefix}_{i}"] = value
        names.append(f":{prefix}_{i}")
    return ", ".join(names)


def _after_predicate(order: list[str], after: list[str | None], params: dict[str, Any]) -> str:
    """Lexicographic ``(c1, c2) > (v1, v2)`` spelled out, NULL-safe for the leading column of the NULL bucket."""
    terms = []
    for i, column in enumerate(order):
        eqs = []
        for j in range(i):
            name = f"after_{j}"
            if after[j] is None:
                eqs.append(f"{quote_ident(order[j])} IS NULL")
            else:
                params[name] = after[j]
                eqs.append(f"{quote_ident(order[j])} = :{name}")
        if after[i] is None:
            # Everything non-NULL sorts after NULL (NULLS FIRST in our ORDER BY for this column).
            terms.append("(" + " AND ".join([*eqs, f"{quote_ident(column)} IS NOT NULL"]) + ")")
        else:
            params[f"after_{i}"] = after[i]
            terms.append("(" + " AND ".join([*eqs, f"{quote_ident(column)} > :after_{i}"]) + ")")
    return "(" + " OR ".join(terms) + ")"
