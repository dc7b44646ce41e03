"""systemd integration: sd_notify (Type=notify readiness, watchdog) and the service unit.

sd_notify is one datagram to ``$NOTIFY_SOCKET``; writing it here avoids a dependency for ten
lines. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import sys

UNIT_PATH = "/etc/systemd/system/mossnode.service"


def notify(message: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for, or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


def unit_text(user: str = "mossnode", state_dir: str = "/var/lib/mossnode") -> str:
    return f"""[Unit]
Description=mossnode: peer-to-peer coordination daemon for OpenClaw agents
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={sys.executable} -m mossnode run
Environment=MOSSNODE_STATE_DIR={state_dir}
Environment=MOSSNODE_API_SOCKET=/run/mossnode/api.sock
User={user}
Group={user}
StateDirectory=mossnode
StateDirectoryMode=0700
RuntimeDirectory=mossnode
RuntimeDirectoryMode=0750
WatchdogSec=30
Restart=on-failure
RestartSec=2
TimeoutStopSec=20
KillSignal=SIGTERM
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0077

[Install]
WantedBy=multi-user.target
"""
