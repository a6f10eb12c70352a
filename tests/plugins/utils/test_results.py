"""Result CSV parsing and the ``sf__Error`` format."""

from __future__ import annotations

import io

import pytest

from sf_datacloud_sync.utils.results import csv_delimiter, iter_csv_records, parse_sf_error


@pytest.mark.parametrize(("value", "expected"), [
    ("REQUIRED_FIELD_MISSING:Required fields are missing: [Name]:Name --",
     ("REQUIRED_FIELD_MISSING", "Required fields are missing: [Name]", ["Name"])),
    ("INVALID_CROSS_REFERENCE_KEY:invalid cross reference id:--",
     ("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [])),
    ("UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record or 200 records: 001xx0000000001AAA:--",
     ("UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record or 200 records: 001xx0000000001AAA",
      [])),
    ("FIELD_CUSTOM_VALIDATION_EXCEPTION:Amount must be\npositive: really:Amount,StageName --",
     ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Amount must be\npositive: really", ["Amount", "StageName"])),
    ("DUPLICATE_VALUE:Duplicate external id specified: OPP-1:ExternalId__c --",
     ("DUPLICATE_VALUE", "Duplicate external id specified: OPP-1", ["ExternalId__c"])),
    ("just some text", ("", "just some text", [])),
    ("CODE:no trailer", ("CODE", "no trailer", [])),
])
def test_parse_sf_error(value, expected):
    assert tuple(parse_sf_error(value)) == expected


def test_parse_sf_error_fields_by_name():
    err = parse_sf_error("STRING_TOO_LONG:Name: data value too large:Name --")
    assert (err.code, err.message, err.fields) == ("STRING_TOO_LONG", "Name: data value too large", ["Name"])


def test_iter_csv_records_multiline_quoted_and_bom():
    body = ('\ufeff"sf__Id","sf__Error",Key,Text\r\n'
            ',"REQUIRED_FIELD_MISSING:Required fields\nare missing: [Name]:Name --",K1,"a,""b"""\r\n'
            '001,"X:y:--",K2,"lone\rcr"\r\n').encode()
    rows = list(iter_csv_records(io.BytesIO(body)))
    assert rows == [
        {"sf__Id": "", "sf__Error": "REQUIRED_FIELD_MISSING:Required fields\nare missing: [Name]:Name --", "Key": "K1",
         "Text": 'a,"b"'},
        {"sf__Id": "001", "sf__Error": "X:y:--", "Key": "K2", "Text": "lone\rcr"},
    ]


def test_iter_csv_records_is_incremental():
    class Source(io.RawIOBase):
        def __init__(self):
            self.served = 0
            self.lines = [b"A\n"] + [f"{i}\n".encode() for i in range(100_000)]

        def readable(self):
            return True

        def readinto(self, buf):
            if self.served >= len(self.lines):
                return 0
            data = self.lines[self.served]
            self.served += 1
            buf[: len(data)] = data
            return len(data)

    src = Source()
    rows = iter_csv_records(io.BufferedReader(src, buffer_size=64))
    assert next(rows) == {"A": "0"}
    assert src.served < 100


def test_iter_csv_records_empty_and_header_only():
    assert list(iter_csv_records(io.BytesIO(b""))) == []
    assert list(iter_csv_records(io.BytesIO(b"sf__Id,sf__Created,Name\n"))) == []


def test_iter_csv_records_refuses_misaligned_rows():
    with pytest.raises(ValueError, match="2 values for 3 columns"):
        list(iter_csv_records(io.BytesIO(b"A,B,C\n1,2\n")))


def test_csv_delimiter():
    assert csv_delimiter("PIPE") == "|"
    with pytest.raises(ValueError):
        csv_delimiter("SPACE")
