"""asyncio access to any ``Matcher`` (``Local`` or ``Remote``): the same core, awaited.

Each call runs the synchronous core on a worker thread, so coroutines can
keep many requests in flight (a ``Remote`` keeps one Triton client per
thread) while the event loop stays free. Nothing about encoding, batching or
scoring is written twice.

    >>> m = await clipmatch.aio.connect("grpc://localhost:8001", "exports/default")  # doctest: +SKIP
    >>> results = await asyncio.gather(*(m.rescore(q, gallery[:20]) for q in queries))  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from clipmatch.backends.triton import Remote, TritonOptions
from clipmatch.config import DEFAULT_CONFIG, RuntimeConfig
from clipmatch.matcher import Matcher

__all__ = ["AsyncMatcher", "connect"]


class AsyncMatcher:
    """Awaitable ``encode_images``, ``encode_texts``, ``cosine`` and ``rescore`` of one matcher."""

    def __init__(self, matcher: Matcher):
        self.matcher = matcher

    async def encode_images(self, images: Any):
        return await asyncio.to_thread(self.matcher.encode_images, images)

    async def encode_texts(self, texts: Any):
        return await asyncio.to_thread(self.matcher.encode_texts, texts)

    async def cosine(self, images: Any, texts: Any):
        return await asyncio.to_thread(self.matcher.cosine, images, texts)

    async def rescore(self, text: Any, images: Any, **kwargs):
        return await asyncio.to_thread(self.matcher.rescore, text, images, **kwargs)

    async def close(self) -> None:
        close = getattr(self.matcher, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    async def __aenter__(self) -> AsyncMatcher:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def connect(url: str, export_dir: str | Path, *, config: RuntimeConfig = DEFAULT_CONFIG,
                  **options) -> AsyncMatcher:
    """``clipmatch.connect`` for asyncio: the identity and health checks run off the event loop."""
    remote = await asyncio.to_thread(Remote, url, export_dir, config, TritonOptions(**options))
    return AsyncMatcher(remote)
