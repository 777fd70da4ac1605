"""The config a server sends with every train/evaluate message (the message contract's keys),
built here so the server, the simulation and the tests send exactly what the client reads."""

from __future__ import annotations

from edgefed.common.training.model import FederatedModel
from edgefed.common.training.settings import TrainSettings


def message_config(
    fm: FederatedModel, settings: TrainSettings, *, server_round: int
) -> dict[str, int | float | str]:
    """``server-round``, ``task``, ``model-config``, ``tokenizer``, ``model-digest`` and the
    training settings, ready for a Flower ``ConfigRecord``."""
    return {
        "server-round": server_round,
        "task": fm.task,
        "model-config": fm.config_json,
        "tokenizer": fm.tokenizer_json,
        "model-digest": fm.digest,
        **settings.to_config(),
    }
