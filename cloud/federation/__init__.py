"""Federated learning, server side: update validation, strategies (Flower's and FLTrust), the
Flower ServerApp, the deployment engine (SuperLink, runs) and the closed loop to a new version."""
