"""`UnknownModel`: a model id or adapter that reached an engine which does not serve it.

The gateway resolves every id against its catalog first, so this only happens
when a replica's catalog differs from the gateway's (a redeploy in progress,
an adapter a replica has not loaded): the client gets a 404 `model_not_found`
in its API's shape, never a 500. A `KeyError` subclass, so engines that still
raise a bare `KeyError` for an id they do not serve are read the same way at
the replica boundary (serve_apps/deploy/engine_proxy.py).
"""

from __future__ import annotations


class UnknownModel(KeyError):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model

    def __str__(self) -> str:
        return self.model

    def __reduce__(self) -> tuple[type[UnknownModel], tuple[str]]:
        # Crosses the Ray boundary pickled; KeyError's own reduce would lose the subclass's argument name.
        return (type(self), (self.model,))
