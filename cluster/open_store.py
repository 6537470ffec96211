"""Choose and open the store: Redis when a URL is given, else the embedded one."""

from __future__ import annotations

from pathlib import Path

from cluster.embedded_store import EmbeddedStore
from cluster.settings import default_data_dir, redis_url_from_env
from cluster.store import Store

EMBEDDED_DB = "packserve.db"


async def open_store(*, request_unit: int, redis_url: str | None = None, data_dir: Path | None = None) -> Store:
    """`redis_url=None` falls back to PACKSERVE_REDIS_URL, then to the embedded store."""
    url = redis_url or redis_url_from_env()
    if url:
        from cluster.redis_store import RedisStore

        return await RedisStore.connect(url, request_unit=request_unit)
    directory = data_dir or default_data_dir()
    return EmbeddedStore(directory / EMBEDDED_DB, request_unit=request_unit)
