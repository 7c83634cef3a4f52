"""The Baseten Loops protocol: the control plane (``/v1/loops``), trainer routes under each run's ``base_url``
(``/loops/trainers/<run_id>``) and sampler routes under each sampler's (``/loops/samplers/<sampler_id>``), over the
same ledger, runs, keys and checkpoints as the Tinker API. Its wire types are its own (``schemas``)."""

from fastapi import APIRouter

from tinkerd.api.loops import control, sampler, trainer
from tinkerd.api.loops.common import LoopsErrorMiddleware

ROUTERS: tuple[APIRouter, ...] = (control.router, trainer.router, sampler.router)

__all__ = ["ROUTERS", "LoopsErrorMiddleware"]
