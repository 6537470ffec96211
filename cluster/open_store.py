"""Choose and open the store: Redis when a URL is given, else the embedded one."""

from __future__ import annotations

from pathlib import Path

from cluster.embedded_store import EmbeddedStore
from cluster.settings import default_data_dir, redis_url_from_env
from cluster.store import Store, StoreError
from policies.plans import DEFAULT_CATALOG, PlanCatalog, PlanError

EMBEDDED_DB = "packserve.db"


async def open_store(*, request_unit: int, redis_url: str | None = None, data_dir: Path | None = None,
                     plans: PlanCatalog = DEFAULT_CATALOG, apply_plans: bool = True) -> Store:
    """`redis_url=None` falls back to PACKSERVE_REDIS_URL, then to the embedded store.

    The accounts are brought up to `plans` (store.sync_plans) unless
    `apply_plans` is False (the local CLI, which must not undo the gateways'
    plans when run without their config); a pack kind an account holds but the
    plans lack is a StoreError naming it.
    """
    url = redis_url or redis_url_from_env()
    store: Store
    if url:
        from cluster.redis_store import RedisStore

        store = await RedisStore.connect(url, request_unit=request_unit, plans=plans)
    else:
        directory = data_dir or default_data_dir()
        store = EmbeddedStore(directory / EMBEDDED_DB, request_unit=request_unit, plans=plans)
    try:
        await store.sync_plans(apply_plans)
    except PlanError as exc:
        await store.close()
        raise StoreError(f"the store holds accounts the configured plans cannot serve: {exc}; "
                         "keep that pack kind in plans.packs or move those accounts first") from None
    return store

