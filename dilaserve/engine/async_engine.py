"""The async interface the serving layer uses.

``add_request`` validates at once (raising InvalidRequestError) and returns an async iterator
of ``RequestOutput``; a background task runs engine steps in a worker thread (PyTorch releases
the GIL) so the event loop keeps serving HTTP while the model computes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator


from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine, build_engine
from dilaserve.engine.tensor_parallel import ModelSource
from dilaserve.engine.sampling_params import RequestOutput, SamplingParams
from dilaserve.engine.stats import EngineStats
from dilaserve.errors import InvalidRequestError
from dilaserve.models.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def _seed_from_profile(engine: Engine, path: str | None, model_dir: str) -> None:
    """Tokens per step from the named quality profile, else the model's own, if it ships one."""
    candidate = Path(path) if path else Path(model_dir) / "quality_profile.json"
    if not candidate.is_file():
        if path:
            raise ValueError(f"quality profile {path} does not exist")
        return
    try:
        seeded = engine.seed_quality_profile(json.loads(candidate.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"quality profile {candidate} is malformed: {exc}") from exc
    logger.info("seeded tokens per step for %d thresholds from %s", seeded, candidate)


class AsyncEngine:
    def __init__(self, model_dir: str, config: EngineConfig | None = None, device: str = "cpu",
                 dtype: str = "float32", engine: Engine | None = None):
        if engine is None:
            engine = build_engine(ModelSource(model_dir=model_dir, dtype=dtype, device=device), config)
            try:
                _seed_from_profile(engine, config.quality_profile if config else None, model_dir)
            except BaseException:
                engine.close()
                raise
        self.engine = engine
        self.spec = engine.spec
        self.tokenizer = load_tokenizer(model_dir) if model_dir else None
        self._streams: dict[str, asyncio.Queue] = {}
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dilaserve-engine")
        self._error: BaseException | None = None

    async def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dilaserve-engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if self._error is not None:
            raise RuntimeError(f"the engine loop failed: {self._error}")
        request = self.engine.make_request(request_id, prompt_ids, params, deadline)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self.engine.add(request)
        if self._wakeup is not None:
            self._wakeup.set()
        return self._stream(request_id, queue)

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed while decoding {request_id}: {item}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (client disconnect): free its resources
                self.engine.abort(request_id)
                if self._wakeup is not None:
                    self._wakeup.set()
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def check_health(self) -> None:
        """Raises if the step loop has died (the serving layer then replaces this replica)."""
        if self._error is not None:
            raise RuntimeError(f"the engine loop failed: {self._error}")
        if self._task is not None and self._task.done():
            raise RuntimeError("the engine loop has stopped")
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            check()

    @property
    def is_calibrated(self) -> bool:
        return bool(getattr(self.engine, "is_calibrated", True))

    def predict_latency_s(self, prompt_len: int, params: SamplingParams, threshold: float | None = None) -> float:
        return self.engine.predict_latency_s(prompt_len, params, threshold)

    def predict_finish_s(self, prompt_len: int, params: SamplingParams, threshold: float | None = None,
                         reserve: float = 0.0) -> float:
        return self.engine.predict_finish_s(prompt_len, params, threshold, reserve)

    def predict_min_slack_s(self, prompt_len: int, params: SamplingParams, threshold: float | None = None,
                            reserve: float = 0.0) -> float:
        return self.engine.predict_min_slack_s(prompt_len, params, threshold, reserve)

    def set_policy(self, *, default_threshold: float | None = None, max_waiting: int | None = None) -> None:
        """Live changes, applied from the next admitted request on (running ones keep theirs)."""
        if default_threshold is not None:
            if not 0.0 < default_threshold <= 1.0:
                raise InvalidRequestError(f"threshold must be in (0, 1], got {default_threshold}")
            self.engine.default_threshold = default_threshold
        if max_waiting is not None:
            if max_waiting < 0:
                raise InvalidRequestError("max_waiting must be >= 0")
            self.engine.max_waiting = max_waiting

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_work():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as exc:  # a failed step fails its requests, never silently
                logger.exception("engine step failed")
                self._error = exc
                for queue in self._streams.values():
                    queue.put_nowait(exc)
                raise
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
            await asyncio.sleep(0)
