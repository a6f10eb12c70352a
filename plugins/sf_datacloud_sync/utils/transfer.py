"""Stream rows into Bulk API 2.0 upsert jobs: encode the next chunk while the previous one uploads.

Two stages run at once — the caller's thread reads rows and encodes CSV chunks, one uploader thread creates,
uploads and closes a job per chunk — so a transfer takes about as long as the slower stage, not the sum of
both. At most two chunks exist at any time (the one uploading and the one being built), and they are spooled to
temporary files above 1 MiB: memory does not grow with the number of rows or the size of a job.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from sf_datacloud_sync.utils.csv_encoder import CsvChunk, iter_chunks
from sf_datacloud_sync.utils.memory import release_free_heap

if TYPE_CHECKING:
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

log = logging.getLogger(__name__)

_DONE = object()
# Job CSVs larger than this go to a temporary file while they wait for and during their upload: measured at
# 1M rows it lowers the client's peak RSS by ~50 MB at no CPU cost (the upload streams the file).
DEFAULT_SPOOL_BYTES = 1 << 20


@dataclass(frozen=True)
class SubmittedJob:
    """A closed (``UploadComplete``) ingest job holding rows ``first_key`` … ``last_key`` of the stream.

    :param job_id: Salesforce job id.
    :param seq: 0-based position of the job in this stream.
    :param records: Rows in the job's CSV.
    :param nbytes: Size of the uploaded CSV.
    :param first_key: Key of the job's first row.
    :param last_key: Key of the job's last row (a resume point: every earlier row is in this or earlier jobs).
    """

    job_id: str
    seq: int
    records: int
    nbytes: int
    first_key: Any
    last_key: Any


def stream_rows_to_jobs(bulk: SalesforceBulk2Hook, rows: Iterable[Sequence[Any]], *, object_name: str,
                        external_id_field: str, header: list[str], column_types: list[str] | None,
                        key_func: Callable[[Sequence[Any]], Any], max_records_per_job: int,
                        max_bytes_per_job: int = 100_000_000, line_ending: str = "LF",
                        on_job_submitted: Callable[[SubmittedJob], None] | None = None,
                        null_as: str = "#N/A", operation: str = "upsert",
                        spool_threshold: int | None = DEFAULT_SPOOL_BYTES,
                        on_job_created: Callable[[SubmittedJob], None] | None = None) -> Iterator[SubmittedJob]:
    """Encode ``rows`` into CSV chunks and submit each as one Bulk API 2.0 job (create → upload → close).

    Jobs are yielded in stream order as soon as they are closed; Salesforce processes them meanwhile.
    ``on_job_submitted`` runs in the caller's thread, in order, before the job is yielded (record it in a
    ledger there). If an upload fails, its job is aborted, no further job is created, the jobs submitted
    before it have been yielded, and the error is raised. Closing the generator early stops after the
    upload in flight, whose job is still reported.

    :param bulk: The Bulk API 2.0 hook.
    :param rows: Row tuples in ``header`` order (e.g. a Data Cloud result).
    :param object_name: Target sObject.
    :param external_id_field: Upsert key field.
    :param header: Salesforce field names (CSV header).
    :param column_types: Type name per column (see :class:`~sf_datacloud_sync.utils.csv_encoder.CsvEncoder`).
    :param key_func: The row's key (reported as ``first_key``/``last_key``).
    :param max_records_per_job: Most rows per job.
    :param max_bytes_per_job: Most CSV bytes per job (≤ 100,000,000).
    :param line_ending: ``LF`` or ``CRLF``.
    :param on_job_submitted: Called with each :class:`SubmittedJob` before it is yielded.
    :param null_as: Text for ``None`` values (``#N/A`` clears the field).
    :param operation: Bulk operation (``upsert`` by default).
    :param on_job_created: Called in the uploader thread once a job exists and before its data is uploaded,
        with the chunk's figures (a ledger can then record every job that might hold data, without parsing the
        CSV back); if it raises, the job is aborted and the stream stops with that error.
    :param spool_threshold: Chunks are built in spooled temporary files that move to disk above this many
        bytes (default 1 MiB), so a 100 MB job costs page cache, not process memory; ``None`` keeps them in memory.
    """
    chunks = iter_chunks(rows, header, max_records_per_job, min(max_bytes_per_job, bulk.max_upload_bytes),
                         key_func=key_func, column_types=column_types, null_as=null_as, line_ending=line_ending,
                         spool_threshold=spool_threshold)
    yield from stream_chunks_to_jobs(bulk, chunks, object_name=object_name, external_id_field=external_id_field,
                                     line_ending=line_ending, on_job_submitted=on_job_submitted, operation=operation,
                                     on_job_created=on_job_created)


def stream_chunks_to_jobs(bulk: SalesforceBulk2Hook, chunks: Iterable[CsvChunk], *, object_name: str,
                          external_id_field: str, line_ending: str = "LF",
                          on_job_submitted: Callable[[SubmittedJob], None] | None = None,
                          operation: str = "upsert",
                          on_job_created: Callable[[SubmittedJob], None] | None = None) -> Iterator[SubmittedJob]:
    """Submit each CSV chunk as one Bulk API 2.0 job while the next one is built; see :func:`stream_rows_to_jobs`
    (the same, for chunks built by the caller, e.g. :func:`~sf_datacloud_sync.utils.csv_encoder.iter_lane_chunks`).
    """
    chunks = iter(chunks)
    todo: queue.Queue[Any] = queue.Queue(maxsize=1)
    done: queue.Queue[Any] = queue.Queue()
    # One slot for the chunk uploading, one for the chunk being built: the encoder waits for a free slot.
    slots = threading.Semaphore(2)
    stop = threading.Event()

    def upload() -> None:
        seq = 0
        while True:
            item = todo.get()
            if item is _DONE:
                done.put(_DONE)
                return
            chunk: CsvChunk = item
            try:
                if stop.is_set():
                    continue
                extra: dict[str, Any] = {}
                if on_job_created is not None:
                    extra["on_created"] = partial(_created, on_job_created, seq, chunk)
                info = bulk.submit_ingest_job(object_name, chunk.data, external_id_field=external_id_field,
                                              operation=operation, line_ending=line_ending, **extra)
                done.put(SubmittedJob(info["id"], seq, chunk.records, chunk.nbytes, chunk.first_key, chunk.last_key))
                seq += 1
            except BaseException as exc:  # handed to the caller's thread
                stop.set()
                done.put(exc)
            finally:
                if not isinstance(chunk.data, bytes):
                    chunk.data.close()
                del chunk, item
                # The chunk's buffers and the pages it was built from are free now: give them back, so the peak
                # RSS stays that of one chunk in flight however many went through (see utils/memory.py).
                release_free_heap()
                slots.release()

    uploader = threading.Thread(target=upload, name=f"bulk-upload-{object_name}", daemon=True)
    uploader.start()

    def deliver(item: Any) -> SubmittedJob:
        if isinstance(item, BaseException):
            raise item
        if on_job_submitted is not None:
            on_job_submitted(item)
        return item

    finished = False
    try:
        while not stop.is_set():
            slots.acquire()
            if stop.is_set():
                slots.release()
                break
            chunk = next(chunks, None)
            if chunk is None:
                slots.release()
                break
            todo.put(chunk)
            del chunk
            while True:
                try:
                    item = done.get_nowait()
                except queue.Empty:
                    break
                yield deliver(item)
        todo.put(_DONE)
        while (item := done.get()) is not _DONE:
            yield deliver(item)
        finished = True
    finally:
        if not finished:
            # Early close or an error: let the upload in flight finish (its job stays valid), start no more.
            stop.set()
            for item in _drain(todo):
                if isinstance(item, CsvChunk) and not isinstance(item.data, bytes):
                    item.data.close()
            todo.put(_DONE)
            uploader.join()
            for item in _drain(done):
                if isinstance(item, SubmittedJob):
                    log.warning("Bulk job %s (rows %r..%r) was submitted while the transfer stopped", item.job_id,
                                item.first_key, item.last_key)
                    if on_job_submitted is not None:
                        on_job_submitted(item)
        uploader.join()


def _created(callback: Callable[[SubmittedJob], None], seq: int, chunk: CsvChunk, info: dict[str, Any]) -> None:
    callback(SubmittedJob(info["id"], seq, chunk.records, chunk.nbytes, chunk.first_key, chunk.last_key))


def _drain(q: queue.Queue[Any]) -> list[Any]:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
