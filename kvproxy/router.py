"""Routing by ``model``: each deployment's name maps to the serving logic of its kind."""

from __future__ import annotations

import time

from kvproxy.deployment import Deployment, EmbeddedDeployment
from kvproxy.errors import OpenAIError, model_not_found
from kvproxy.guarded import GuardedServing, Serving
from kvproxy.protocol import ModelCard, ModelList
from kvproxy.relay import RelayServing
from kvproxy.serving import OpenAIServing


class Router:
    def __init__(self, deployments: list[Deployment]) -> None:
        names = [d.name for d in deployments]
        if len(set(names)) != len(names):
            raise ValueError(f"deployment names must be unique: {names}")
        self.deployments = deployments
        own: dict[str, Serving] = {
            d.name: OpenAIServing(d) if isinstance(d, EmbeddedDeployment) else RelayServing(d)
            for d in deployments
        }
        self._serving = dict(own)
        for d in deployments:
            if d.guard is not None:
                if d.guard.fallback not in own:
                    raise ValueError(
                        f"deployment {d.name}: no deployment {d.guard.fallback!r} to fall back to"
                    )
                self._serving[d.name] = GuardedServing(d, own[d.name], own[d.guard.fallback])
        self._own = own
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

    def embedded_servings(self) -> list[OpenAIServing]:
        return [s for s in self._own.values() if isinstance(s, OpenAIServing)]

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=d.name, created=self._created) for d in self.deployments])
