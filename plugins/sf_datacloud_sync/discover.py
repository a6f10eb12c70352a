"""What the ``discover`` task does: validate the whole setup, then plan balanced partitions from the real data.

Nothing here writes anywhere. The order is deliberate: every check that can fail because of a typo in the
settings file or a missing permission runs *before* a single row is sent, and all problems are reported at once,
each prefixed with the setting it concerns (``mapping.Foo__c: field Foo__c does not exist on Opportunity``).

Boundaries come from the key distribution in one SQL pass (:func:`boundary_query`): rows are grouped by the
partition column, a running ``SUM() OVER (ORDER BY key)`` gives each distinct value the number of rows sorting
before it, and only the values at which a multiple of ``total / n`` is crossed come back (about ``n`` rows, never
the whole key set). :func:`choose_cuts` then places each cut at the closest value boundary. Because cuts are
*values* and partitions are half-open ranges evaluated by Data Cloud itself, all rows sharing a value (the
Opportunities of one Account, duplicated keys) always land in the same partition, and Data Cloud's collation is
the only ordering that matters -- Python never compares two keys.

With ``partition_key=account`` every partition is loaded *serially* (one Bulk job of at most one internal batch at a
time), so no two batches that touch the same Account ever run at once, and the partitions are the org's parallel
lanes. Accounts too large for one batch (Salesforce's data-skew case) would make their range far longer than the
others; :func:`heavy_values_query` finds them and :func:`plan_lanes` packs them, largest first, into lanes of their
own no longer than the run's average partition (or the largest Account), which the ranges then exclude. Each
serial partition ends with a partial batch unless its rows are whole batches, so :func:`plan_serial` tops every
lane up with a range of small Accounts and cuts the ranges at whole batches (the boundary query then returns
candidates at a finer resolution): the run needs about as many Bulk batches as the object has rows / 10,000.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sf_datacloud_sync.utils.partitions import Partition, group_partitions, quote_ident, value_list

if TYPE_CHECKING:
    from sf_datacloud_sync.config import SyncConfig

log = logging.getLogger(__name__)

#: ``[core] max_map_length`` is 1024 and the NULL bucket takes one map index.
MAX_DATA_PARTITIONS = 1023
PARTITION_KEY_CHOICES = ("account", "external_id")
#: Most Accounts given lanes of their own (each is a query parameter of every range); larger ones beyond it stay in
#: their ranges, still loaded serially.
MAX_LANE_ACCOUNTS = 200
#: Most cut candidates the boundary query returns when asked for a finer resolution (:func:`plan_serial`).
MAX_CANDIDATES = 4096


class DiscoveryError(ValueError):
    """The setup cannot work; the message lists every problem found, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("the sync cannot start:\n" + "\n".join(f"  - {p}" for p in self.problems))


# -- balanced boundaries: pure functions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A distinct partition-column value the boundary query returned because a cut target falls inside its rows."""

    value: str
    rows: int  # rows with exactly this value
    rows_before: int  # non-NULL rows whose value sorts before it
    next_value: str | None  # the next distinct value in Data Cloud's order (None: this is the last one)


@dataclass(frozen=True)
class KeyDistribution:
    """What one pass over the partition column tells us."""

    total_rows: int
    null_rows: int  # rows whose partition column IS NULL (they form the NULL bucket)
    unkeyed_rows: int  # rows without an external id (NULL or empty): Salesforce can never upsert them
    distinct_values: int
    partitions: int  # data partitions aimed for (the SQL's own computation, see ``partition_target``)
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def non_null_rows(self) -> int:
        return self.total_rows - self.null_rows

    @property
    def keyed_rows(self) -> int:
        """Rows that carry an external id, i.e. could become an Opportunity."""
        return self.total_rows - self.unkeyed_rows


def partition_target(non_null_rows: int, partitions: int, target_partition_rows: int | None,
                     max_partitions: int = MAX_DATA_PARTITIONS) -> int:
    """How many data partitions to aim for: ``partitions``, or ``ceil(rows / target_partition_rows)`` when set.

    Always within ``1..max_partitions``. Mirrors the ``CASE`` expression in :func:`boundary_query`.
    """
    if target_partition_rows:
        wanted = (non_null_rows + target_partition_rows - 1) // target_partition_rows
    else:
        wanted = partitions
    return max(1, min(max_partitions, wanted))


def crosses_target(rows_before: int, rows: int, non_null_rows: int, partitions: int) -> bool:
    """True if some ``i * total / n`` lies in ``(rows_before, rows_before + rows]`` (the boundary query's filter)."""
    if non_null_rows <= 0:
        return False
    return (rows_before + rows) * partitions // non_null_rows != rows_before * partitions // non_null_rows


def candidates_from_counts(counts: Sequence[tuple[str, int]], partitions: int) -> list[Candidate]:
    """Python twin of the boundary query's filter over ``(value, rows)`` pairs already in Data Cloud's order.

    Used by tests (and handy for reasoning): ``boundary_query`` returns the same candidates server-side.
    """
    total = sum(rows for _, rows in counts)
    out: list[Candidate] = []
    before = 0
    for i, (value, rows) in enumerate(counts):
        if before == 0 or crosses_target(before, rows, total, partitions):
            nxt = counts[i + 1][0] if i + 1 < len(counts) else None
            out.append(Candidate(value=value, rows=rows, rows_before=before, next_value=nxt))
        before += rows
    return out


def choose_cuts(candidates: Sequence[Candidate], non_null_rows: int, partitions: int) -> list[tuple[str, int]]:
    """Cut points ``(value, rows_before_value)``, strictly increasing, at most ``partitions - 1`` of them.

    For each target ``t_i = i * total / n`` (``i = 1..n-1``) take the candidate whose rows contain ``t_i`` and
    cut either just before it or just after it (at its ``next_value``), whichever lands closer to ``t_i``. A cut
    at the very first value would leave an empty first partition and is never made; two targets inside one
    large value (a whale Account) collapse into fewer, larger partitions instead of splitting that value.
    """
    if partitions <= 1 or non_null_rows <= 0:
        return []
    ordered = sorted(candidates, key=lambda c: c.rows_before)
    cuts: list[tuple[str, int]] = []
    j = 0
    for i in range(1, partitions):
        scaled_target = i * non_null_rows  # compare ``position * n`` with ``i * total``: exact integers
        while j < len(ordered) and (ordered[j].rows_before + ordered[j].rows) * partitions < scaled_target:
            j += 1
        if j == len(ordered):
            break
        c = ordered[j]
        options: list[tuple[int, str, int]] = []
        if c.rows_before > 0:
            options.append((abs(c.rows_before * partitions - scaled_target), c.value, c.rows_before))
        after = c.rows_before + c.rows
        if c.next_value is not None and after < non_null_rows:
            options.append((abs(after * partitions - scaled_target), c.next_value, after))
        if not options:
            continue
        _, value, position = min(options, key=lambda o: o[0])  # ties keep the earlier cut
        if not cuts or position > cuts[-1][1]:
            cuts.append((value, position))
    return cuts


def plan_lanes(heavy: Sequence[tuple[str, int]], capacity: int) -> list[list[tuple[str, int]]]:
    """First-fit decreasing: the ``(value, rows)`` pairs packed into lanes of at most ``capacity`` rows each (a value
    larger than that gets a lane of its own), each value into the least-filled lane it fits. Lanes come largest
    first, values within a lane largest first."""
    lanes: list[list[tuple[str, int]]] = []
    loads: list[int] = []
    for value, rows in sorted(heavy, key=lambda vr: (-vr[1], vr[0])):
        fits = [i for i, load in enumerate(loads) if load + rows <= capacity]
        if fits:
            i = min(fits, key=lambda k: (loads[k], k))
            lanes[i].append((value, rows))
            loads[i] += rows
        else:
            lanes.append([(value, rows)])
            loads.append(rows)
    order = sorted(range(len(lanes)), key=lambda k: (-loads[k], k))
    return [lanes[k] for k in order]


def plan_partitions(distribution: KeyDistribution, key: str, *,
                    lanes: Sequence[Sequence[tuple[str, int]]] = ()) -> list[Partition]:
    """Lanes (largest first, so that they start first), then half-open ranges open at both ends (which exclude the
    lanes' values), plus, when NULL keys exist, a NULL bucket: complete and disjoint.

    ``distribution`` describes the rows outside the lanes. ``expected_rows`` is exact for the data Data Cloud held
    when the queries ran. An empty source gives no partitions at all (the mapped load task is then skipped and
    ``verify`` checks for zero).
    """
    excluded = tuple(value for lane in lanes for value, _ in lane)
    parts: list[tuple[str | None, str | None, bool, int]] = []
    if distribution.non_null_rows > 0:
        cuts = choose_cuts(distribution.candidates, distribution.non_null_rows, distribution.partitions)
        lowers: list[str | None] = [None, *(v for v, _ in cuts)]
        uppers: list[str | None] = [*(v for v, _ in cuts), None]
        positions = [0, *(p for _, p in cuts), distribution.non_null_rows]
        for lo, hi, start, end in zip(lowers, uppers, positions, positions[1:], strict=False):
            parts.append((lo, hi, False, end - start))
    if distribution.null_rows > 0:
        parts.append((None, None, True, distribution.null_rows))
    count = len(lanes) + len(parts)
    planned = [Partition(index=i, count=count, key=key, lower=None, upper=None, expected_rows=sum(r for _, r in lane),
                         accounts=tuple(v for v, _ in lane))
               for i, lane in enumerate(lanes)]
    planned += [Partition(index=len(lanes) + i, count=count, key=key, lower=lo, upper=hi, null_bucket=nb,
                          expected_rows=rows, exclude=() if nb else excluded)
                for i, (lo, hi, nb, rows) in enumerate(parts)]
    return planned


def known_cuts(candidates: Sequence[Candidate]) -> dict[int, str]:
    """Where a value is known to start: non-NULL rows before it -> the value (from the boundary query's candidates,
    which give the values just before and just after each crossing)."""
    cuts: dict[int, str] = {}
    for c in candidates:
        if c.rows_before > 0:
            cuts.setdefault(c.rows_before, c.value)
        if c.next_value is not None:
            cuts.setdefault(c.rows_before + c.rows, c.next_value)
    return dict(sorted(cuts.items()))


def plan_serial(distribution: KeyDistribution, key: str, *, lanes: Sequence[Sequence[tuple[str, int]]],
                partitions: int, batch_rows: int) -> list[Partition] | None:
    """Serial partitions whose sizes are whole batches: lanes, topped up, then ranges, plus the NULL bucket.

    A serial partition sends jobs of ``batch_rows`` rows, so each one ends with a partial batch unless its rows are a
    multiple of ``batch_rows``; with ``n`` partitions that is up to ``n`` batches more than the object needs (each a
    thread-slot of the org's time). Here every partition gets a whole number of batches: each lane is topped up to
    ``level`` batches (the largest lane's, or the average partition's if more) with a range of small values (cut
    where a value starts), and the remaining ranges are cut at the value start nearest below whole batches, so only
    the last range and the NULL bucket end partially. ``distribution`` describes the rows outside the lanes, with
    candidates at a fine resolution (``boundary_query(resolution_rows=...)``).

    :return: the plan, or ``None`` when there are fewer batches than partitions (an even split then keeps more
        partitions busy).
    """
    rest = distribution.non_null_rows
    loads = [sum(rows for _, rows in lane) for lane in lanes]
    ranges = max(1, partitions - len(lanes)) if rest else 0
    batches = -(-(rest + sum(loads)) // batch_rows)
    if not batches or batches < len(lanes) + ranges:
        return None
    level = max([-(-load // batch_rows) for load in loads] + [-(-batches // (len(lanes) + ranges))])
    cuts = known_cuts(distribution.candidates)
    positions = list(cuts)

    def cut_at_most(start: int, end: int) -> int:
        """The last value start in ``(start, end]`` (``rest`` if ``end`` reaches it); ``start`` if there is none."""
        if end >= rest:
            return rest
        i = bisect.bisect_right(positions, end) - 1
        return positions[i] if i >= 0 and positions[i] > start else start

    def bound(position: int) -> str | None:
        return None if position in (0, rest) else cuts[position]

    excluded = tuple(value for lane in lanes for value, _ in lane)
    start = 0
    planned: list[Partition] = []

    def top_up(load: int) -> int:
        """Where the range that fills a lane of ``load`` rows up to ``level`` batches from ``start`` ends."""
        return cut_at_most(start, start + level * batch_rows - load) if start < rest else start

    waiting = list(zip(lanes, loads, strict=True))
    while waiting:
        # Next, the lane whose top-up from here comes closest to whole batches (values start where they start).
        lane, load = waiting.pop(min(range(len(waiting)), key=lambda k: level * batch_rows - waiting[k][1]
                                     - (top_up(waiting[k][1]) - start)))
        end = top_up(load)
        topped_up = end > start
        planned.append(Partition(index=0, count=0, key=key, lower=bound(start) if topped_up else None,
                                 upper=bound(end) if topped_up else None, expected_rows=load + end - start,
                                 accounts=tuple(v for v, _ in lane), exclude=excluded if topped_up else (),
                                 with_range=topped_up))
        start = end
    planned.sort(key=lambda p: -p.expected_rows)  # stable: the largest lanes still start first
    while start < rest and ranges:
        if ranges == 1:
            end = rest
        else:
            batches_left = -(-(rest - start) // batch_rows)
            share = -(-batches_left // ranges)  # the first ranges take the odd batches, the last one less
            end = cut_at_most(start, start + share * batch_rows)
            if end == start:  # no value starts within: the next one that does
                end = next((p for p in positions if p > start), rest)
        planned.append(Partition(index=0, count=0, key=key, lower=bound(start), upper=bound(end),
                                 expected_rows=end - start, exclude=excluded))
        start, ranges = end, ranges - 1
    if distribution.null_rows > 0:
        planned.append(Partition(index=0, count=0, key=key, lower=None, upper=None, null_bucket=True,
                                 expected_rows=distribution.null_rows))
    return [dataclasses.replace(p, index=i, count=len(planned)) for i, p in enumerate(planned)]


# -- the boundary query ----------------------------------------------------------------------------------------

_DISTRIBUTION_COLUMNS = ("part_key", "rows", "next_key", "rows_before", "total_rows", "null_rows", "unkeyed_rows",
                         "distinct_keys", "parts")


def boundary_query(*, dmo: str, partition_column: str, key_column: str, partitions: int,
                   target_partition_rows: int | None = None, max_partitions: int = MAX_DATA_PARTITIONS,
                   exclude: Sequence[str] = (), resolution_rows: int | None = None) -> tuple[str, dict[str, Any]]:
    """SQL (and its parameters) returning the cut candidates and the totals in a single pass.

    Only validated identifiers and validated integers appear in the text; the one value compared against data
    (the empty string) is a parameter. Integer division truncates in Data 360 SQL (Hyper), PostgreSQL and
    SQLite alike for integers, and every operand is non-negative, so it is a floor. ``SUM`` of a ``bigint`` is a
    ``numeric`` in PostgreSQL/Hyper, hence the casts: with fractional division the filter would pass every row.
    ``exclude``: partition-column values left out (they have lanes of their own), passed as parameters.
    ``resolution_rows``: also return the values at every ``resolution_rows``-th row or so (a whole multiple of
    ``parts`` crossings, at most :data:`MAX_CANDIDATES`), so that :func:`plan_serial` can cut near any position.
    """
    for name, number in (("partitions", partitions), ("max_partitions", max_partitions),
                         ("resolution_rows", 1 if resolution_rows is None else resolution_rows)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise ValueError(f"{name} must be a positive integer, got {number!r}")
    if target_partition_rows is not None and (not isinstance(target_partition_rows, int)
                                              or isinstance(target_partition_rows, bool)
                                              or target_partition_rows < 1):
        raise ValueError(f"target_partition_rows must be a positive integer, got {target_partition_rows!r}")
    col, key = quote_ident(partition_column), quote_ident(key_column)
    non_null = '("total_rows" - "null_rows")'
    if target_partition_rows:
        wanted = f"(({non_null} + {target_partition_rows - 1}) / {target_partition_rows})"
        parts = f"CASE WHEN {wanted} < 1 THEN 1 WHEN {wanted} > {max_partitions} THEN {max_partitions} ELSE {wanted} END"
    else:
        parts = str(min(partitions, max_partitions))
    grid = '"parts"'
    if resolution_rows:
        # Crossings of (parts * m) equal slices, m >= 1: the plain cut targets stay among them.
        wanted = f'(({non_null} + "parts" * {resolution_rows} - 1) / ("parts" * {resolution_rows}))'
        most = f'({MAX_CANDIDATES} / "parts")'
        grid = f'("parts" * CASE WHEN {wanted} > {most} THEN {most} WHEN {wanted} < 1 THEN 1 ELSE {wanted} END)'
    not_null_rows = 'CASE WHEN "part_key" IS NULL THEN 0 ELSE "rows" END'
    params: dict[str, Any] = {"blank": ""}
    where = f" WHERE {col} IS NULL OR {col} NOT IN ({value_list('lane', exclude, params)})" if exclude else ""
    sql = (
        f'SELECT {", ".join(quote_ident(c) for c in _DISTRIBUTION_COLUMNS)} FROM ('
        f'SELECT "w".*, {parts} AS "parts" FROM ('
        f'SELECT "part_key", "rows", '
        f'LEAD("part_key") OVER (ORDER BY "part_key") AS "next_key", '
        f'CAST(SUM({not_null_rows}) OVER (ORDER BY "part_key") AS BIGINT) - {not_null_rows} AS "rows_before", '
        f'CAST(SUM("rows") OVER () AS BIGINT) AS "total_rows", '
        f'CAST(SUM(CASE WHEN "part_key" IS NULL THEN "rows" ELSE 0 END) OVER () AS BIGINT) AS "null_rows", '
        f'CAST(SUM("unkeyed") OVER () AS BIGINT) AS "unkeyed_rows", '
        f'COUNT("part_key") OVER () AS "distinct_keys" '
        f'FROM (SELECT {col} AS "part_key", COUNT(*) AS "rows", '
        f'CAST(SUM(CASE WHEN {key} IS NULL OR {key} = :blank THEN 1 ELSE 0 END) AS BIGINT) AS "unkeyed" '
        f'FROM {quote_ident(dmo)}{where} GROUP BY {col}) "g"'
        f') "w"'
        f') "p" '
        f'WHERE "part_key" IS NULL OR "rows_before" = 0 '
        f'OR ("rows_before" + "rows") * {grid} / NULLIF({non_null}, 0) '
        f'<> "rows_before" * {grid} / NULLIF({non_null}, 0) '
        f'ORDER BY "rows_before"'
    )
    return sql, params


def heavy_values_query(*, dmo: str, partition_column: str, key_column: str, min_rows: int,
                       limit: int = MAX_LANE_ACCOUNTS) -> tuple[str, dict[str, Any]]:
    """SQL for the partition-column values with more than ``min_rows`` rows, largest first (at most ``limit``):
    columns ``part_key``, ``rows``, ``unkeyed`` (its rows without an external id) and ``total_rows`` (non-NULL rows
    of the whole object)."""
    for name, number in (("min_rows", min_rows), ("limit", limit)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {number!r}")
    col, key = quote_ident(partition_column), quote_ident(key_column)
    sql = ('SELECT "part_key", "rows", "unkeyed", "total_rows" FROM ('
           'SELECT "part_key", "rows", "unkeyed", CAST(SUM("rows") OVER () AS BIGINT) AS "total_rows" FROM ('
           f'SELECT {col} AS "part_key", COUNT(*) AS "rows", '
           f'CAST(SUM(CASE WHEN {key} IS NULL OR {key} = :blank THEN 1 ELSE 0 END) AS BIGINT) AS "unkeyed" '
           f'FROM {quote_ident(dmo)} WHERE {col} IS NOT NULL GROUP BY {col}) "g") "w" '
           f'WHERE "rows" > :min_rows ORDER BY "rows" DESC, "part_key" LIMIT {limit}')
    return sql, {"min_rows": min_rows, "blank": ""}


def distribution_from_rows(rows: Iterable[Sequence[Any]]) -> KeyDistribution:
    """Read :func:`boundary_query`'s result (columns in ``_DISTRIBUTION_COLUMNS`` order)."""
    totals: tuple[int, int, int, int, int] | None = None
    candidates: list[Candidate] = []
    for part_key, n_rows, next_key, rows_before, total, nulls, unkeyed, distinct, parts in rows:
        totals = (int(total), int(nulls or 0), int(unkeyed or 0), int(distinct or 0), int(parts))
        if part_key is not None:
            candidates.append(Candidate(value=str(part_key), rows=int(n_rows), rows_before=int(rows_before),
                                        next_value=None if next_key is None else str(next_key)))
    if totals is None:  # no row at all: the source is empty
        return KeyDistribution(total_rows=0, null_rows=0, unkeyed_rows=0, distinct_values=0, partitions=1)
    total, nulls, unkeyed, distinct, parts = totals
    return KeyDistribution(total_rows=total, null_rows=nulls, unkeyed_rows=unkeyed, distinct_values=distinct,
                           partitions=parts, candidates=candidates)


# -- validation ------------------------------------------------------------------------------------------------


def check_source_columns(columns: Sequence[str], cfg: SyncConfig) -> list[str]:
    """Problems with the Data Cloud side given the columns the DMO actually has (quoted names match exactly)."""
    present = set(columns)
    by_lower = {c.lower(): c for c in columns}
    problems = []
    for column in cfg.source_columns:
        if column in present:
            continue
        hint = f" (did you mean {by_lower[column.lower()]}? quoted names are case-sensitive)" \
            if column.lower() in by_lower else ""
        problems.append(f"mapping.{column}: column {column} does not exist in Data Cloud object {cfg.dmo}{hint}")
    return problems


def _fields_by_name(describe: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(f["name"]).lower(): f for f in describe.get("fields", [])}


def _missing_write_access(f: Mapping[str, Any]) -> list[str]:
    """Which of ``createable`` / ``updateable`` a describe field lacks (an upsert needs both)."""
    return [flag for flag in ("createable", "updateable") if not f.get(flag)]


def check_target_fields(describe: Mapping[str, Any], related: Mapping[str, Mapping[str, Any]],
                        cfg: SyncConfig) -> tuple[list[str], list[str]]:
    """Problems and warnings with the Salesforce side, from the target's describe and its parents' describes.

    ``related`` maps a referenced object name (e.g. ``Account``) to its describe. Upsert creates *and* updates,
    so every mapped field must be both createable and updateable.
    """
    obj = cfg.target_object
    fields = _fields_by_name(describe)
    problems: list[str] = []
    warnings: list[str] = []
    covered: set[str] = set()
    ext = fields.get(cfg.external_id_field.lower())
    if ext is None:
        problems.append(f"target.external_id_field: field {cfg.external_id_field} does not exist on {obj}")
    elif not ext.get("externalId"):
        problems.append(f"target.external_id_field: field {cfg.external_id_field} on {obj} is not marked "
                        f"External ID (Bulk API upserts need an External ID field)")
    for column, target in cfg.mapping.items():
        where = f"mapping.{column}"
        if "." in target:
            relationship, parent_field = target.split(".", 1)
            ref = next((f for f in fields.values()
                        if str(f.get("relationshipName") or "").lower() == relationship.lower()), None)
            if ref is None:
                problems.append(f"{where}: {obj} has no relationship named {relationship} (for {target})")
                continue
            covered.add(str(ref["name"]).lower())
            if missing := _missing_write_access(ref):
                problems.append(f"{where}: relationship field {ref['name']} on {obj} is not {'/'.join(missing)}")
            parents = [p for p in ref.get("referenceTo") or [] if p in related]
            if not parents:
                problems.append(f"{where}: cannot describe {', '.join(ref.get('referenceTo') or ['?'])}, "
                                f"the object {relationship} points to")
                continue
            parent = parents[0]
            pf = _fields_by_name(related[parent]).get(parent_field.lower())
            if pf is None:
                problems.append(f"{where}: field {parent_field} does not exist on {parent} (for {target})")
            elif not (pf.get("externalId") or pf.get("idLookup")):
                problems.append(f"{where}: field {parent_field} on {parent} is neither an External ID nor an "
                                f"idLookup field, so {target} cannot match parents by it")
            continue
        f = fields.get(target.lower())
        if f is None:
            problems.append(f"{where}: field {target} does not exist on {obj}")
            continue
        covered.add(target.lower())
        if missing := _missing_write_access(f):
            problems.append(f"{where}: field {target} on {obj} is not {'/'.join(missing)} "
                            f"(the integration user needs edit access and the field must not be calculated)")
    for name, f in fields.items():
        if f.get("createable") and not f.get("nillable", True) and not f.get("defaultedOnCreate") \
                and name not in covered:
            warnings.append(f"target: {obj}.{f['name']} is required on create but no column is mapped to it; "
                            f"rows that create new records will fail")
    return problems, warnings


class _DataCloud(Protocol):
    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any: ...


class _Salesforce(Protocol):
    def describe(self, object_name: str) -> dict[str, Any]: ...

    def query_count(self, soql: str) -> int: ...


def salesforce_count_soql(cfg: SyncConfig) -> str:
    """Opportunities carrying an external id; identifiers come from the validated settings file."""
    return f"SELECT COUNT() FROM {cfg.target_object} WHERE {cfg.external_id_field} != null"


def validate(cfg: SyncConfig, datacloud: _DataCloud, salesforce: _Salesforce) -> list[str]:
    """Check both ends; raise :class:`DiscoveryError` with every problem found. Returns non-fatal warnings.

    Connection failures propagate as they are (they may be transient and worth a retry); problems with the
    settings raise :class:`DiscoveryError` (no retry will fix them).
    """
    problems: list[str] = []
    try:
        with datacloud.query(f"SELECT * FROM {quote_ident(cfg.dmo)} LIMIT 1") as result:
            columns = [str(c) for c in result.columns]
            list(result)
    except Exception as exc:
        if _looks_like_connection_error(exc):
            raise
        problems.append(f"source.dmo: Data Cloud object {cfg.dmo} cannot be read: {_first_line(exc)}")
        columns = None
    if columns is not None:
        problems += check_source_columns(columns, cfg)

    try:
        describe = salesforce.describe(cfg.target_object)
    except Exception as exc:
        if _looks_like_connection_error(exc):
            raise
        raise DiscoveryError([*problems, f"target.object: cannot describe {cfg.target_object} in Salesforce: "
                                         f"{_first_line(exc)}"]) from exc
    related: dict[str, dict[str, Any]] = {}
    fields = _fields_by_name(describe)
    for target in cfg.target_fields:
        if "." not in target:
            continue
        relationship = target.split(".", 1)[0].lower()
        for f in fields.values():
            if str(f.get("relationshipName") or "").lower() == relationship:
                for parent in (f.get("referenceTo") or [])[:1]:
                    if parent not in related:
                        try:
                            related[parent] = salesforce.describe(parent)
                        except Exception as exc:
                            if _looks_like_connection_error(exc):
                                raise
                            log.warning("cannot describe %s: %s", parent, exc)
    target_problems, warnings = check_target_fields(describe, related, cfg)
    problems += target_problems
    if problems:
        raise DiscoveryError(problems)
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _looks_like_connection_error(exc: BaseException) -> bool:
    """Network and authentication failures are worth a retry; everything else is a setup problem."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool):
        # SalesforceApiError: 0 = no answer; 401/403 = the connection's credentials; 429/5xx = the service.
        return status == 0 or status in (401, 403, 429) or status >= 500
    names = {t.__name__ for t in type(exc).__mro__}
    transient = {"ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout", "SSLError", "TimeoutError",
                 "ConnectionRefusedError", "ConnectError", "TransportError", "SalesforceAuthenticationFailed",
                 "AirflowNotFoundException"}
    return bool(names & transient)


# -- the task body ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    """What ``discover`` found: the partitions to load and the numbers ``verify`` reconciles against."""

    partitions: list[Partition]
    distribution: KeyDistribution
    key: str
    salesforce_count_before: int | None
    warnings: list[str]

    def plan(self) -> dict[str, Any]:
        """Small, JSON-friendly numbers for XCom (``verify`` reads them)."""
        d = self.distribution
        return {
            "key": self.key,
            "partition_count": len(self.partitions),
            "member_count": sum(len(p.members) or 1 for p in self.partitions),
            "total_rows": d.total_rows,
            "null_rows": d.null_rows,
            "unkeyed_rows": d.unkeyed_rows,
            "keyed_rows": d.keyed_rows,
            "distinct_values": d.distinct_values,
            "salesforce_count_before": self.salesforce_count_before,
            "expected_rows": {p.index: p.expected_rows for p in self.partitions},
            "warnings": self.warnings,
        }


def discover(cfg: SyncConfig, datacloud: _DataCloud, salesforce: _Salesforce, *, partition_key: str,
             partitions: int, target_partition_rows: int | None = None, partitions_per_task: int = 1) -> Discovery:
    """Validate, then plan. Reads only; safe to run at any time (also what ``dry_run`` relies on).

    ``partitions_per_task`` > 1 (``partition_key=account`` only): the serial partitions are loaded in groups of that
    many, one task per group, each Bulk job holding one internal batch of each (:func:`group_partitions`).
    """
    if partition_key not in PARTITION_KEY_CHOICES:
        raise DiscoveryError([f"params.partition_key: must be one of {', '.join(PARTITION_KEY_CHOICES)}, "
                              f"got {partition_key!r}"])
    if partitions_per_task < 1:
        raise DiscoveryError([f"params.partitions_per_task: must be at least 1, got {partitions_per_task}"])
    warnings = validate(cfg, datacloud, salesforce)
    column = cfg.account_column if partition_key == "account" else cfg.key_column
    lanes: list[list[tuple[str, int]]] = []
    lane_unkeyed = 0
    ranges = partitions  # how many ranges the boundary query aims for
    if partition_key == "account":  # serial partitions: large Accounts get lanes (module docstring)
        lanes, lane_unkeyed, capacity, total = find_lanes(cfg, datacloud, column, partitions=partitions,
                                                          target_partition_rows=target_partition_rows)
    lane_rows = sum(rows for lane in lanes for _, rows in lane)
    if lanes and target_partition_rows is None:
        # Lanes count towards the partitions asked for, and no range is longer than the lanes' capacity, so that
        # all partitions can end together (the even split; plan_serial sizes them itself).
        ranges = max(1, partitions - len(lanes), -(-(total - lane_rows) // capacity))
    batch_rows = cfg.load.serial_job_records
    sql, parameters = boundary_query(dmo=cfg.dmo, partition_column=column, key_column=cfg.key_column,
                                     partitions=ranges, target_partition_rows=target_partition_rows,
                                     max_partitions=MAX_DATA_PARTITIONS - len(lanes),
                                     exclude=[value for lane in lanes for value, _ in lane],
                                     resolution_rows=max(1, batch_rows // 10) if partition_key == "account" else None)
    with datacloud.query(sql, parameters) as result:
        distribution = distribution_from_rows(result)
    planned = None
    if partition_key == "account":  # whole batches per partition (plan_serial)
        wanted = partition_target(distribution.non_null_rows + lane_rows, partitions, target_partition_rows,
                                  MAX_DATA_PARTITIONS - 1)
        planned = plan_serial(distribution, partition_key, lanes=lanes, partitions=wanted, batch_rows=batch_rows)
    if planned is None:
        planned = plan_partitions(distribution, partition_key, lanes=lanes)
    planned = group_partitions(planned, partitions_per_task)  # serial (account) partitions only
    # The totals verify reconciles against cover the lanes' rows too.
    distribution = dataclasses.replace(distribution, total_rows=distribution.total_rows + lane_rows,
                                       unkeyed_rows=distribution.unkeyed_rows + lane_unkeyed,
                                       distinct_values=distribution.distinct_values + sum(map(len, lanes)))
    before = salesforce.query_count(salesforce_count_soql(cfg))
    return Discovery(partitions=planned, distribution=distribution, key=partition_key,
                     salesforce_count_before=before, warnings=warnings)


def find_lanes(cfg: SyncConfig, datacloud: _DataCloud, column: str, *, partitions: int,
               target_partition_rows: int | None) -> tuple[list[list[tuple[str, int]]], int, int, int]:
    """Accounts with more rows than one Bulk job of a serial partition, packed into lanes (:func:`plan_lanes`) of
    the average partition's size (``target_partition_rows``, else the rows over ``partitions``) or the largest such
    Account's, whichever is more.

    :return: the lanes, how many of their rows have no external id, the lanes' capacity and the non-NULL rows of
        the whole object (0 and 0 when no Account is that large).
    """
    sql, parameters = heavy_values_query(dmo=cfg.dmo, partition_column=column, key_column=cfg.key_column,
                                         min_rows=cfg.load.serial_job_records)
    heavy: list[tuple[str, int]] = []
    unkeyed = total = 0
    with datacloud.query(sql, parameters) as result:
        for value, rows, value_unkeyed, total_rows in result:
            heavy.append((str(value), int(rows)))
            unkeyed += int(value_unkeyed or 0)
            total = int(total_rows)
    if not heavy:
        return [], 0, 0, 0
    capacity = max(target_partition_rows or -(-total // max(1, partitions)), max(rows for _, rows in heavy))
    return plan_lanes(heavy, capacity), unkeyed, capacity, total


def partitions_table(partitions: Sequence[Partition]) -> str:
    """The plan as the task log shows it: one line per partition."""
    lines = [f"{'partition':<32} {'expected rows':>13}"]
    lines += [f"{p.label:<32} {p.expected_rows:>13,}" for p in partitions]
    return "\n".join(lines)


def run_discover(params: Mapping[str, Any], ti: Any, config_path: str | None = None) -> list[dict[str, Any]]:
    """Body of the ``discover`` task: returns the load operator's ``expand_kwargs`` list and pushes the plan.

    Setup problems raise ``AirflowFailException`` (no retry can fix a typo); connection errors raise as they are
    so the task's retries with backoff apply.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from sf_datacloud_sync.config import ConfigError, load_config
    from sf_datacloud_sync.hooks.datacloud import DataCloudHook
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise AirflowFailException(f"the settings file is invalid: {exc}") from exc
    target = params.get("target_partition_rows")
    datacloud = DataCloudHook(cfg.salesforce_conn_id)
    salesforce = SalesforceBulk2Hook(cfg.salesforce_conn_id)
    try:
        result = discover(cfg, datacloud, salesforce, partition_key=str(params["partition_key"]),
                          partitions=int(params["partitions"]),
                          target_partition_rows=int(target) if target not in (None, "", 0) else None,
                          partitions_per_task=int(params.get("partitions_per_task") or 1))
    except DiscoveryError as exc:
        raise AirflowFailException(str(exc)) from exc
    finally:
        for hook in (datacloud, salesforce):
            close = getattr(hook, "close", None)
            if callable(close):
                close()
    plan = result.plan()
    ti.xcom_push(key="plan", value=plan)
    d = result.distribution
    log.info("Data Cloud %s: %s rows (%s with a NULL %s, %s without an external id), %s distinct %s values; "
             "Salesforce holds %s %s records with an external id before the run",
             cfg.dmo, f"{d.total_rows:,}", f"{d.null_rows:,}", result.key, f"{d.unkeyed_rows:,}",
             f"{d.distinct_values:,}", result.key, result.salesforce_count_before, cfg.target_object)
    log.info("plan (%d partitions, key %s, dry_run=%s):\n%s", len(result.partitions), result.key,
             params.get("dry_run"), partitions_table(result.partitions))
    return [{"partition": p.to_dict()} for p in result.partitions]
