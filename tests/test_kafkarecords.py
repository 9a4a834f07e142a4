"""Fetched batches that aiokafka cannot decode are read again tolerantly."""

from __future__ import annotations

import pytest
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from tests.hostile import _RawName
from worker.engine.compat import TolerantMemoryRecords


def _batch(
    compression: int, records: list[tuple[bytes, list[tuple[bytes, bytes | None]]]]
) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=compression,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1_000_000,
    )
    for offset, (value, headers) in enumerate(records):
        named = [(_RawName(n), v) for n, v in headers]
        builder.append(
            offset, timestamp=1_700_000_000_000 + offset, key=b"k", value=value, headers=named
        )
    return bytes(builder.build())


@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_a_header_name_that_is_not_utf8_does_not_hide_the_batch(compression: int) -> None:
    """Every record of the batch is read, the bad name's bytes kept as surrogates."""
    data = _batch(
        compression,
        [
            (b"first", []),
            (b"bad", [(b"\xff\xfeX", b"1"), (b"ok", None)]),
            (b"last", [(b"fine", b"2")]),
        ],
    )
    data += _batch(0, [(b"next batch", [])])  # the batch after it is read as usual
    records = TolerantMemoryRecords(data)
    seen = []
    while records.has_next():
        batch = records.next_batch()
        assert batch is not None
        assert not batch.is_control_batch
        seen.extend((r.value, list(r.headers), r.timestamp) for r in batch)
    assert [value for value, _, _ in seen] == [
        b"first",
        b"bad",
        b"last",
        b"next batch",
    ]
    bad_headers = seen[1][1]
    assert bad_headers[0][0].encode("utf-8", "surrogateescape") == b"\xff\xfeX"
    assert bad_headers[1] == ("ok", None)
    assert seen[2][1] == [("fine", b"2")]
    assert seen[1][2] == 1_700_000_000_001
