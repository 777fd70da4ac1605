"""What both sides of edgefed speak: settings, errors, wire schemas, topics, the MQTT adapter,
the tensor wire format and the model artifact format. Light dependencies only."""
