"""The torch side of federated learning, shared by the Flower client (edge.training) and server
(cloud.federation): the model from an HF config, state <-> numpy arrays, local training, evaluation.

Needs the ``edge-train`` or ``cloud`` extra (torch, transformers, peft); never imports flwr.
"""

from edgefed.common.training.errors import TrainingError
from edgefed.common.training.local import EvalOutcome, TrainOutcome, evaluate, train_local
from edgefed.common.training.model import FederatedModel, encoder_layers
from edgefed.common.training.protocol import message_config
from edgefed.common.training.settings import TRAIN_MODES, TrainMode, TrainSettings

__all__ = [
    "TRAIN_MODES",
    "EvalOutcome",
    "FederatedModel",
    "TrainMode",
    "TrainOutcome",
    "TrainSettings",
    "TrainingError",
    "encoder_layers",
    "evaluate",
    "message_config",
    "train_local",
]
