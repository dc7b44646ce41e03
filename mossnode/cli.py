"""The ``mossnode`` command. Contract: ../shared/design/CLI.md (names, --state-dir, --json).

Errors are one line on stderr and a non-zero exit; commands other than init/id/run talk to the
running daemon only through its API socket.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .api.client import ApiClient, ClientError
from .crypto.identity import Identity, IdentityError, load_identity, save_identity
from .node.config import (
    CONFIG_FILE,
    IDENTITY_FILE,
    Config,
    ConfigError,
    default_state_dir,
    load_config,
    socket_gid,
    socket_path,
    write_config,
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _passphrase() -> bytes | None:
    p = os.environ.get("MOSSNODE_PASSPHRASE")
    return p.encode() if p else None


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text)


def _client(args: argparse.Namespace) -> ApiClient:
    token = os.environ.get("MOSSNODE_TOKEN") or None
    return ApiClient(
        socket_path(args.state_dir), token=token, timeout=getattr(args, "timeout", 30.0) + 5
    )


def cmd_init(args: argparse.Namespace) -> None:
    sd: Path = args.state_dir
    sd.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (sd / IDENTITY_FILE).exists():
        raise CliError(f"{sd / IDENTITY_FILE} already exists; refusing to overwrite an identity")
    ident = Identity.generate()
    save_identity(ident, sd / IDENTITY_FILE, _passphrase())
    cfg = Config()
    if args.listen:
        cfg.listen = args.listen
    if not (sd / CONFIG_FILE).exists():
        write_config(sd, cfg)
    result: dict[str, Any] = {"peer_id": ident.peer_id}
    if args.new_swarm:
        from .node.ledger import save_ledger
        from .protocols.membership import make_genesis

        genesis = make_genesis(ident, args.new_swarm, time.time_ns() // 1_000_000)
        save_ledger(sd, genesis, {})
        result["swarm_id"] = genesis.swarm_id.hex()
    _out(args, result, ident.peer_id)


def cmd_id(args: argparse.Namespace) -> None:
    ident = load_identity(args.state_dir / IDENTITY_FILE, _passphrase())
    _out(args, {"peer_id": ident.peer_id}, ident.peer_id)


def cmd_run(args: argparse.Namespace) -> None:
    import trio

    from .node.daemon import Daemon, DaemonError, tune_gc
    from .node.ledger import LedgerError

    cfg = load_config(args.state_dir)
    socket_gid(cfg)  # a missing api.group stops the start here, with a clear message
    level = getattr(logging, (args.log_level or cfg.log_level).upper(), logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("libp2p", "multiaddr", "hypercorn", "mossnode.hypercorn"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    ident = load_identity(args.state_dir / IDENTITY_FILE, _passphrase())
    tune_gc()
    try:
        daemon = Daemon(args.state_dir, cfg, ident, args.listen or None)
    except LedgerError as exc:
        raise CliError(str(exc)) from None

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for sig in sigs:
                        logging.getLogger("mossnode").info(
                            "got %s, stopping", signal.Signals(sig).name
                        )
                        daemon.stopping.set()
                        return

            nursery.start_soon(on_signals)
            await daemon.run()
            nursery.cancel_scope.cancel()

    try:
        # developers: cProfile stats to this file ("{pid}" is replaced by the process id), in
        # CPU time, so that a busy machine does not blur where the process spends its own time
        profile = os.environ.get("MOSSNODE_PROFILE", "").replace("{pid}", str(os.getpid()))
        if profile:
            import cProfile

            prof = cProfile.Profile(time.process_time)
            try:
                prof.runcall(trio.run, main)
            finally:
                prof.dump_stats(profile)
        else:
            trio.run(main)
    except DaemonError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None


def cmd_status(args: argparse.Namespace) -> None:
    s = _client(args).get("/v1/status")
    text = "\n".join(f"{k}: {v}" for k, v in s.items() if k not in ("rejected", "counters"))
    if s.get("rejected"):
        text += "\nrejected: " + ", ".join(f"{k}={v}" for k, v in sorted(s["rejected"].items()))
    _out(args, s, text)


def cmd_invite(args: argparse.Namespace) -> None:
    inv = _client(args).post("/v1/invites", {"roles": args.role, "ttl_s": args.ttl})
    _out(args, inv, inv["token"])


def cmd_join(args: argparse.Namespace) -> None:
    r = _client(args).post(
        "/v1/join", {"addr": args.multiaddr, "invite": args.invite, "timeout_s": args.timeout}
    )
    _out(args, r, f"joined swarm {r['swarm_id'][:16]}… ({r['members']} members)")


def cmd_peers(args: argparse.Namespace) -> None:
    peers = _client(args).get("/v1/peers")
    lines = [f"{p['peer_id']}  {p['state']:7}  {','.join(p['roles'])}" for p in peers]
    _out(args, peers, "\n".join(lines) or "(no other members)")


def cmd_decisions(args: argparse.Namespace) -> None:
    ds = _client(args).get("/v1/decisions")
    lines = [f"#{d['seq']:<4} {d['kind']:12} {json.dumps(d['payload'])}" for d in ds]
    _out(args, ds, "\n".join(lines))


def _vote_text(v: dict[str, Any]) -> str:
    state = v["result"] or (f"open, certain: {v['decisive']}" if v["decisive"] else "open")
    return (
        f"vote #{v['id']} ({v['rule']}) {v['title']!r}: yes {v['yes']} / no {v['no']} "
        f"of {v['total']}  [{state}]"
    )


def cmd_decide_propose(args: argparse.Namespace) -> None:
    body = {"rule": args.kind, "title": args.title, "text": args.text or ""}
    body["timeout_s"] = args.timeout
    v = _client(args).post("/v1/votes", body)
    _out(args, v, f"{_vote_text(v)}\nvote with: mossnode decide vote {v['id']} yes|no")


def cmd_decide_vote(args: argparse.Namespace) -> None:
    v = _client(args).post(
        f"/v1/votes/{args.id}/vote", {"choice": args.choice, "timeout_s": args.timeout}
    )
    _out(args, v, _vote_text(v))


def cmd_decide_close(args: argparse.Namespace) -> None:
    v = _client(args).post(f"/v1/votes/{args.id}/close", {"timeout_s": args.timeout})
    _out(args, v, _vote_text(v))


def cmd_decide_list(args: argparse.Namespace) -> None:
    vs = _client(args).get("/v1/votes")
    _out(args, vs, "\n".join(_vote_text(v) for v in vs) or "(no votes)")


def cmd_decide_show(args: argparse.Namespace) -> None:
    v = _client(args).get(f"/v1/votes/{args.id}")
    _out(args, v, json.dumps(v, indent=2))


def cmd_install_service(args: argparse.Namespace) -> None:
    import shutil
    import subprocess

    from .node.systemd import UNIT_PATH, unit_text

    text = unit_text()
    if args.print:
        print(text, end="")
        return
    if os.geteuid() != 0:
        raise CliError("install-service needs root (or use --print and install the unit yourself)")
    if shutil.which("systemctl") is None:
        raise CliError("systemctl not found: this host does not run systemd (use --print)")
    r = subprocess.run(["id", "-u", "mossnode"], capture_output=True)
    if r.returncode != 0:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--home-dir",
                "/var/lib/mossnode",
                "--shell",
                "/usr/sbin/nologin",
                "mossnode",
            ],
            check=True,
        )
    Path(UNIT_PATH).write_text(text)
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    _out(args, {"unit": UNIT_PATH}, f"wrote {UNIT_PATH}; next: see README, Deployment with systemd")


def cmd_agent_add(args: argparse.Namespace) -> None:
    a = _client(args).post(
        "/v1/agents",
        {
            "name": args.name,
            "roles": args.role,
            "capabilities": args.capability or [],
            "backend": args.backend,
            "max_concurrency": args.max_concurrency,
        },
    )
    _out(
        args,
        {"name": a["name"], "token": a["token"]},
        f"agent {a['name']} registered; its token (shown once):\n{a['token']}",
    )


def _agent_line(a: dict[str, Any]) -> str:
    return (
        f"{a['name']:20} roles={','.join(a['roles'])} caps={','.join(a['capabilities'])} "
        f"backend={a['backend']}"
    )


def cmd_agent_list(args: argparse.Namespace) -> None:
    agents = _client(args).get("/v1/agents")
    out = [
        {k: a[k] for k in ("name", "roles", "capabilities", "backend", "max_concurrency")}
        for a in agents
    ]
    _out(args, out, "\n".join(_agent_line(a) for a in agents) or "(no agents)")


def cmd_agent_show(args: argparse.Namespace) -> None:
    a = _client(args).get(f"/v1/agents/{args.name}")
    _out(args, a, _agent_line(a))


def cmd_agent_remove(args: argparse.Namespace) -> None:
    r = _client(args).delete(f"/v1/agents/{args.name}")
    _out(args, r, f"removed {r['removed']}")


def cmd_agent_rotate(args: argparse.Namespace) -> None:
    r = _client(args).post(f"/v1/agents/{args.name}/rotate-token", {})
    _out(args, r, r["token"])


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text[:60]!r}") from None


def cmd_task_submit(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {
        "title": args.title,
        "spec": args.spec or "",
        "capabilities": args.capability or [],
        "after": args.after or [],
    }
    if args.input is not None:
        body["input"] = args.input
    if args.contract is not None:
        body["contract"] = args.contract
    if args.confidential_to:
        body["confidential"] = {"roles": args.confidential_to}
    r = _client(args).post("/v1/tasks", body)
    _out(args, r, r["id"])


def cmd_schedule_add(args: argparse.Namespace) -> None:
    task: dict[str, Any] = {
        "title": args.title,
        "spec": args.spec or "",
        "capabilities": args.capability or [],
        "priority": args.priority,
    }
    if args.role is not None:
        task["role"] = args.role
    if args.input is not None:
        task["input"] = args.input
    if args.contract is not None:
        task["contract"] = args.contract
    body: dict[str, Any] = {"id": args.id, "interval_ms": round(args.every * 1000), "task": task}
    if args.start_ms is not None:
        body["start_ms"] = args.start_ms
    if args.end_ms is not None:
        body["end_ms"] = args.end_ms
    if args.overlap:
        body["overlap"] = True
    r = _client(args).post("/v1/schedules", body)
    _out(args, r, f"schedule {r['id']} added (decision #{r['seq']})")


def cmd_schedule_list(args: argparse.Namespace) -> None:
    rows = _client(args).get("/v1/schedules")
    lines = []
    for s in rows:
        when = "removed" if s["removed"] else f"next at {s['next_at']}" if s["next_at"] else "ended"
        last = s["instances"][-1] if s["instances"] else None
        tail = f", last {last['id']} {last['state']}" if last else ""
        lines.append(
            f"{s['id']}  every {s['interval_ms'] / 1000:g}s  {s['task']['title']}  ({when}; "
            f"{s['instance_count']} instances{tail})"
        )
    _out(args, rows, "\n".join(lines) or "(no schedules)")


def cmd_schedule_remove(args: argparse.Namespace) -> None:
    r = _client(args).delete(f"/v1/schedules/{args.id}")
    _out(args, r, f"schedule {args.id} removed (decision #{r['seq']})")


def cmd_task_list(args: argparse.Namespace) -> None:
    path = "/v1/tasks" + (f"?state={args.state}" if args.state else "")
    tasks = _client(args).get(path)
    lines = [f"{t['id']}  {t['state']:11} {t['title']}" for t in tasks]
    _out(args, tasks, "\n".join(lines) or "(no tasks)")


def cmd_task_show(args: argparse.Namespace) -> None:
    t = _client(args).get(f"/v1/tasks/{args.id}")
    _out(args, t, json.dumps(t, indent=2))


def cmd_task_control(args: argparse.Namespace) -> None:
    r = _client(args).post(f"/v1/tasks/{args.id}/{args.verb}", {"reason": args.reason or ""})
    _out(args, r, f"{args.verb}: {r['id']}")


def render_tree(tasks: list[dict[str, Any]], root: str | None = None) -> str:
    """Tasks as a tree by parent, each line: state, progress marker, title, assignee."""
    children: dict[str | None, list[dict[str, Any]]] = {}
    ids = {t["id"] for t in tasks}
    for t in tasks:
        parent = t.get("parent") if t.get("parent") in ids else None
        children.setdefault(parent, []).append(t)
    marks = {
        "done": "✔",
        "failed": "✘",
        "cancelled": "⊘",
        "blocked": "■",
        "in_progress": "▶",
        "review": "?",
        "rework": "↺",
        "assigned": "→",
        "pending": "·",
    }
    lines: list[str] = []

    def walk(node: str | None, depth: int) -> None:
        for t in sorted(children.get(node, []), key=lambda t: t["id"]):
            who = f"  [{t['agent']}@{str(t['assignee'])[-6:]}]" if t.get("assignee") else ""
            lines.append(
                f"{'  ' * depth}{marks.get(t['state'], ' ')} {t['state']:11} "
                f"{t['title']}  ({t['id'][-12:]}){who}"
            )
            walk(t["id"], depth + 1)

    if root is not None:
        top = [t for t in tasks if t["id"] == root]
        for t in top:
            children[None] = [t]
    walk(None, 0)
    return "\n".join(lines) or "(no tasks)"


def cmd_task_tree(args: argparse.Namespace) -> None:
    client = _client(args)
    while True:
        tasks = client.get("/v1/tasks")
        text = render_tree(tasks, args.id)
        if args.json or not args.watch:
            _out(args, tasks, text)
            return
        print("\033[2J\033[H" + text, flush=True)
        if all(t["state"] in ("done", "failed", "cancelled", "blocked") for t in tasks):
            return
        time.sleep(0.5)


def cmd_leaderboard(args: argparse.Namespace) -> None:
    rows = _client(args).get("/v1/leaderboard")
    lines = [
        f"{r['score']:.3f}  {r['agent']:16} {r['node'][-8:]}  done={r['done']} failed={r['failed']}"
        for r in rows
    ]
    _out(args, rows, "\n".join(lines) or "(no history yet)")


def cmd_activity(args: argparse.Namespace) -> None:
    rows = _client(args).get("/v1/activity")
    lines = [f"{r['at']}  {r['state']:11} {r['task'][-12:]}  {r.get('agent') or ''}" for r in rows]
    _out(args, rows, "\n".join(lines) or "(no activity)")


def render_event(ev: dict[str, Any]) -> str:
    """One readable line per event."""
    d, kind = ev.get("data") or {}, ev.get("type")
    if kind == "task":
        who = f"  {d.get('agent')}@{str(d.get('assignee'))[-6:]}" if d.get("assignee") else ""
        what = f"{d.get('task')}  {d.get('old') or '-'} -> {d.get('state')}{who}"
    elif kind == "decision":
        what = f"#{d.get('seq')} {d.get('kind')}"
    elif kind == "peer":
        what = f"{d.get('peer_id')}  {d.get('old') or '-'} -> {d.get('state')}"
    elif kind == "work":
        what = f"{d.get('action')} {d.get('task')} (attempt {d.get('attempt', '-')})"
    else:
        what = json.dumps(d, sort_keys=True)
    return f"{ev.get('id')}  {kind:8} {what}"


def cmd_events(args: argparse.Namespace) -> None:
    types = [t for part in args.types or [] for t in part.split(",") if t]
    if args.count is not None and args.count < 1:
        raise CliError("--count must be at least 1")
    for n, ev in enumerate(_client(args).events(args.since, types or None), start=1):
        print(json.dumps(ev) if args.json else render_event(ev), flush=True)
        if args.count is not None and n >= args.count:
            return


def cmd_swarm(args: argparse.Namespace) -> None:
    r = _client(args).post(f"/v1/swarm/{args.action}", {})
    _out(args, r, f"swarm {args.action}d (decision #{r['seq']})")


def cmd_role(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.action == "grant":
        r = client.post(f"/v1/members/{args.peer_id}/roles", {"role": args.role})
    else:
        r = client.delete(f"/v1/members/{args.peer_id}/roles/{args.role}")
    done = "granted" if args.action == "grant" else "revoked"
    _out(args, r, f"role {args.role} {done} (decision #{r['seq']})")


def cmd_member_remove(args: argparse.Namespace) -> None:
    r = _client(args).delete(f"/v1/members/{args.peer_id}")
    _out(args, r, f"member removed (decision #{r['seq']})")


def _msg_client(args: argparse.Namespace) -> ApiClient:
    """Messages are sent and read as an agent: its token (MOSSNODE_TOKEN), or the operator
    binding one of this host's agents with --agent."""
    token = os.environ.get("MOSSNODE_TOKEN") or None
    agent = getattr(args, "agent", None)
    if not token and not agent:
        raise CliError("messages are sent as an agent: pass --agent NAME or set MOSSNODE_TOKEN")
    timeout = max(getattr(args, "timeout", 0.0), getattr(args, "wait", 0.0)) + 30
    return ApiClient(socket_path(args.state_dir), timeout=timeout, token=token, as_agent=agent)


def _msg_body(text: str) -> Any:
    """A message body: JSON, or else the text itself as a JSON string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _msg_line(m: dict[str, Any]) -> str:
    where = {"topic": f"#{m.get('topic')}", "broadcast": f"role:{m.get('role')}"}
    return (
        f"[{m['seq']}] {m['id']}  {m['mode']} {where.get(m['mode'], '')} from {m['from']}: "
        f"{json.dumps(m['body'])}"
    )


def cmd_msg_send(args: argparse.Namespace) -> None:
    r = _msg_client(args).post(
        "/v1/messages",
        {"to": args.to, "body": _msg_body(args.body), "timeout_s": args.timeout},
    )
    _out(args, r, json.dumps(r["reply"]["body"]))


def cmd_msg_reply(args: argparse.Namespace) -> None:
    r = _msg_client(args).post(f"/v1/messages/{args.id}/reply", {"body": _msg_body(args.body)})
    _out(args, r, f"replied to {r['reply_to']}")


def cmd_msg_publish(args: argparse.Namespace) -> None:
    r = _msg_client(args).post(f"/v1/topics/{args.topic}/publish", {"body": _msg_body(args.body)})
    _out(args, r, r["id"])


def cmd_msg_broadcast(args: argparse.Namespace) -> None:
    r = _msg_client(args).post("/v1/broadcast", {"role": args.role, "body": _msg_body(args.body)})
    _out(args, r, r["id"])


def cmd_msg_inbox(args: argparse.Namespace) -> None:
    query = f"?after={args.after}&wait_s={args.wait}&limit={args.limit}"
    r = _msg_client(args).get("/v1/messages" + query)
    lines = [_msg_line(m) for m in r["messages"]]
    if r["messages"]:
        lines.append(f"(acknowledge with --after {r['next']})")
    if r["dropped"]:
        lines.append(f"({r['dropped']} older message(s) dropped: the inbox was full)")
    _out(args, r, "\n".join(lines) or "(no messages)")


def cmd_msg_topic(args: argparse.Namespace) -> None:
    r = _msg_client(args).post(f"/v1/topics/{args.topic}/{args.action}", {})
    _out(args, r, f"{args.action}d {args.topic}; topics: {', '.join(r['topics']) or '(none)'}")


def cmd_msg_topics(args: argparse.Namespace) -> None:
    r = _msg_client(args).get("/v1/topics")
    _out(args, r, "\n".join(r["topics"]) or "(no topics)")


def cmd_mcp(args: argparse.Namespace) -> None:
    from .api.mcp import run_stdio

    token = os.environ.get("MOSSNODE_TOKEN") or None
    # long enough for a message request (timeout_s up to 300) or an inbox long poll
    client = ApiClient(socket_path(args.state_dir), timeout=330, token=token, as_agent=args.agent)
    run_stdio(client, args.agent)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    if not 1 <= args.nodes <= 32:
        raise CliError("--nodes must be between 1 and 32")
    run_demo(args.nodes, args.keep)


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 1h, 2d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _task_options(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What a task is made of, for ``task submit`` and a schedule's template."""
    sp.add_argument("--title", required=True)
    sp.add_argument("--spec")
    sp.add_argument("--capability", action="append", help="required capability (repeatable)")
    sp.add_argument("--input", type=_json_arg, help="input as JSON")
    sp.add_argument("--contract", type=_json_arg, help="contract as JSON")
    return sp


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the option may stand before or after the subcommand without one erasing the other.
    common.add_argument(
        "--state-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="state directory (env MOSSNODE_STATE_DIR)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document"
    )
    p = argparse.ArgumentParser(
        prog="mossnode",
        parents=[common],
        description="Peer-to-peer coordination daemon for OpenClaw agents.",
    )
    p.add_argument("--version", action="version", version=f"mossnode {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def adder(group: Any) -> Any:
        """A function adding a subcommand that shares the common options to ``group``."""

        def add(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
            sp: argparse.ArgumentParser = group.add_parser(
                name, parents=[common], help=help_, description=help_
            )
            sp.set_defaults(fn=fn)
            return sp

        return add

    add = adder(sub)

    sp = add("init", cmd_init, "create this node's identity and config")
    sp.add_argument("--new-swarm", metavar="NAME", help="found a new swarm with this name")
    sp.add_argument("--listen", action="append", metavar="MULTIADDR", help="listen address(es)")
    add("id", cmd_id, "print this node's PeerID")
    sp = add("run", cmd_run, "run the daemon in the foreground")
    sp.add_argument("--listen", action="append", metavar="MULTIADDR", help="listen address(es)")
    sp.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    add("status", cmd_status, "show the running node's status")
    sp = add("invite", cmd_invite, "create a single-use, expiring invite")
    sp.add_argument("--role", action="append", required=True, help="role to grant (repeatable)")
    sp.add_argument("--ttl", type=parse_duration, default=3600.0, help="validity, e.g. 1h")
    sp = add("join", cmd_join, "join a swarm through one of its members")
    sp.add_argument("multiaddr", help="a member's address ending in /p2p/<peer id>")
    sp.add_argument("--invite", required=True, help="invite token from `mossnode invite`")
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for admission")
    add("peers", cmd_peers, "list members and their health")
    add("decisions", cmd_decisions, "show the decided log with its certificates")
    decide = sub.add_parser(
        "decide", parents=[common], help="group decisions: votes finalized by consensus"
    )
    dsub = decide.add_subparsers(dest="decide_command", required=True, metavar="ACTION")

    dadd = adder(dsub)

    sp = dadd("propose", cmd_decide_propose, "open a vote (its id is the decision's seq)")
    sp.add_argument(
        "kind",
        metavar="KIND",
        choices=["majority", "reputation"],
        help="how ballots count: majority (one per member) or reputation (leaderboard-weighted)",
    )
    sp.add_argument("--title", required=True, help="the question, 1-200 characters")
    sp.add_argument("--text", help="details")
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the decision")
    sp = dadd("vote", cmd_decide_vote, "cast this node's ballot in a vote")
    sp.add_argument("id", type=int, metavar="ID")
    sp.add_argument("choice", choices=["yes", "no"])
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the decision")
    sp = dadd("close", cmd_decide_close, "finalize a vote's outcome (the proposer: early)")
    sp.add_argument("id", type=int, metavar="ID")
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the decision")
    dadd("list", cmd_decide_list, "votes and their tallies")
    dadd("show", cmd_decide_show, "one vote with its electorate and ballots").add_argument(
        "id", type=int, metavar="ID"
    )
    agent = sub.add_parser("agent", parents=[common], help="manage this host's agents")
    asub = agent.add_subparsers(dest="agent_command", required=True, metavar="ACTION")

    aadd = adder(asub)

    sp = aadd("add", cmd_agent_add, "register a local agent and print its token once")
    sp.add_argument("name")
    sp.add_argument("--role", action="append", required=True, help="role (repeatable)")
    sp.add_argument("--capability", action="append", help="capability (repeatable)")
    sp.add_argument(
        "--backend", required=True, help="exec:COMMAND, openclaw:AGENT_ID or api (pulls its work)"
    )
    sp.add_argument(
        "--max-concurrency",
        type=int,
        default=1,
        help="tasks it runs at once (1..8, the swarm's limit)",
    )
    aadd("list", cmd_agent_list, "list this host's agents")
    for verb, fn, help_ in (
        ("show", cmd_agent_show, "show one agent"),
        ("remove", cmd_agent_remove, "remove an agent and revoke its token"),
        ("rotate-token", cmd_agent_rotate, "replace an agent's token"),
    ):
        aadd(verb, fn, help_).add_argument("name")
    task = sub.add_parser("task", parents=[common], help="submit and follow tasks")
    tsub = task.add_subparsers(dest="task_command", required=True, metavar="ACTION")

    tadd = adder(tsub)

    sp = _task_options(tadd("submit", cmd_task_submit, "create a task"))
    sp.add_argument("--after", action="append", metavar="ID", help="dependency (repeatable)")
    sp.add_argument(
        "--confidential-to",
        action="append",
        metavar="ROLE",
        help="seal input and output to nodes with agents of ROLE (repeatable)",
    )
    sp = tadd("list", cmd_task_list, "tasks in the swarm")
    sp.add_argument("--state")
    tadd("show", cmd_task_show, "one task with its log and results").add_argument("id")
    for verb in ("cancel", "pause", "resume", "reassign"):
        sp = tadd(verb, cmd_task_control, f"{verb} a task (and its subtree)")
        sp.add_argument("id")
        sp.add_argument("--reason")
        sp.set_defaults(verb=verb)
    sp = tadd("tree", cmd_task_tree, "the task tree with states")
    sp.add_argument("id", nargs="?")
    sp.add_argument("--watch", action="store_true", help="refresh until every task has ended")
    sched = sub.add_parser("schedule", parents=[common], help="recurring tasks")
    ssub = sched.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    sadd = adder(ssub)
    sp = sadd("add", cmd_schedule_add, "have the swarm create a task every interval")
    sp.add_argument("id", help="the schedule's id (1-64 of [A-Za-z0-9._-])")
    sp.add_argument("--every", type=parse_duration, required=True, help="interval, e.g. 30s, 1h")
    _task_options(sp)
    sp.add_argument("--role", help="role the agent must hold")
    sp.add_argument("--priority", type=float, default=0.0)
    sp.add_argument("--start-ms", type=int, help="first period's start (ms since epoch; now)")
    sp.add_argument("--end-ms", type=int, help="no period starts at or after this time")
    sp.add_argument(
        "--overlap",
        action="store_true",
        help="start each period on time even while an earlier instance is still live",
    )
    sadd("list", cmd_schedule_list, "decided schedules and their instances")
    sadd("remove", cmd_schedule_remove, "stop a schedule (a consensus decision)").add_argument("id")
    sp = add("swarm", cmd_swarm, "swarm-wide decisions: pause (kill switch) or resume dispatch")
    sp.add_argument("action", choices=["pause", "resume"])
    sp = add("role", cmd_role, "grant or revoke a member's role (a consensus decision)")
    sp.add_argument("action", choices=["grant", "revoke"])
    sp.add_argument("peer_id", metavar="PEER_ID")
    sp.add_argument("role", metavar="ROLE")
    sp = add("member", cmd_member_remove, "remove a member from the swarm (a consensus decision)")
    sp.add_argument("action", choices=["remove"])
    sp.add_argument("peer_id", metavar="PEER_ID")
    add("leaderboard", cmd_leaderboard, "reputation of agents, from the replicated history")
    add("activity", cmd_activity, "the activity feed: task state changes")
    _add_msg(sub, common)
    sp = add("events", cmd_events, "follow the event stream (one line, or JSON object, each)")
    sp.add_argument("--since", type=int, metavar="ID", help="resume after this event id")
    sp.add_argument(
        "--types", action="append", metavar="T[,T]", help="only task, decision, peer, work"
    )
    sp.add_argument("--count", type=int, metavar="N", help="stop after N events")
    sp = add("mcp", cmd_mcp, "MCP server on stdio for one local agent (for OpenClaw)")
    sp.add_argument("--agent", required=True, help="the local agent this server acts as")
    sp = add("install-service", cmd_install_service, "install the systemd unit")
    sp.add_argument("--print", action="store_true", help="print the unit instead of installing it")
    sp = add("demo", cmd_demo, "run a local demo swarm on loopback")
    sp.add_argument("--nodes", type=int, default=3)
    sp.add_argument("--keep", action="store_true", help="leave the nodes running")
    return p


def _add_msg(sub: Any, common: argparse.ArgumentParser) -> None:
    """``mossnode msg ...``: agent messaging, as one agent (--agent NAME or MOSSNODE_TOKEN)."""
    as_agent = argparse.ArgumentParser(add_help=False)
    as_agent.add_argument(
        "--agent",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="act as this local agent (operator only; else MOSSNODE_TOKEN)",
    )
    msg = sub.add_parser(
        "msg", parents=[common, as_agent], help="agent messaging: requests, topics, broadcasts"
    )
    msub = msg.add_subparsers(dest="msg_command", required=True, metavar="ACTION")

    def madd(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = msub.add_parser(
            name, parents=[common, as_agent], help=help_, description=help_
        )
        sp.set_defaults(fn=fn)
        return sp

    body_help = "the body: JSON, or else taken as a string"
    sp = madd("send", cmd_msg_send, "send a request to an agent and print its reply")
    sp.add_argument("to", help="AGENT@PEER_ID, or an agent name known in the swarm")
    sp.add_argument("body", help=body_help)
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    sp = madd("reply", cmd_msg_reply, "reply to a request in your inbox")
    sp.add_argument("id", help="the request's id")
    sp.add_argument("body", help=body_help)
    sp = madd("publish", cmd_msg_publish, "publish to a topic's subscribers on every node")
    sp.add_argument("topic")
    sp.add_argument("body", help=body_help)
    sp = madd("broadcast", cmd_msg_broadcast, "send to every agent holding a role")
    sp.add_argument("role")
    sp.add_argument("body", help=body_help)
    sp = madd("inbox", cmd_msg_inbox, "read your inbox (--after SEQ acknowledges up to SEQ)")
    sp.add_argument("--after", type=int, default=0, metavar="SEQ")
    sp.add_argument("--wait", type=float, default=0.0, help="seconds to wait for a message")
    sp.add_argument("--limit", type=int, default=100)
    for action in ("subscribe", "unsubscribe"):
        sp = madd(action, cmd_msg_topic, f"{action} to a topic")
        sp.add_argument("topic")
        sp.set_defaults(action=action)
    madd("topics", cmd_msg_topics, "the topics you follow")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.state_dir = getattr(args, "state_dir", None) or default_state_dir()
    args.json = getattr(args, "json", False)
    try:
        args.fn(args)
    except (CliError, ClientError, IdentityError, ConfigError) as exc:
        print(f"mossnode: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # e.g. `mossnode task show ID | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
