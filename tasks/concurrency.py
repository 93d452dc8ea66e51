"""One at a time: the global concurrency limits that keep runs which must not overlap apart.

Two backups of one GitLab host, two certificate renewals of one cluster: each takes the one slot
of a named global concurrency limit (`prefect.concurrency.asyncio.concurrency(name, occupy=1)`),
created here when missing, so a second run waits (or times out) instead of overlapping.
"""

from __future__ import annotations


async def exclusive_limit(name: str) -> str:
    """Create or update the global concurrency limit `name` with one slot; returns its name."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(name, 1)
    return name
