"""HTTP routes, one module per resource; every path lives under /api/v1."""

from fastapi import APIRouter

from tinkerd.api.routes import (
    account,
    client,
    downloads,
    futures,
    metrics,
    rest,
    sampling,
    sessions,
    training,
    unsupported,
)

ROUTERS: tuple[APIRouter, ...] = (
    client.router,
    sessions.router,
    training.router,
    sampling.router,
    futures.router,
    rest.router,
    metrics.router,
    downloads.router,
    account.router,
    unsupported.router,  # last: catches requests to endpoints no other router has
)
