"""Orchestration of the cloud side: the Kubernetes adapter (server-side apply, scaling, rollout
status, node labels) and the autoscaler of cloud worker pools, which resizes a pool through a
:class:`~edgefed.cloud.orchestration.scaler.WorkerScaler` (a Kubernetes Deployment in
production, worker processes in the simulation harness)."""
