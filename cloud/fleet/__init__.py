"""The controller's view of the fleet over MQTT: live agent status and heartbeats
(:class:`~edgefed.cloud.fleet.monitor.FleetMonitor`) and the retained desired state of every
agent (:class:`~edgefed.cloud.fleet.desired.DesiredStatePublisher`)."""
