"""MQTT credentials and ACLs the controller issues: one broker user per agent (its id and a
random password, kept hashed), the broker's password and ACL files rendered from the registry,
and the broker told to re-read them (SIGHUP) when the fleet changes."""
