"""The node's state dir and its TOML config.

The state dir holds ``identity.key`` (0600), ``config.toml``, ``state.db`` (SQLite), ``api.sock``
and ``listen_addrs`` while running. Defaults are chosen for a daemon, not a library: a presence
heartbeat every second and peers declared dead after a few missed beats.
"""

from __future__ import annotations

import grp
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs
import tomli_w

IDENTITY_FILE = "identity.key"
CONFIG_FILE = "config.toml"
SOCKET_FILE = "api.sock"
LISTEN_FILE = "listen_addrs"
DB_FILE = "state.db"
# [api] keys and the Config fields they set (the node.api_socket* spellings are accepted too)
API_KEYS = {
    "socket": "api_socket",
    "mode": "api_socket_mode",
    "group": "api_socket_group",
    "event_buffer": "api_event_buffer",
    "event_queue": "api_event_queue",
    "keepalive_s": "api_keepalive_s",
}


class ConfigError(Exception):
    """The config is missing or invalid; the message names the key and the problem."""


def default_state_dir() -> Path:
    env = os.environ.get("MOSSNODE_STATE_DIR")
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir("mossnode", appauthor=False))


@dataclass
class Config:
    """Everything the daemon reads from ``config.toml``; unknown keys are refused, not ignored."""

    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = False
    presence_interval_s: float = 1.0
    presence_budget: float = 8.0  # heartbeats/s a node receives at most: large swarms beat slower
    suspect_after_s: float = 3.0
    dead_after_s: float = 6.0
    join_window_s: float = 5.0
    max_envelope_bytes: int = 1 << 20
    max_clock_skew_s: float = 30.0
    gossip_heartbeat_s: float = 1.0
    # a pull agent with no event stream and no API call for this long is offline: it takes no
    # new work, and work it holds goes back to the swarm
    pull_idle_s: float = 120.0
    api_socket: str = ""  # empty: <state_dir>/api.sock; [api] socket
    api_socket_mode: int = 0o660  # [api] mode
    api_socket_group: str = ""  # [api] group; empty: the daemon user's primary group
    api_event_buffer: int = 10_000  # [api] event_buffer: events kept for resuming streams
    api_event_queue: int = 1_000  # [api] event_queue: events a slow stream may fall behind
    api_keepalive_s: float = 15.0  # [api] keepalive_s: comment on an idle event stream
    log_level: str = "info"

    def to_toml(self) -> str:
        node = {k: v for k, v in asdict(self).items() if k not in API_KEYS.values()}
        api: dict[str, Any] = {k: getattr(self, f) for k, f in API_KEYS.items()}
        api["mode"] = f"{self.api_socket_mode:04o}"
        return tomli_w.dumps({"node": node, "api": api})

    @classmethod
    def from_toml(cls, text: str, source: str = "config.toml") -> Config:
        try:
            data: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        node = dict(data.get("node", {}))
        extra = set(data) - {"node", "api"}
        if extra:
            raise ConfigError(f"{source}: unknown section(s): {', '.join(sorted(extra))}")
        api = data.get("api", {})
        if not isinstance(api, dict):
            raise ConfigError(f"{source}: api must be a section ([api])")
        for key, value in api.items():
            if key not in API_KEYS:
                raise ConfigError(f"{source}: unknown key api.{key}; known: {', '.join(API_KEYS)}")
            if key == "mode" and isinstance(value, str):
                try:
                    value = int(value, 8)
                except ValueError:
                    raise ConfigError(f'{source}: api.mode must be octal like "0660"') from None
            node[API_KEYS[key]] = value
        known = {f.name: f for f in fields(cls)}
        cfg = cls()
        for key, value in node.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key node.{key}")
            default = getattr(cfg, key)
            ok = isinstance(value, type(default)) or (
                isinstance(default, float)
                and isinstance(value, int)
                and not isinstance(value, bool)
            )
            if not ok:
                raise ConfigError(
                    f"{source}: node.{key} must be {type(default).__name__}, "
                    f"got {type(value).__name__}"
                )
            setattr(cfg, key, type(default)(value) if isinstance(default, float) else value)
        if not 0 < cfg.suspect_after_s < cfg.dead_after_s:
            raise ConfigError(f"{source}: need 0 < suspect_after_s < dead_after_s")
        if cfg.presence_interval_s <= 0:
            raise ConfigError(f"{source}: presence_interval_s must be > 0")
        if cfg.presence_budget <= 0:
            raise ConfigError(f"{source}: presence_budget must be > 0")
        if cfg.pull_idle_s <= 0:
            raise ConfigError(f"{source}: pull_idle_s must be > 0")
        if cfg.api_event_buffer < 1 or cfg.api_event_queue < 1 or cfg.api_keepalive_s <= 0:
            raise ConfigError(f"{source}: api.event_buffer, event_queue, keepalive_s must be > 0")
        if not 0 <= cfg.api_socket_mode <= 0o777:
            raise ConfigError(f'{source}: api.mode must be a file mode like "0660"')
        return cfg


def load_config(state_dir: Path) -> Config:
    """Read ``config.toml``; ``MOSSNODE_API_SOCKET`` overrides the socket path (systemd sets it)."""
    path = state_dir / CONFIG_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no config at {path}; run `mossnode init` first") from None
    cfg = Config.from_toml(text, str(path))
    if os.environ.get("MOSSNODE_API_SOCKET"):
        cfg.api_socket = os.environ["MOSSNODE_API_SOCKET"]
    return cfg


def socket_gid(cfg: Config) -> int | None:
    """The gid the API socket is given (None: the daemon's own), checked before the daemon
    starts so that a misspelt group stops it with a clear message, not a half-open socket."""
    name = cfg.api_socket_group
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"api.group {name!r} does not exist on this host; create it (groupadd {name}) "
            "or change api.group in config.toml"
        ) from None


def socket_path(state_dir: Path) -> Path:
    """Where the daemon of this state dir serves its API (for clients)."""
    if os.environ.get("MOSSNODE_API_SOCKET"):
        return Path(os.environ["MOSSNODE_API_SOCKET"])
    try:
        cfg = load_config(state_dir)
    except ConfigError:
        return state_dir / SOCKET_FILE
    return Path(cfg.api_socket) if cfg.api_socket else state_dir / SOCKET_FILE


def write_config(state_dir: Path, cfg: Config) -> None:
    path = state_dir / CONFIG_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(cfg.to_toml())
    os.replace(tmp, path)
