"""Deterministic, realistic test data: Accounts in the org and ``Opportunity_Sync__dlm`` rows in Data Cloud.

The data is shaped to stress what the sync has to get right:

* external ids in several formats whose byte order is far from uniform (equal-width range splits are unbalanced);
* a power-law number of Opportunities per Account (a few whales cause row-lock contention, a long tail of 1-3);
* text with quotes, commas, CR/LF, tabs and non-ASCII characters, NULLs and empty strings that must stay distinct;
* ``bad_rows`` rows Salesforce rejects, each listed with its expected error in ``seed_manifest.json``.

Everything comes from one ``random.Random(seed)`` and a fixed clock, so the same seed gives the same rows.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import itertools
import json
import marshal
import multiprocessing
import random
import shutil
import sqlite3
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from datetime import date, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .ids import make_id
from .schema import ACCOUNT, DMO_COLUMNS, DMO_NAME, INDUSTRIES, LEAD_SOURCES, OPPORTUNITY_TYPES, STAGES
from .state import Credentials, connect, init_datacloud_db, init_org_db

MANIFEST_NAME = "seed_manifest.json"
BATCH_ROWS = 50_000
# From this size on, rows are generated in a forked child while the parent stores them.
PARALLEL_MIN_ROWS = 100_000
# A fixed "now": seeding must not depend on the wall clock.
SYSTEM_NOW = "2026-01-01T00:00:00.000+0000"
REFERENCE_DAY = date(2026, 11, 28)
# Bulk job state other modules may keep; a re-seed starts from a clean org.
JOB_TABLE_PREFIXES = ("bulk_", "ingest_", "query_")

# -- external-id formats -------------------------------------------------------------------------------------
# (name, share in 1/1024) — the shares sum to 1024 so one 10-bit draw picks the format.
KEY_FORMATS: tuple[tuple[str, int], ...] = (
    ("opp_dense", 614),  # OPP-0000123456: the current system, dense serials
    ("sf_legacy", 205),  # SF-2019-04711: the previous CRM, numbered per year
    ("uuid", 102),  # 3f2a...-4...: rows created by an integration, lowercase hex
    ("legacy_small", 51),  # LEGACY_123: a spreadsheet import, small unpadded numbers
    ("zz_long", 20),  # ZZ-EMEA-NORTH-MIGRATED-000000042-...: long migration keys near the 80-char limit
    ("mixed_case", 11),  # Opp-M0000042: typed by hand
    ("lower_case", 11),  # opp-x0000042: sorts after every uppercase key
    ("numeric", 10),  # 0000123456: digits only, sorts first
)
_ZZ_REGIONS = ("EMEA", "EMEA-NORTH", "APAC", "APAC-SOUTH", "AMER", "AMER-WEST", "LATAM", "ANZ", "DACH", "NORDICS")
_ZZ_FILL = "SIEBEL-IMPORT-WAVE07-BATCH0042-RETRY03-PART"  # 43 chars: the longest keys are exactly 80
_SF_YEARS = (2015, 2016, 2017, 2018, 2019, 2019, 2020, 2020, 2020, 2021, 2021, 2021, 2021, 2018, 2017, 2019)

# -- bad rows ---------------------------------------------------------------------------------------------------
# kind -> (expected Salesforce error code, field the error is about, reason)
BAD_KINDS: dict[str, tuple[str, str, str]] = {
    "name_missing": ("REQUIRED_FIELD_MISSING", "Name", "Name__c is NULL but Opportunity.Name is required"),
    "name_too_long": ("STRING_TOO_LONG", "Name", "Name__c is longer than the 120 characters Opportunity.Name allows"),
    "stage_not_in_picklist": ("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", "StageName",
                              "StageName__c is not a value of the restricted StageName picklist"),
    "account_not_found": ("INVALID_FIELD", "Account.ExternalId__c",
                          "AccountExternalId__c matches no Account: Foreign key external ID not found"),
    "amount_too_large": ("NUMBER_OUTSIDE_VALID_RANGE", "Amount",
                         "Amount__c has more than the 16 integer digits of currency(18,2)"),
    "probability_above_100": ("NUMBER_OUTSIDE_VALID_RANGE", "Probability", "Probability__c is greater than 100"),
    "probability_negative": ("NUMBER_OUTSIDE_VALID_RANGE", "Probability", "Probability__c is negative"),
    "close_date_missing": ("REQUIRED_FIELD_MISSING", "CloseDate", "CloseDate__c is NULL but CloseDate is required"),
}
_BAD_STAGES = ("Closed - Duplicate", "Verbal Commit", "Stalled", "Won", "Negotiation")

# -- text pools -------------------------------------------------------------------------------------------------
_ACCOUNT_WORDS = (
    "Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Soylent", "Vandelay", "Tyrell", "Cyberdyne",
    "Wonka", "Massive Dynamic", "Aperture", "Black Mesa", "Oscorp", "Nakatomi", "Monarch", "Gringotts", "Pied Piper",
    "Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware", "Proseware", "Adventure Works", "Wingtip",
)
# One account in twenty has a name like these: non-ASCII, quotes, commas.
_ACCOUNT_WORDS_AWKWARD = (
    "Müller & Söhne", "Société Générale d'Essai", "Nordström", "Ñandú", "O'Brien", "Þórsson", "Łódź Logistyka",
    "株式会社サンプル", "北京测试", "삼성테스트", "Zürich Re-Test", "Crème Brûlée", "Smith, Jones", "\"Quoted\" Co",
)
_ACCOUNT_NOUNS = ("Holdings", "Logistics", "Analytics", "Foods", "Energy", "Bank", "Systems", "Labs", "Partners",
                  "Retail", "Media", "Health", "Motors", "Telecom", "Capital", "Industries")
_LEGAL = ("Inc.", "GmbH", "S.A.", "Ltd", "LLC", "AG", "K.K.", "B.V.", "S.p.A.", "Pty Ltd", "", "", "", "")
_ACCOUNT_TYPES = ("Customer - Direct", "Customer - Channel", "Prospect", "Partner", "Other")
_COUNTRIES = ("United States", "United States", "United States", "Germany", "France", "United Kingdom", "Japan",
              "Brazil", "Canada", "Australia", "España", "Côte d'Ivoire", "Österreich", "中国", "India", "Mexico")
_PRODUCTS = ("Platform License", "Support Renewal", "Professional Services", "Training", "Hardware Refresh",
             "Cloud Migration", "Data Add-on", "Analytics Suite", "Premier Success", "Security Bundle",
             "API Capacity", "Seats Expansion", "Pilot", "Multi-year Deal", "Upsell", "Cross-sell")
_DEAL_SUFFIXES = ("", "", "", " Q1", " Q2", " Q3", " Q4", " FY25", " FY26", " FY27", " (EMEA)", " (AMER)", " - Phase 2",
                  " - Renewal", " 2026", " x50 seats")
# Awkward for CSV and for encodings; ``{n}`` is filled with a number so the pool has many distinct values.
_SPECIAL_PARTS = (
    '"Big Deal", Phase {n}', "Renewal (FY{n}) ✅", "Expansión Año {n}", "Tab\tSeparated {n}", "年度契約 {n}",
    "🚀 Launch {n}", "Line one\nline two {n}", "CRLF\r\nDeal {n}", "CR only\rDeal {n}", "50% off, \"quoted\" ''single'' {n}",
    "Ünïcödé — Straße {n}", "Back\\slash {n}", "Trailing comma,{n},", '"Leading quote {n}', "Øresund Ñoño {n}",
    "Заказ {n}", "عقد {n}", "Δέλτα {n}", "数据云 同步 {n}", "Emoji 👍🏽 mix {n}", "semi;colon|pipe {n}", "a,b,c,\"d\" {n}",
)
_DESC_SENTENCES = (
    "Customer is evaluating competitors.", "Budget approved by the CFO.", "Follow up after the holidays.",
    "Decision expected next quarter.", "Champion left the company; re-engage.", "Legal review in progress.",
    "Requires security questionnaire.", "Pricing discussed on the last call.", "Upsell from the pilot.",
    "Renewal at risk due to budget cuts.", "Procurement asked for a 10% discount.", "Signed NDA on file.",
)
_SPECIAL_SENTENCES = (
    'Customer said: "we need it yesterday", then hung up.', "Notes:\r\n- item one\r\n- item two",
    "Line one\nLine two\nLine three", "Carriage\rreturn only", "Tabs\tbetween\tcolumns", "Préférence: réunion à 9h, café ☕",
    "日本語のメモ：来週に再連絡。", "中文备注：客户需要报价。", "Emoji status: 🔥🔥 hot lead 💰", "Comma, separated, values, inside",
    "Quote at end\"", "\"Fully quoted\"", "Mixed 'single' and \"double\" quotes, plus a comma", "Ελληνικά και Русский текст",
    "Back\\slash and forward/slash", "Zero-width\u200bjoiner and non-breaking\u00a0space", "#hashtag @mention & ampersand",
)


def _lut(weights: list[tuple[Any, int]], size: int) -> list[Any]:
    """A lookup table of ``size`` entries: indexing it with uniform random bits is a weighted choice."""
    assert sum(w for _, w in weights) == size, weights
    out: list[Any] = []
    for value, weight in weights:
        out.extend([value] * weight)
    return out


def _account_counts(rows: int, accounts: int) -> list[int]:
    """How many rows each account rank gets: two whales (7 %, 5.5 %) and a Zipf tail down to 1-3 rows.

    The tail follows ``(k + k0) ** -1.5``; ``k0`` is solved so the tail starts below the second whale, which keeps
    the head at two clearly dominant accounts whatever the size (at 200k rows both hold more than 10,000).
    """
    if accounts <= 0 or rows <= 0:
        return [0] * max(accounts, 0)
    if rows <= accounts:  # fewer rows than accounts: one each for the first ranks
        return [1] * rows + [0] * (accounts - rows)
    head = [round(rows * 0.07), round(rows * 0.055)] if accounts >= 3 and rows >= 100 else []
    if rows - sum(head) < accounts - len(head):  # nearly one row per account: no room for whales
        head = []
    tail_n = accounts - len(head)
    tail_rows = rows - sum(head) - tail_n  # everybody in the tail gets one row up front
    s = 1.5
    target = 0.7 * (head[-1] / rows if head else 0.07)
    lo, hi = 0.0, float(tail_n)
    weights: list[float] = []
    for _ in range(30):
        k0 = (lo + hi) / 2
        weights = [(k + k0) ** -s for k in range(1, tail_n + 1)]
        if weights[0] / sum(weights) * tail_rows / rows > target:
            lo = k0
        else:
            hi = k0
    total = sum(weights)
    exact = [tail_rows * w / total for w in weights]
    tail = [int(x) for x in exact]
    # Largest remainder so the counts add up exactly; ties broken by rank for determinism.
    short = tail_rows - sum(tail)
    for k in sorted(range(tail_n), key=lambda k: (tail[k] - exact[k], k))[:short]:
        tail[k] += 1
    return head + [c + 1 for c in tail]


def _account_rows(n: int, user_id: str, rng: random.Random) -> list[tuple[Any, ...]]:
    seen: set[str] = set()
    rows = []
    for i in range(1, n + 1):
        words = _ACCOUNT_WORDS_AWKWARD if rng.random() < 0.05 else _ACCOUNT_WORDS
        name = f"{rng.choice(words)} {rng.choice(_ACCOUNT_NOUNS)} {rng.choice(_LEGAL)}".strip()
        if name in seen:
            name = f"{name} #{i}"
        seen.add(name)
        values = {
            "Id": make_id("001", i), "IsDeleted": 0, "CreatedDate": SYSTEM_NOW, "CreatedById": user_id,
            "LastModifiedDate": SYSTEM_NOW, "LastModifiedById": user_id, "SystemModstamp": SYSTEM_NOW,
            "OwnerId": user_id, "Name": name, "Type": rng.choice(_ACCOUNT_TYPES), "Industry": rng.choice(INDUSTRIES),
            "BillingCountry": rng.choice(_COUNTRIES), "ExternalId__c": f"ACC-{i:07d}",
        }
        rows.append(tuple(values[f.name] for f in ACCOUNT))
    return rows


def _clear(data_dir: Path, org: sqlite3.Connection, dc: sqlite3.Connection) -> None:
    """Remove what a previous seed or sync left: Opportunities, Accounts, DMO rows, bulk job state."""
    for conn in (org, dc):
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for t in tables:
            if t.startswith(JOB_TABLE_PREFIXES):
                conn.execute(f'DELETE FROM "{t}"')
        conn.commit()
    # Opportunities first: they point at the Accounts.
    org.execute('DELETE FROM "Opportunity"')
    org.execute('DELETE FROM "Account"')
    org.commit()
    dc.execute(f'DELETE FROM "{DMO_NAME}"')
    dc.commit()
    jobs = data_dir / "jobs"
    if jobs.is_dir():
        for p in jobs.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


class _RowGenerator:
    """Builds DMO rows in batches; all per-row randomness comes from three 64-bit draws and lookup tables."""

    def __init__(self, rng: random.Random, account_ext: list[str], account_names: list[str],
                 account_of_row: list[int], special: dict[int, str]) -> None:
        self.rng = rng
        self.account_ext = account_ext
        self.account_names = [n[:48].rstrip() for n in account_names]  # names must stay well below 120 chars
        self.account_of_row = account_of_row
        self.special = special  # row index -> bad kind, or "null_key"
        self.special_rows = sorted(special)
        self.format_names = [name for name, _ in KEY_FORMATS]
        self.format_lut = _lut([(i, w) for i, (_, w) in enumerate(KEY_FORMATS)], 1024)
        self.format_counts = [0] * len(KEY_FORMATS)
        self.counters = [0] * len(KEY_FORMATS)
        self.counters[0] = 100_000  # OPP numbers started at 100000 in the source system
        self.sf_counters = dict.fromkeys(_SF_YEARS, 0)
        self.uuids: set[str] = set()
        self.bad: list[dict[str, Any]] = []
        self.null_keys = 0
        self._pools()

    def _pools(self) -> None:
        rng = self.rng
        self.name_parts = [p + s for p in _PRODUCTS for s in _DEAL_SUFFIXES][:256]
        rng.shuffle(self.name_parts)
        self.special_parts = [rng.choice(_SPECIAL_PARTS).format(n=rng.randrange(10, 100)) for _ in range(256)]
        # 1024 draws: 3 % special names.
        self.name_lut = _lut([(True, 31), (False, 993)], 1024)
        descs = []
        for i in range(2048):
            k = 1 + rng.randrange(3)
            parts = [rng.choice(_DESC_SENTENCES) for _ in range(k)]
            if i % 12 == 0:  # a twelfth of the pool is awkward text
                parts.insert(rng.randrange(k + 1), rng.choice(_SPECIAL_SENTENCES))
            descs.append(" ".join(parts))
        self.descs = descs
        self.long_descs = []
        for i in range(8):  # a few big ones: CSV sizing and the 32,000-character textarea
            body = "\r\n".join(rng.choice(_DESC_SENTENCES + _SPECIAL_SENTENCES) for _ in range(60 * (i + 1)))
            self.long_descs.append(body[: 2_000 * (i + 1) + 15_000 * (i == 7)])
        # Description: 35 % NULL, 1 % empty string, 0.2 % long, the rest from the pool.
        self.desc_lut = _lut([(None, 358), ("", 10), (1, 2), (0, 654)], 1024)
        self.type_lut = _lut([(None, 40), ("", 2), (OPPORTUNITY_TYPES[0], 60), (OPPORTUNITY_TYPES[1], 40),
                              (OPPORTUNITY_TYPES[2], 20), (OPPORTUNITY_TYPES[3], 94)], 256)
        self.lead_lut = _lut([(None, 50), ("", 2), (LEAD_SOURCES[0], 80), (LEAD_SOURCES[1], 40),
                              (LEAD_SOURCES[2], 50), (LEAD_SOURCES[3], 14), (LEAD_SOURCES[4], 20)], 256)
        stage_weights = (123, 102, 82, 72, 51, 41, 61, 51, 236, 205)
        self.stage_lut = _lut(list(zip(range(len(STAGES)), stage_weights, strict=True)), 1024)
        self.stage_names = [s[0] for s in STAGES]
        # Probability: the stage default 7 times out of 8 for open stages; closed stages are always 0 or 100.
        self.prob_lut = []
        for _, default, closed, _won in STAGES:
            if closed:
                self.prob_lut.append([float(default)] * 16)
            else:
                deltas = (0,) * 14 + (-10, 10)
                self.prob_lut.append([float(min(100, max(0, default + d))) for d in deltas])
        self.stage_closed = [s[2] for s in STAGES]
        # Lookup tables indexed by raw bit fields, so that no per-row arithmetic beyond shifts and masks is needed.
        close_days = [(REFERENCE_DAY + timedelta(days=d)).isoformat() for d in range(-730, 731)]
        # Closed deals closed in the past two years; open ones close from a month ago to two years ahead.
        closed_lut = [close_days[c % 731] for c in range(1 << 14)]
        open_lut = [close_days[700 + c % 761] for c in range(1 << 14)]
        self.close_luts = [closed_lut if closed else open_lut for closed in self.stage_closed]
        lm_days = [(REFERENCE_DAY - timedelta(days=d)).isoformat() for d in range(730)]
        self.lm_day_lut = [lm_days[x % 730] for x in range(1 << 12)]
        self.time_lut = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in (x % 86400 for x in range(1 << 18))]
        self.millis_lut = [f"{x % 1000:03d}" for x in range(1 << 10)]
        # Amount in cents: log-normal dollars (median ~13k), 3 in 8 of them whole, 1 in 32 NULL.
        self.amount_dollars = [100 * max(1, int(rng.lognormvariate(9.5, 1.3))) for _ in range(4096)]
        self.amount_cents = [0 if x & 7 < 3 else (x >> 3) % 100 for x in range(1 << 10)]
        # 10 bits pick special or plain, 8 bits which one.
        self.name_part_lut = [(self.special_parts if self.name_lut[x & 1023] else self.name_parts)[x >> 10]
                              for x in range(1 << 18)]

    def _keys(self, fmts: list[int], bits: list[int]) -> list[str]:
        """External ids for one batch, format by format; every format has its own serial or random source."""
        n = len(fmts)
        positions: list[list[int]] = [[] for _ in KEY_FORMATS]
        for i, f in enumerate(fmts):
            positions[f].append(i)
        keys: list[str] = [""] * n
        c = self.counters
        for f, pos in enumerate(positions):
            self.format_counts[f] += len(pos)
            if not pos:
                continue
            if f == 0:  # dense serials; a deleted record leaves a gap now and then
                nums = list(itertools.accumulate((1 + ((bits[i] & 15) == 0) for i in pos), initial=c[0]))
                c[0] = nums[-1]
                values = [f"OPP-{x:010d}" for x in nums[1:]]
            elif f == 1:  # numbered per year
                values = []
                sf = self.sf_counters
                for i in pos:
                    year = _SF_YEARS[bits[i] & 15]
                    sf[year] += 1 + ((bits[i] >> 4) & 1)
                    values.append(f"SF-{year}-{sf[year]:05d}")
            elif f == 2:  # version-4 shaped, lowercase hex
                h = self.rng.randbytes(16 * len(pos)).hex()
                values = []
                for j in range(len(pos)):
                    u = h[32 * j: 32 * j + 32]
                    key = f"{u[:8]}-{u[8:12]}-4{u[13:16]}-{u[16:20]}-{u[20:]}"
                    while key in self.uuids:  # never in practice, but keys must be unique
                        u = f"{self.rng.getrandbits(128):032x}"
                        key = f"{u[:8]}-{u[8:12]}-4{u[13:16]}-{u[16:20]}-{u[20:]}"
                    self.uuids.add(key)
                    values.append(key)
            else:
                first = c[f] + 1
                c[f] += len(pos)
                serials = range(first, c[f] + 1)
                if f == 3:
                    values = [f"LEGACY_{x}" for x in serials]
                elif f == 4:
                    values = [f"ZZ-{_ZZ_REGIONS[bits[i] % 10]}-MIGRATED-{x:09d}-{_ZZ_FILL[: (bits[i] >> 8) & 63]}"
                              f"{(bits[i] >> 16) & 0xFFFF:04X}" for i, x in zip(pos, serials, strict=True)]
                elif f == 5:
                    values = [f"Opp-M{x:07d}" for x in serials]
                elif f == 6:
                    values = [f"opp-x{x:07d}" for x in serials]
                else:  # widely spaced numbers
                    values = [f"{x * 97 + (bits[i] & 63):010d}" for i, x in zip(pos, serials, strict=True)]
            for i, v in zip(pos, values, strict=True):
                keys[i] = v
        return keys

    def _draws(self, n: int) -> tuple[list[int], list[int], list[int]]:
        """Three independent 64-bit random numbers per row, made in bulk (one ``randbytes`` call)."""
        words = array.array("Q", self.rng.randbytes(24 * n))
        if sys.byteorder == "big":  # same numbers on every machine
            words.byteswap()
        values = words.tolist()
        return values[0::3], values[1::3], values[2::3]

    def batch(self, start: int, end: int) -> list[tuple[Any, ...]]:
        """Rows ``start`` to ``end`` (exclusive), built column by column: comprehensions over bit fields of the
        three per-row draws R, Q, U (the masks below are disjoint within each draw)."""
        n = end - start
        R, Q, U = self._draws(n)
        A = self.account_of_row[start:end]
        keys = self._keys([self.format_lut[r & 1023] for r in R], [u & 0xFFFFFFFF for u in U])
        acct_ext, acct_names, parts = self.account_ext, self.account_names, self.name_part_lut
        names = [f"{acct_names[a]} - {parts[(r >> 10) & 0x3FFFF]}" for a, r in zip(A, R, strict=True)]
        stage_lut = self.stage_lut
        S = [stage_lut[(r >> 28) & 1023] for r in R]
        close_luts, prob_lut = self.close_luts, self.prob_lut
        desc_lut, descs, long_descs = self.desc_lut, self.descs, self.long_descs
        dollars, cents = self.amount_dollars, self.amount_cents
        lm_days, times, millis = self.lm_day_lut, self.time_lut, self.millis_lut
        type_lut, lead_lut, stage_names = self.type_lut, self.lead_lut, self.stage_names
        descriptions = [(descs[(q >> 10) & 2047] if d == 0 else long_descs[(q >> 10) & 7] if d == 1 else d)
                        for d, q in zip([desc_lut[q & 1023] for q in Q], Q, strict=True)]
        rows = list(zip(
            keys,
            [acct_ext[a] for a in A],
            names,
            [stage_names[s] for s in S],
            [close_luts[s][(u >> 32) & 0x3FFF] for s, u in zip(S, U, strict=True)],
            [None if (q >> 21) & 31 == 0 else (dollars[(q >> 26) & 4095] + cents[(q >> 38) & 1023]) / 100
             for q in Q],
            [prob_lut[s][(r >> 38) & 15] for s, r in zip(S, R, strict=True)],
            [type_lut[(q >> 48) & 255] for q in Q],
            [lead_lut[(q >> 56) & 255] for q in Q],
            descriptions,
            [f"{lm_days[r >> 52]}T{times[u >> 46]}.{millis[(r >> 42) & 1023]}Z" for r, u in zip(R, U, strict=True)],
            strict=True,
        ))
        lo = bisect.bisect_left(self.special_rows, start)
        hi = bisect.bisect_left(self.special_rows, end)
        for i in self.special_rows[lo:hi]:
            row = list(rows[i - start])
            self._spoil(row, self.special[i], i)
            rows[i - start] = tuple(row)
        return rows

    def _spoil(self, row: list[Any], kind: str, i: int) -> None:
        """Turn a valid row into one that fails for exactly one reason (or give it a NULL key)."""
        if kind == "null_key":
            row[0] = None
            self.null_keys += 1
            return
        j = len(self.bad)
        if kind == "name_missing":
            row[2] = None
        elif kind == "name_too_long":
            base = f"{row[2]} - extended description that somebody pasted into the name field #{j} "
            row[2] = (base.replace("\r", " ").replace("\n", " ") * 4)[: 121 + j % 80]
        elif kind == "stage_not_in_picklist":
            row[3] = _BAD_STAGES[j % len(_BAD_STAGES)]
        elif kind == "account_not_found":
            row[1] = f"ACC-MISSING-{j:05d}"
        elif kind == "amount_too_large":
            row[5] = float(123_456_789_012_345_678 + j * 1_000_000_000)  # 18 integer digits
        elif kind == "probability_above_100":
            row[6] = float(101 + j % 100)
        elif kind == "probability_negative":
            row[6] = float(-1 - j % 50)
        elif kind == "close_date_missing":
            row[4] = None
        code, fld, reason = BAD_KINDS[kind]
        self.bad.append({"rowid": i + 1, "external_id": row[0], "kind": kind, "field": fld, "reason": reason,
                         "expected_error_code": code, "value": row[{"Name": 2, "StageName": 3, "Account.ExternalId__c": 1,
                                                                    "Amount": 5, "Probability": 6, "CloseDate": 4}[fld]]})


def _dmo_indexes(dc: sqlite3.Connection) -> list[str]:
    """The CREATE INDEX statements the load should end with: existing ones (other modules') plus the seed's own."""
    existing = [r[0] for r in dc.execute("SELECT sql FROM sqlite_master WHERE type='index' AND tbl_name=? "
                                         "AND sql IS NOT NULL", (DMO_NAME,))]
    ours = [f'CREATE INDEX IF NOT EXISTS "ix_{DMO_NAME}_{c}" ON "{DMO_NAME}"("{c}")'
            for c in ("ExternalId__c", "AccountExternalId__c")]
    return existing + [s for s in ours if s not in existing]


def _generate(records: int, n_accounts: int, random_seed: int, bad_rows: int, null_keys: int,
              user_id: str) -> Iterator[tuple[str, Any]]:
    """Everything random, in order: ``("accounts", rows)``, then ``("rows", batch)`` per batch, then
    ``("summary", facts)``. Only plain data is yielded, so a child process can stream it (see ``_forked``)."""
    rng = random.Random(random_seed)
    account_rows = _account_rows(n_accounts, user_id, rng)
    yield "accounts", account_rows
    name_idx = [f.name for f in ACCOUNT].index("Name")
    account_names = [r[name_idx] for r in account_rows]
    account_ext = [f"ACC-{i:07d}" for i in range(1, n_accounts + 1)]

    # Which account each row belongs to: counts per rank, ranks mapped to random accounts, rows shuffled.
    counts = _account_counts(records, n_accounts)
    rank_to_account = list(range(n_accounts))
    rng.shuffle(rank_to_account)
    account_of_row: list[int] = []
    for rank, c in enumerate(counts):
        account_of_row.extend([rank_to_account[rank]] * c)
    rng.shuffle(account_of_row)

    # Bad rows and NULL keys at random positions; the kinds cycle so every kind is represented.
    kinds = list(BAD_KINDS)
    picked = rng.sample(range(records), bad_rows + null_keys)
    special = {i: kinds[j % len(kinds)] for j, i in enumerate(picked[:bad_rows])}
    special.update(dict.fromkeys(picked[bad_rows:], "null_key"))

    gen = _RowGenerator(rng, account_ext, account_names, account_of_row, special)
    for start in range(0, records, BATCH_ROWS):
        yield "rows", gen.batch(start, min(records, start + BATCH_ROWS))

    # Actual sizes, not the planned ones: rows pointing at a missing account belong to nobody.
    bad_fk_rows = {b["rowid"] - 1 for b in gen.bad if b["kind"] == "account_not_found"}
    sizes = Counter(a for i, a in enumerate(account_of_row) if i not in bad_fk_rows) if bad_fk_rows \
        else Counter(account_of_row)
    top = [{"external_id": account_ext[a], "id": make_id("001", a + 1), "opportunities": c}
           for a, c in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
    histogram = Counter("0" if c == 0 else "1-3" if c <= 3 else "4-40" if c <= 40 else "41-1000" if c <= 1000
                        else ">1000" for c in (sizes.get(a, 0) for a in range(n_accounts)))
    yield "summary", {
        "null_key_rows": gen.null_keys,
        "key_formats": dict(zip(gen.format_names, gen.format_counts, strict=True)),
        "largest_accounts": top,
        "accounts_over_10000": sum(1 for c in sizes.values() if c > 10_000),
        "account_size_histogram": dict(sorted(histogram.items())),
        "bad_rows": sorted(gen.bad, key=lambda b: b["rowid"]),
    }


def _child(conn: Connection, args: tuple[Any, ...]) -> None:
    """Child process body: stream ``_generate`` through a pipe (marshal: several times cheaper than pickle)."""
    try:
        for item in _generate(*args):
            conn.send_bytes(marshal.dumps(item))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send_bytes(marshal.dumps(("error", traceback.format_exc())))
    finally:
        conn.close()


@contextlib.contextmanager
def _forked(args: tuple[Any, ...]) -> Iterator[Iterator[tuple[str, Any]]]:
    """``_generate(*args)`` running in a forked child: on two cores generation overlaps the SQLite work.

    The child is started before the parent opens any SQLite connection (connections must not cross a fork), and is
    at most one batch ahead: the pipe applies back-pressure.
    """
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(writer, args), name="emulator-seed-generator", daemon=True)
    proc.start()
    writer.close()

    def items() -> Iterator[tuple[str, Any]]:
        while True:
            try:
                kind, payload = marshal.loads(reader.recv_bytes())
            except EOFError:
                raise RuntimeError(f"seed generator process exited early (exit code {proc.exitcode})") from None
            if kind == "error":
                raise RuntimeError(f"seed generator process failed:\n{payload}")
            yield kind, payload
            if kind == "summary":
                return

    try:
        yield items()
    finally:
        reader.close()
        proc.join(timeout=5)
        if proc.is_alive():  # the parent failed mid-way: stop our own child
            proc.terminate()
            proc.join()


def seed_org(data_dir: Path, records: int, accounts: int | None = None, random_seed: int = 42, bad_rows: int = 0,
             null_keys: int = 0) -> dict[str, Any]:
    """Replace the org's Accounts and Opportunities and the DMO's rows with a fresh deterministic data set."""
    t0 = time.monotonic()
    if records < 0 or bad_rows < 0 or null_keys < 0:
        raise ValueError("records, bad_rows and null_keys must not be negative")
    if bad_rows + null_keys > records:
        raise ValueError(f"bad_rows + null_keys ({bad_rows + null_keys}) exceeds records ({records})")
    n_accounts = accounts if accounts is not None else max(10, records // 40)
    if n_accounts < 1 and records > 0:
        raise ValueError("at least one account is needed for the opportunities")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MANIFEST_NAME).unlink(missing_ok=True)  # no stale manifest while the data is half-replaced
    creds = Credentials.load_or_create(data_dir / "credentials.json")
    args = (records, n_accounts, random_seed, bad_rows, null_keys, creds.user_id)
    # The same items either way (all randomness is in _generate), so the data does not depend on the mode.
    parallel = records >= PARALLEL_MIN_ROWS and "fork" in multiprocessing.get_all_start_methods()
    with _forked(args) if parallel else contextlib.nullcontext(_generate(*args)) as items:
        summary = _write(data_dir, n_accounts, items)

    bad = summary["bad_rows"]
    manifest = {
        "parameters": {"records": records, "accounts": accounts, "random_seed": random_seed, "bad_rows": bad_rows,
                       "null_keys": null_keys},
        "counts": {"records": records, "accounts": n_accounts, "bad_rows": len(bad),
                   "null_key_rows": summary["null_key_rows"],
                   "valid_rows": records - len(bad) - summary["null_key_rows"]},
        "records": records,
        "accounts": n_accounts,
        "random_seed": random_seed,
        "null_key_rows": summary["null_key_rows"],
        "reference_day": REFERENCE_DAY.isoformat(),
        "key_formats": summary["key_formats"],
        "largest_accounts": summary["largest_accounts"],
        "accounts_over_10000": summary["accounts_over_10000"],
        "account_size_histogram": summary["account_size_histogram"],
        "bad_row_kinds": dict(sorted(Counter(b["kind"] for b in bad).items())),
        # Each: rowid, external_id, kind, field, value, reason, expected_error_code — in rowid order. Both names are
        # read by tests (bad_row_list came first).
        "bad_rows": bad,
        "bad_row_list": bad,
    }
    tmp = data_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    tmp.replace(data_dir / MANIFEST_NAME)
    return {
        "data_dir": str(data_dir),
        "accounts": n_accounts,
        "records": records,
        "bad_rows": len(bad),
        "null_keys": summary["null_key_rows"],
        "seconds": round(time.monotonic() - t0, 2),
        "largest_accounts": [(t["external_id"], t["opportunities"]) for t in summary["largest_accounts"][:5]],
        "accounts_over_10000": summary["accounts_over_10000"],
        "key_formats": summary["key_formats"],
        "parallel": parallel,
        "manifest": str(data_dir / MANIFEST_NAME),
    }


def _write(data_dir: Path, n_accounts: int, items: Iterator[tuple[str, Any]]) -> dict[str, Any]:
    """Replace the stored data with ``items``; returns the generator's summary.

    One transaction per batch keeps the WAL small and lets a running emulator keep reading (WAL snapshots) and
    writing its other tables between batches.
    """
    org = connect(data_dir / "org.sqlite")
    dc = connect(data_dir / "datacloud.sqlite")
    try:
        for conn in (org, dc):
            conn.execute("PRAGMA synchronous=OFF")  # a crash mid-seed means re-seeding anyway
            conn.execute("PRAGMA temp_store=MEMORY")
        init_org_db(org)
        init_datacloud_db(dc)
        # Without indexes both the DELETE and the load are several times faster; they come back at the end.
        indexes = _dmo_indexes(dc)
        for (name,) in dc.execute("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name=? "
                                  "AND sql IS NOT NULL", (DMO_NAME,)).fetchall():
            dc.execute(f'DROP INDEX IF EXISTS "{name}"')
        dc.commit()
        _clear(data_dir, org, dc)

        kind, account_rows = next(items)
        assert kind == "accounts", kind
        cols = ", ".join(f'"{f.name}"' for f in ACCOUNT)
        org.executemany(f'INSERT INTO "Account" ({cols}) VALUES ({", ".join("?" * len(ACCOUNT))})', account_rows)
        # Ids the org hands out later (named after the object, as Org.next_number is) must not collide.
        org.execute("INSERT INTO sequences(name, value) VALUES('Account', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value=max(value, excluded.value)", (n_accounts,))
        org.commit()

        insert = f'INSERT INTO "{DMO_NAME}" ({", ".join(DMO_COLUMNS)}) VALUES ({", ".join("?" * len(DMO_COLUMNS))})'
        for kind, payload in items:
            if kind == "summary":
                summary = payload
                break
            dc.executemany(insert, payload)
            dc.commit()
        else:
            raise RuntimeError("seed generator ended without a summary")
        for sql in indexes:
            dc.execute(sql)
        dc.commit()
        dc.execute("PRAGMA analysis_limit=1000")  # planner statistics from a sample: a full ANALYZE scans every row
        dc.execute("ANALYZE")
        dc.commit()
        return summary
    finally:
        org.close()
        dc.close()
