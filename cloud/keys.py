"""The controller's artifact-signing key: generated on first start, kept with mode 0600; agents
receive its public key when they join, cloud workers read it beside the key (``.pub``)."""

from __future__ import annotations

import logging
from pathlib import Path

from edgefed.common.artifact import SigningKey, generate_signing_key, load_signing_key

log = logging.getLogger(__name__)


def load_or_create_signing_key(path: Path) -> SigningKey:
    """The key at ``path``; a new one (and ``path.pub``) when there is none yet."""
    if path.exists():
        key = load_signing_key(path)
        public = path.with_suffix(".pub")
        if not public.exists():  # workers and operators read the public half from here
            key.verify_key.save(public, overwrite=True)
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key()
    key.save(path)
    key.verify_key.save(path.with_suffix(".pub"), overwrite=True)
    log.warning("generated the controller's artifact-signing key %s (key id %s)", path, key.key_id)
    return key
