"""Records built to hurt the worker, and producers that can send any bytes.

`hostile_records` makes every kind of bad input a producer could send to the two input
topics; `RawProducer` sends them with librdkafka (what Go, .NET, Node and confluent-kafka
users run) and, for header names that are not UTF-8, which no client library lets through,
with a record batch assembled byte by byte.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import confluent_kafka
from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from worker.engine.codec import partition_for
from worker.settings import Topics


@dataclass(frozen=True)
class Hostile:
    """One record to send, and what kind of harm it is."""

    kind: str
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[bytes, bytes | None]] = ()
    partition: int | None = None  # None: the key's murmur2 partition, or 0 without a key
    valid: bool = False  # a valid start: must be decided (`request_id` names it)
    request_id: str | None = None


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def hostile_records(topics: Topics, partitions: int, count: int, seed: int = 7) -> list[Hostile]:
    """About `count` records, half hostile (every kind in turn), half valid starts, shuffled.

    The heaviest kinds (900 KB and 100,000-deep values) come a few times whatever `count`.
    """
    rng = random.Random(seed)
    req, res = topics.requests, topics.results
    out: list[Hostile] = []

    def start(job_type: str, **fields: object) -> bytes:
        return json.dumps({"job_type": job_type, **fields}).encode()

    def result(job_type: str, **fields: object) -> bytes:
        body = {"job_type": job_type, "run_id": "261202-010203-0.1", "status": "COMPLETED"}
        return json.dumps({**body, **fields}).encode()

    kinds = [
        (
            "random_bytes",
            lambda i: Hostile(
                "random_bytes", req, rng.randbytes(8), rng.randbytes(rng.randint(1, 3000))
            ),
        ),
        (
            "random_bytes_result",
            lambda i: Hostile(
                "random_bytes_result", res, None, rng.randbytes(rng.randint(1, 3000))
            ),
        ),
        (
            "bad_utf8_value",
            lambda i: Hostile(
                "bad_utf8_value", req, b"h", b'{"job_type": "h\xff\xfe", "request_id": "r"}'
            ),
        ),
        (
            "lone_surrogate",  # JSON escapes half a UTF-16 pair: Python reads it, UTF-8 cannot
            lambda i: Hostile(
                "lone_surrogate",
                req,
                f"h-{i}".encode(),
                start(f"h-{i}", request_id=f"surrogate-{i}", initial_data={"x": "a\ud800"}),
            ),
        ),
        (
            "lone_surrogate_result",
            lambda i: Hostile(
                "lone_surrogate_result",
                res,
                f"h-{i}".encode(),
                result(f"h-{i}", final_metrics={"\udc00": 1}),
            ),
        ),
        (
            "bad_utf8_key",
            lambda i: Hostile(
                "bad_utf8_key", req, b"\xff\xfe\xfd", start(f"h-{i}", request_id=f"bad-key-{i}")
            ),
        ),
        (
            "bad_utf8_header_name",
            lambda i: Hostile(
                "bad_utf8_header_name",
                req,
                f"h-{i}".encode(),
                start(f"h-{i}", request_id=f"bad-header-{i}"),
                headers=[(b"\xff\xfename", b"v")],
            ),
        ),
        (
            "wrong_types",
            lambda i: Hostile(
                "wrong_types",
                req,
                b"h",
                rng.choice(
                    [
                        b"[]",
                        b'"text"',
                        b"null",
                        b"123",
                        b'{"job_type": 5}',
                        b'{"job_type": ["a"]}',
                        start("h", initial_data=[1, 2]),
                        start("h", client_id={"a": 1}),
                    ]
                ),
            ),
        ),
        (
            "wrong_types_result",
            lambda i: Hostile(
                "wrong_types_result",
                res,
                b"h",
                rng.choice(
                    [
                        result("h", status=7),
                        result("h", final_metrics="x"),
                        result("h", run_id=None),
                        b"false",
                    ]
                ),
            ),
        ),
        ("empty_value", lambda i: Hostile("empty_value", req, b"h", rng.choice([b"", None]))),
        (
            "nan",
            lambda i: Hostile(
                "nan",
                req,
                b"h",
                b'{"job_type": "h", "request_id": "nan", "initial_data": {"x": NaN}}',
            ),
        ),
        (
            "nan_result",
            lambda i: Hostile(
                "nan_result",
                res,
                b"h",
                result("h", status="FAILED", final_metrics={}).replace(b"{}", b'{"x": Infinity}'),
            ),
        ),
        (
            "key_not_job_type",
            lambda i: Hostile(
                "key_not_job_type",
                req,
                b"someone-else",
                start(f"h-{i}", request_id=f"bad-key-type-{i}"),
            ),
        ),
        (
            "unknown_fields",
            lambda i: Hostile(
                "unknown_fields", req, b"h", start("h", request_id=f"unknown-{i}", colour="red")
            ),
        ),
        (
            "binary_headers",
            lambda i: Hostile(
                "binary_headers",
                req,
                b"h",
                b"{not json",
                headers=[(b"bin", rng.randbytes(64)), (b"none", None)],
            ),
        ),
        (
            "nul_characters",
            lambda i: Hostile(
                "nul_characters", req, b"a\x00b", start("a\x00b", request_id=f"nul-{i}")
            ),
        ),
        (
            "unknown_kind",
            lambda i: Hostile(
                "unknown_kind", req, b"h", start("h", kind="explode", request_id=f"kind-{i}")
            ),
        ),
        (
            "unknown_kind_result",
            lambda i: Hostile("unknown_kind_result", res, b"h", result("h", kind="explode")),
        ),
        (
            "start_with_run_id",
            lambda i: Hostile(
                "start_with_run_id",
                req,
                b"h",
                start("h", request_id=f"with-run-{i}", run_id="261202-010203-0.1"),
            ),
        ),
        (
            "huge_metrics_result",
            lambda i: Hostile(
                "huge_metrics_result", res, b"h", result("h", final_metrics={"blob": "x" * 70_000})
            ),
        ),
        (
            "huge_number",
            lambda i: Hostile(
                "huge_number",
                req,
                b"h",
                b'{"job_type": "h", "initial_data": {"n": ' + b"9" * 5000 + b"}}",
            ),
        ),
    ]
    heavy = [
        lambda i: Hostile(
            "deep_nesting",
            req,
            b"h",
            start("h", request_id=f"deep-{i}").replace(
                b"}", b', "initial_data": {"a": ' + _deep(100_000).encode() + b"}}"
            ),
        ),
        lambda i: Hostile(
            "deep_nesting_5000",
            req,
            b"h",
            start("h", request_id=f"deep5k-{i}").replace(
                b"}", b', "initial_data": {"a": ' + _deep(5_000).encode() + b"}}"
            ),
        ),
        lambda i: Hostile(
            "huge_job_type", req, b"big", start("j" * 900_000, request_id=f"huge-{i}")
        ),
        lambda i: Hostile("huge_job_type_result", res, b"big", result("j" * 900_000)),
        lambda i: Hostile("huge_key", req, b"k" * 500_000, start("h", request_id=f"huge-key-{i}")),
    ]
    for i in range(3):
        out.extend(make(i) for make in heavy)
    hostile = count // 2
    for i in range(hostile):
        out.append(kinds[i % len(kinds)][1](i))
    for i in range(count - hostile):
        job_type = f"valid-{i}"
        request_id = f"valid-{i}"
        out.append(
            Hostile(
                "valid",
                req,
                job_type.encode(),
                start(job_type, request_id=request_id, initial_data={"i": i, "text": "é\u0000"}),
                valid=True,
                request_id=request_id,
            )
        )
    rng.shuffle(out)
    return [
        h
        if h.partition is not None
        else _placed(h, partition_for(h.key, partitions) if h.key else 0)
        for h in out
    ]


def _placed(record: Hostile, partition: int) -> Hostile:
    return Hostile(
        record.kind,
        record.topic,
        record.key,
        record.value,
        record.headers,
        partition,
        record.valid,
        record.request_id,
    )


@dataclass
class RawProducer:
    """Sends `Hostile` records in order; `sent[i]` is record i's (topic, partition, offset)."""

    bootstrap: str
    sent: dict[int, tuple[str, int, int]] = field(default_factory=dict)

    async def send(self, records: Sequence[Hostile]) -> None:
        """Send every record, in order per partition; wait until all are written."""
        # Records whose header names are not UTF-8 go through aiokafka, one batch each,
        # between the librdkafka runs before and after them.
        run: list[tuple[int, Hostile]] = []
        raw = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await raw.start()
        try:
            for index, record in enumerate(records):
                if any(_not_utf8(name) for name, _ in record.headers):
                    await asyncio.to_thread(self._librdkafka, run)
                    run = []
                    await self._raw(raw, index, record)
                else:
                    run.append((index, record))
            await asyncio.to_thread(self._librdkafka, run)
        finally:
            await raw.stop()

    def _librdkafka(self, records: list[tuple[int, Hostile]]) -> None:
        if not records:
            return
        producer = confluent_kafka.Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        errors: list[str] = []
        for index, record in records:

            def done(err: object, msg: object, index: int = index) -> None:
                if err is not None:
                    errors.append(str(err))
                else:
                    self.sent[index] = (msg.topic(), msg.partition(), msg.offset())  # type: ignore[attr-defined]

            while True:
                try:
                    producer.produce(
                        record.topic,
                        value=record.value,
                        key=record.key,
                        partition=record.partition,
                        headers=[(n.decode(), v) for n, v in record.headers] or None,
                        on_delivery=done,
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
        producer.flush(60)
        assert not errors, errors[:3]

    async def _raw(self, producer: AIOKafkaProducer, index: int, record: Hostile) -> None:
        batch = producer.create_batch()
        # aiokafka's pure-Python builder writes a header name's bytes as `encode` gives
        # them; the compiled one (the default) would refuse anything but text.
        batch._builder = _DefaultRecordBatchBuilderPy(
            magic=2,
            compression_type=0,
            is_transactional=0,
            producer_id=-1,
            producer_epoch=-1,
            base_sequence=-1,
            batch_size=2_000_000,
        )
        headers = [(_RawName(n), v) for n, v in record.headers]
        batch.append(key=record.key, value=record.value, timestamp=None, headers=headers)
        sent = await producer.send_batch(batch, record.topic, partition=record.partition)
        meta = await sent
        self.sent[index] = (record.topic, meta.partition, meta.offset)


def _not_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


class _RawName(str):
    """A header name that encodes to bytes of our choosing, UTF-8 or not."""

    raw: bytes

    def __new__(cls, raw: bytes) -> _RawName:
        instance = super().__new__(cls, raw.decode("utf-8", "replace"))
        instance.raw = raw
        return instance

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw
