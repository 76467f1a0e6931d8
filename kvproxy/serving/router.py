"""Routing by ``model``: each deployment's name maps to the serving logic of its kind."""

from __future__ import annotations

import time

from kvproxy.deployments.build import Deployment
from kvproxy.deployments.embedded import EmbeddedDeployment
from kvproxy.deployments.spec import check_names
from kvproxy.errors import OpenAIError, model_not_found
from kvproxy.protocol import ModelCard, ModelList
from kvproxy.serving.base import Serving
from kvproxy.serving.embedded import EmbeddedServing
from kvproxy.serving.guarded import GuardedServing
from kvproxy.serving.relay import RelayServing


class Router:
    def __init__(self, deployments: list[Deployment]) -> None:
        check_names([d.name for d in deployments], {d.name: d.guard.fallback for d in deployments if d.guard})
        self.deployments = deployments
        own: dict[str, Serving] = {
            d.name: EmbeddedServing(d) if isinstance(d, EmbeddedDeployment) else RelayServing(d)
            for d in deployments
        }
        self._serving = dict(own)
        for d in deployments:
            if d.guard is not None:
                self._serving[d.name] = GuardedServing(d, own[d.name], own[d.guard.fallback])
        self._created = int(time.time())

    def route(self, model: object) -> Serving:
        if model is None:
            raise OpenAIError(400, "Invalid value for 'model': Field required", param="model")
        if not isinstance(model, str):
            raise OpenAIError(400, "Invalid value for 'model': Input should be a valid string", param="model")
        serving = self._serving.get(model)
        if serving is None:
            raise model_not_found(model)
        return serving

    def embedded(self) -> list[EmbeddedDeployment]:
        return [d for d in self.deployments if isinstance(d, EmbeddedDeployment)]

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=d.name, created=self._created) for d in self.deployments])
