"""Staged rollouts of model versions to agents, with gates and automatic rollback
(:class:`~edgefed.cloud.rollout.engine.RolloutEngine`; strategies in
:mod:`edgefed.cloud.rollout.strategy`)."""
