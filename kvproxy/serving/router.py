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
    """``max_tokens_default``: the completion limit of requests that set none (0: the context's
    room; the settings' ``max_tokens_default``)."""

    def __init__(self, deployments: list[Deployment], *, max_tokens_default: int = 0) -> None:
        check_names([d.name for d in deployments], {d.name: d.guard.fallback for d in deployments if d.guard})
        self.deployments = deployments
        self.max_tokens_default = max_tokens_default
        limit = max_tokens_default
        own: dict[str, Serving] = {
            d.name: EmbeddedServing(d, max_tokens_default=limit)
            if isinstance(d, EmbeddedDeployment)
            else RelayServing(d, max_tokens_default=limit)
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

    def model(self, name: str) -> ModelCard:
        """``GET /v1/models/{id}``: the served model of that name, or a 404."""
        if not any(d.name == name for d in self.deployments):
            raise model_not_found(name)
        return ModelCard(id=name, created=self._created)
