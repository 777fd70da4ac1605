"""The torch side of federated learning, shared by the Flower client (edge.training) and server
(cloud.federation): the model from an HF config, state <-> numpy arrays, local training, evaluation.

Needs the ``edge-train`` or ``cloud`` extra (torch, transformers, peft); never imports flwr.
"""
