"""Cloud workers (``edgefed cloud worker``): pools of processes serving models to requests
routed to the cloud, sharing the work through an MQTT shared subscription."""
