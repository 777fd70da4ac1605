"""The controller's side of conversation sessions (issue 11): the directory and replica of every
session (registry table ``sessions``), placement on a holder, handoffs between holders, expiry
and deletion of every copy. See :mod:`edgefed.cloud.sessions.service`."""
