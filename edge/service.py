"""``edgefed edge install-service``: a systemd unit that runs the agent and restarts it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

UNIT_TEMPLATE = """\
[Unit]
Description=edgefed edge agent ({agent_id})
Documentation=https://github.com/edgefed/edgefed
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={exec_start}
Restart=always
RestartSec=2
{user_line}Environment=PYTHONUNBUFFERED=1
# The agent keeps its models, outbox and credentials here.
ReadWritePaths={state_dir}
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=true
KillSignal=SIGTERM
TimeoutStopSec=20

[Install]
WantedBy=multi-user.target
"""


def render_unit(
    *, agent_id: str, state_dir: Path, user: str | None = None, python: str | None = None
) -> str:
    """The unit text: ``python -m edgefed.cli edge run --state-dir DIR`` as ``user``."""
    command = [python or sys.executable, "-m", "edgefed.cli", "edge", "run"]
    command += ["--state-dir", str(state_dir)]
    return UNIT_TEMPLATE.format(
        agent_id=agent_id,
        exec_start=shlex.join(command),
        user_line=f"User={user}\n" if user else "",
        state_dir=state_dir,
    )


def write_unit(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
