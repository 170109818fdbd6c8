"""Micro-batching: concurrent requests wait a few milliseconds and share one model pass and one FAISS search.

The model and index are used from one worker thread only, so concurrent requests are safe; batching
makes throughput grow with load (one forward+backward over many queries, one GEMM-based search).

Exact re-rank requests (`attribute(..., exact=C)`) and explanations are not batched: each runs alone, as the
library's own call, on that same single worker thread. The thread is what keeps the re-rank's C forward+backward
passes from racing with a batched pass (or with a reload), and running the library call as it is gives the
answer a local index gives for the same C. Sharing the first-stage pass would save one pass out of 1 + C;
the price is that batches queued behind a re-rank wait for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from attribindex.data import PromptCompletion
from attribindex.errors import AttribIndexError
from attribindex.query import AttributionIndex, QueryResult

T = TypeVar("T")


@dataclass
class _Job:
    queries: list[str | PromptCompletion]
    k: int
    bottom: int
    future: asyncio.Future = field(repr=False)


class ShuttingDown(AttribIndexError):
    """The server stops and takes no more work."""


class MicroBatcher:
    """Collects requests for up to `window_s` (or until `max_queries` queries) and answers them together.

    Example:
        >>> batcher = MicroBatcher(index, window_s=0.005, max_queries=64)  # doctest: +SKIP
        >>> results = await batcher.submit(["a text"], k=5, bottom=0)  # doctest: +SKIP
    """

    def __init__(self, index: AttributionIndex, window_s: float, max_queries: int):
        self.index = index  # replaced, between batches, when the index on disk changes (see `reload`)
        self._stamp = index.manifest_stamp()
        self.window_s = window_s
        self.max_queries = max_queries
        self.batches = 0  # batches run, for /v1/info
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attribindex-model")
        self._worker: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def reload(self) -> AttributionIndex:
        """Reopen the index if a mutation was committed since it was loaded. Runs on the worker thread only."""
        stamp = self.index.manifest_stamp()
        if stamp != self._stamp:
            self.index, self._stamp = self.index.reopened(), stamp
        return self.index

    async def reload_now(self) -> AttributionIndex:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.reload)

    async def submit(self, queries: list, k: int, bottom: int) -> tuple[list[QueryResult], AttributionIndex]:
        """The results for `queries`, and the index (version) that answered them."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry against another instance or after a restart.")
        job = _Job(queries, k, bottom, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def submit_alone(self, work: Callable[[AttributionIndex], T]) -> T:
        """`work(index)` on the current index, alone on the model thread (whose single-worker executor runs it
        between batches, never during one): an exact re-rank or an explanation, each a model pass of its own."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry against another instance or after a restart.")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_alone, work)

    async def close(self) -> None:
        """Refuse new work, fail what is still queued, stop the worker."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server shut down before answering."))
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            count = len(jobs[0].queries)
            deadline = loop.time() + self.window_s
            while count < self.max_queries:
                remaining = deadline - loop.time()
                try:
                    job = (
                        self._queue.get_nowait()
                        if remaining <= 0
                        else await asyncio.wait_for(self._queue.get(), remaining)
                    )
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                jobs.append(job)
                count += len(job.queries)
            try:
                answers = await loop.run_in_executor(self._executor, self._answer, jobs)
            except Exception as err:  # one failed batch fails its requests, never the server
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            for job, answer in zip(jobs, answers):
                if not job.future.done():
                    job.future.set_result(answer)

    def _run_alone(self, work: Callable[[AttributionIndex], T]) -> T:
        self.batches += 1  # a model pass of its own
        return work(self.reload())

    def _answer(self, jobs: list[_Job]) -> list[tuple[list[QueryResult], AttributionIndex]]:
        """One model pass over every query of the batch, one search with the largest k; each job takes its prefix."""
        self.batches += 1
        index = self.reload()  # appends and deletes committed while serving take effect from this batch on
        queries = [q for job in jobs for q in job.queries]
        vectors = index.query_vectors(queries)
        k = min(max(job.k for job in jobs), index.rows)
        bottom = min(max(job.bottom for job in jobs), index.rows)
        found = index.search(vectors, k, bottom)
        answers, start = [], 0
        for job in jobs:
            results = [
                QueryResult(query=q, top=top[: job.k], bottom=low[: job.bottom], loss=float(loss))
                for q, (top, low), loss in zip(
                    job.queries, found[start : start + len(job.queries)], vectors.losses[start:]
                )
            ]
            answers.append((results, index))
            start += len(job.queries)
        return answers
