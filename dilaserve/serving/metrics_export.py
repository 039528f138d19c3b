"""``GET /metrics`` on the ingress: DiLaServe's and Serve's metrics from every node, in one page.

Ray exports metrics per node, on each node's metrics export port, for Prometheus to scrape
(the production path: see cluster_configs/README.md). For a user with one URL (and for
tests), the ingress also gathers those pages, keeps the ``ray_dilaserve_*`` families, and
merges them into one Prometheus text page.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

PREFIXES = ("ray_dilaserve_",)
# Labels Ray's exporter adds that say nothing to a DiLaServe user (they stay on the raw pages).
_DROPPED_LABELS = ("Component", "SessionName", "Version", "WorkerId", "otel_scope_name", "otel_scope_schema_url",
                   "otel_scope_version")


def node_metrics_urls() -> list[str]:
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")
    ]


def merge_metrics_pages(pages: Iterable[str], prefixes: tuple[str, ...] = PREFIXES) -> bytes:
    """One Prometheus text page holding the chosen families of all ``pages``."""
    families: dict[str, Metric] = {}
    for page in pages:
        try:
            parsed = list(text_string_to_metric_families(page))
        except ValueError as exc:
            logger.warning("skipping a metrics page that does not parse: %s", exc)
            continue
        for family in parsed:
            if not family.name.startswith(prefixes):
                continue
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples.extend(
                s._replace(labels={k: v for k, v in s.labels.items() if k not in _DROPPED_LABELS})
                for s in family.samples
            )

    class _Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


async def gather_cluster_metrics(timeout_s: float = 3.0) -> bytes:
    urls = await asyncio.to_thread(node_metrics_urls)
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        responses = await asyncio.gather(*(client.get(url) for url in urls), return_exceptions=True)
    pages = []
    for url, resp in zip(urls, responses):
        if isinstance(resp, Exception) or resp.status_code != 200:
            logger.warning("metrics from %s unavailable: %s", url, resp)
            continue
        pages.append(resp.text)
    return merge_metrics_pages(pages)
