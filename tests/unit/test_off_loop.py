"""Small requests are decoded on the event loop; larger ones on the text threads."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from services.servicer import INLINE_BYTES, ModelServicer


def test_small_requests_stay_on_the_event_loop_and_large_ones_go_to_the_text_threads():
    pool = ThreadPoolExecutor(1, thread_name_prefix="text")
    servicer = SimpleNamespace(text_pool=pool)

    async def where(size):
        return await ModelServicer.off_loop(servicer, lambda: threading.current_thread().name, size=size)

    async def main():
        here = threading.current_thread().name
        return here, await where(INLINE_BYTES), await where(INLINE_BYTES + 1), await where(None)

    try:
        here, small, large, unsized = asyncio.run(main())
    finally:
        pool.shutdown()
    assert small == here and large.startswith("text") and unsized.startswith("text")
