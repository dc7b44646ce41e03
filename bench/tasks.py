"""End-to-end task throughput across 4 daemons, and takeover time after an assignee dies.

Throughput: N tasks (200, then 1,000) submitted concurrently through the 4 nodes' APIs
(``CALLERS`` submitters per node, each making one call at a time, through a lean client so that
the load is the daemons' own); each is bid on, assigned, run by a trivial exec agent (`cat`:
echoes the task JSON; ``AGENTS`` of them per node, 8 runs at once each, the swarm's limit per
agent) and submitted; the clock stops when every task is done on the submitting side. Printed
too: the rate over the middle half (from a quarter to three quarters done, the pipeline full),
the create calls' latency, the daemons' CPU per task. Takeover: a sleeping task's
assignee is killed (SIGKILL); the time until another node has claimed it and runs it, against
lease + 2 s. History: one node's scheduler step (sans-IO) with 100,000 finished tasks in its
view, against a full pass over them: a step must cost the changes, not the history. In flight:
the schedulers' CPU per task while 4 nodes run 1,000 tasks through bids, claims and results
(sans-IO: simulated clock and gossip, the same work every run, so other load on the machine
moves the figure far less than it moves the wall-clock ones).
"""

from __future__ import annotations

import heapq
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.unixhttp import UnixApi
from mossnode.cluster import Cluster, wait_for
from mossnode.node.daemon import tune_gc
from mossnode.node.tasks import FINISH_SPACING_S, MIN_TICK_S, TICK_SPACING_S
from mossnode.protocols import tasks as T
from mossnode.protocols.tasks import Params

SIZES = tuple(int(n) for n in os.environ.get("BENCH_TASKS_SIZES", "200,1000").split(","))
NODES = 4
# Submitters per node, each making one create call at a time: a node serves several agents
# (planners) at once, and the node's writes made together share one signed entry.
CALLERS = int(os.environ.get("BENCH_TASKS_CALLERS", "4"))
# Exec agents per node. With one (8 slots), the slots alone cap 4 nodes near 200 tasks/s even
# with CPU to spare (the sans-IO pipeline line of in_flight() shows it); a host runs several.
AGENTS = int(os.environ.get("BENCH_TASKS_AGENTS", "2"))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes and their reaped children (the agents they ran)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def state_counts(nodes) -> tuple[int, int]:
    """Signed state entries (all authors, as node 0 holds them) and state gossip messages
    published by all nodes so far."""
    entries = nodes[0].api.get("/v1/status")["state"]["entries"]
    bundles = sum(n.api.get("/v1/status")["state"]["counters"].get("bundles_out", 0) for n in nodes)
    return entries, bundles


def throughput(n_tasks: int) -> None:
    with Cluster(NODES, config={"presence_interval_s": 0.5}) as c:
        c.start(roles=["planner", "executor"])
        founder = c.nodes[0]  # founded with admin + validator: it works too
        founder.cli("role", "grant", founder.status()["peer_id"], "executor")
        wait_for(lambda: "executor" in founder.status()["roles"], 30, "the founder's grant")
        for node in c.nodes:
            for k in range(AGENTS):
                node.cli(
                    "agent",
                    "add",
                    f"cat{k}",
                    "--role",
                    "executor",
                    "--capability",
                    "echo",
                    "--backend",
                    "exec:cat",
                    "--max-concurrency",
                    os.environ.get("BENCH_TASKS_CONC", "8"),
                )
        c.wait_all_alive()
        ids: list[str] = []
        waits: list[float] = []  # seconds each create call took, as its caller saw it
        lock = threading.Lock()
        ended: list[float] = []  # when each submitter made its last call

        def submit(node, count: int) -> None:
            api = UnixApi(node.api.socket_path)  # a connection of its own
            for i in range(count):
                t = time.monotonic()
                tid = api.post("/v1/tasks", {"title": f"t{i}", "capabilities": ["echo"]})["id"]
                with lock:
                    ids.append(tid)
                    waits.append(time.monotonic() - t)
            with lock:
                ended.append(time.monotonic())

        pids = [n.proc.pid for n in c.nodes if n.proc is not None]
        entries0, bundles0 = state_counts(c.nodes)
        cpu0 = cpu_seconds(pids)
        t0 = time.monotonic()
        share = n_tasks // (NODES * CALLERS)
        threads = [
            threading.Thread(target=submit, args=(n, share + (i < n_tasks % (NODES * CALLERS))))
            for i, n in enumerate(c.nodes * CALLERS)
        ]
        watch = UnixApi(c.nodes[0].api.socket_path)
        progress: list[tuple[float, int]] = []  # (seconds since the start, tasks done)

        def all_done() -> bool:
            # the task counts from the metrics, as a monitor would poll them: no row per task,
            # and not the state digest that /v1/status computes on every call
            done = _metric(watch.text("/v1/metrics"), 'mossnode_tasks{state="done"}')
            progress.append((time.monotonic() - t0, done))
            return done >= n_tasks

        for t in threads:
            t.start()
        # polled from the start: with the submissions still going, a quarter may be done
        wait_for(all_done, 600, "all tasks done", interval=0.25)
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        cpu = cpu_seconds(pids) - cpu0
        submitted = max(ended) - t0
        entries1, bundles1 = state_counts(c.nodes)
        runs = sum(
            sum(1 for e in watch.get(f"/v1/tasks/{tid}")["log"] if e["kind"] == "claim")
            for tid in ids
        )
    print(
        f"{n_tasks} tasks on {NODES} nodes ({AGENTS} exec agents `cat` each): submitted in "
        f"{submitted:.1f} s, "
        f"all done in {took:.1f} s -> {n_tasks / took:.1f} tasks/s (target >= 200); "
        f"middle half at {_middle_rate(progress, n_tasks):.0f} tasks/s"
    )
    print(
        f"  CPU of the {NODES} daemons and their agents: {cpu:.1f} s = {1000 * cpu / n_tasks:.0f} ms "
        f"per task (a 2-core machine has {2000 / max(1, n_tasks / took):.0f} ms of CPU per task "
        f"at this rate); runs started: {runs} for {n_tasks} tasks"
    )
    waits.sort()
    print(
        f"  create calls ({CALLERS} callers per node, one call at a time each): median "
        f"{1000 * waits[len(waits) // 2]:.0f} ms, p90 {1000 * waits[len(waits) * 9 // 10]:.0f} ms, "
        f"max {1000 * waits[-1]:.0f} ms"
    )
    entries, bundles = entries1 - entries0, bundles1 - bundles0
    print(
        f"  signed state entries: {entries} = {entries / n_tasks:.2f} per task "
        f"(each applied by all {NODES} nodes); gossip messages published: {bundles} = "
        f"{bundles / n_tasks:.2f} per task"
    )


def _metric(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[-1]))
    return 0


def _middle_rate(progress: list[tuple[float, int]], n: int) -> float:
    """Tasks per second between the polls that first saw a quarter and three quarters done."""
    first = next(p for p in progress if p[1] >= n // 4)
    last = next(p for p in progress if p[1] >= 3 * n // 4)
    return (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")


def takeover() -> None:
    lease_s = Params().lease_ms / 1000
    agent = f"exec:{sys.executable} {Path(__file__).parent.parent / 'tests/agents/adder.py'}"
    with Cluster(3, config={"presence_interval_s": 0.5}) as c:
        c.start(roles=["planner", "executor"])
        for node in c.nodes:
            node.cli(
                "agent",
                "add",
                "adder",
                "--role",
                "executor",
                "--capability",
                "math",
                "--backend",
                agent,
            )
        c.wait_all_alive()
        tid = c.nodes[0].api.post(
            "/v1/tasks", {"title": "slow", "capabilities": ["math"], "input": {"n": 1, "sleep": 30}}
        )["id"]

        def show(node):
            return node.api.get(f"/v1/tasks/{tid}")

        first = wait_for(
            lambda: show(c.nodes[0])["state"] == "in_progress" and show(c.nodes[0])["assignee"],
            30,
            "start",
        )
        victim = next(n for n in c.nodes if n.status()["peer_id"] == first)
        watcher = next(n for n in c.nodes if n is not victim)
        t0 = time.monotonic()
        victim.kill()

        def elsewhere() -> bool:
            t = show(watcher)
            return t["state"] == "in_progress" and t["assignee"] not in (None, first)

        wait_for(elsewhere, 60, "takeover", interval=0.05)
        took = time.monotonic() - t0
    print(
        f"takeover after SIGKILL of the assignee: running elsewhere after {took:.2f} s "
        f"(lease {lease_s:g} s; target <= lease + 2 s = {lease_s + 2:g} s)"
    )


def _finished_task(tid: str, node: str, now: int) -> dict[str, object]:
    """A done task as the document holds it: created, bid on, claimed and submitted."""
    raw: dict[str, dict[str, object]] = {kind: {} for kind in T.SUB_KINDS}
    effects = [
        T.Bid(tid, 1, "a", 0.5),
        T.Claim(tid, 1, "a", None),
        T.Submit(tid, 1, 1, "a", True, {"n": 1}),
    ]
    for w in (w for e in effects for w in T.writes(e, now)):
        if w.kind == "log":
            raw["log"].setdefault(node, []).append(w.value)  # type: ignore[attr-defined]
        else:
            raw[w.kind][node] = w.value
    return {"title": tid, "creator": "A", "created_at": now, "capabilities": ["py"], **raw}


def history(n: int = 100_000) -> None:
    tune_gc()  # the daemon's collector settings
    now = 1_000_000
    raw = {f"A:h{i}": _finished_task(f"A:h{i}", "B", now) for i in range(n)}
    view = T.build_view(raw)
    sched = T.Scheduler("B")
    agents = [T.LocalAgent("a", frozenset({"executor"}), frozenset({"py"}), 0.0, 4)]
    t0 = time.process_time()
    sched.tick(view, agents=agents, now_ms=now + 10_000)  # the first pass: every task
    first = time.process_time() - t0
    tally = T.Tally()
    t0 = time.process_time()
    tally.update(view, sched.statuses)
    fold = time.process_time() - t0
    sched.take_restated()
    steps, new_s, idle_s, rep_s = 50, 0.0, 0.0, 0.0
    for k in range(steps):
        tid = f"A:n{k}"
        raw[tid] = {**_finished_task(tid, "B", now), "bids": {}, "claims": {}, "results": {}}
        t0 = time.process_time()
        view = T.build_view(raw, view, [tid])
        sched.tick(view, agents=agents, now_ms=now + 10_001 + k)
        restated = sched.take_restated()
        new_s += time.process_time() - t0
        t0 = time.process_time()
        tally.update(view, sched.statuses, None if restated is None else restated | {tid})
        rep_s += time.process_time() - t0
        t0 = time.process_time()
        sched.tick(view, agents=agents, now_ms=now + 10_001 + k)
        idle_s += time.process_time() - t0
    print(
        f"scheduler step with {n:,} finished tasks in the view (CPU): one new task "
        f"{1000 * new_s / steps:.2f} ms, nothing new {1000 * idle_s / steps:.2f} ms, "
        f"reputation update {1000 * rep_s / steps:.2f} ms; against a pass over all of them: "
        f"first derivation {first:.1f} s, reputation fold {1000 * fold:.0f} ms"
    )


def _in_flight_once(n: int, nodes: int, rate: int) -> tuple[float, int, int]:
    """One sans-IO run: ``nodes`` schedulers, each with a replica of plain data, ticking as the
    daemon's loop does (``TICK_SPACING_S`` apart, ``FINISH_SPACING_S`` after the last tick once
    local work ended); ``rate`` tasks/s created round-robin; writes reach the other nodes 5 ms
    later; the `cat` agent answers 20 ms after a dispatch. Measured: what a daemon's scheduler
    loop does of it (view refresh by changed entries, tick, reputation tally, the effects'
    writes). Returns (CPU seconds, tasks done on every node, simulated ms when they were)."""
    names = [f"n{i}" for i in range(nodes)]
    tick_ms, gossip_ms, work_ms = round(1000 * TICK_SPACING_S), 5, 20
    early_ms, min_ms = round(1000 * FINISH_SPACING_S), round(1000 * MIN_TICK_S)
    raws: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in names}
    views: dict[str, T.TaskView] = dict.fromkeys(names, T.build_view({}))
    dirty: dict[str, dict[str, set[str] | None]] = {m: {} for m in names}
    scheds = {m: T.Scheduler(m) for m in names}
    tallies = {m: T.Tally() for m in names}
    agent = [
        T.LocalAgent(f"cat{k}", frozenset({"executor"}), frozenset({"echo"}), 0.0, 8)
        for k in range(AGENTS)
    ]
    ended: dict[str, list[T.Finished]] = {m: [] for m in names}
    events: list[tuple[int, int, str, str, Any]] = []
    seq = 0

    def later(at: int, kind: str, node: str, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, node, payload))

    def apply(node: str, author: str, ws: tuple[T.Write, ...], now: int) -> None:
        raw, marks = raws[node], dirty[node]
        for w in ws:
            if w.kind == "create":
                fields = {k: v for k, v in w.value.items() if k != "suffix"}
                kinds = {k: {} for k in T.SUB_KINDS}
                raw[w.task_id] = {**fields, "creator": author, "created_at": now, **kinds}
                marks[w.task_id] = None
                continue
            task = raw[w.task_id]
            if w.kind == "log":
                logs = task["log"]
                task["log"] = {**logs, author: [*logs.get(author, []), w.value]}
            else:
                task[w.kind] = {**task[w.kind], author: w.value}
            keys = marks.setdefault(w.task_id, set())
            if keys is not None:
                keys.add(f"{w.kind}/{author}")

    def publish(author: str, ws: tuple[T.Write, ...], now: int) -> None:
        apply(author, author, ws, now)
        for other in names:
            if other != author:
                later(now + gossip_ms, "deliver", other, (author, ws))

    def refresh(m: str) -> None:  # as TaskService._update_view: changed entries re-parsed
        marks, dirty[m] = dirty[m], {}
        if marks:
            view, parsed = views[m], {}
            for tid, keys in marks.items():
                before = view.get(tid)
                if keys is not None and before is not None:
                    per: dict[str, list[str]] = {}
                    for key in keys:
                        kind, _, node = key.partition("/")
                        per.setdefault(kind, []).append(node)
                    parsed[tid] = before.with_entries(raws[m][tid], per, per)
            views[m] = T.build_view(raws[m], view, set(marks), parsed)

    for k in range(n):
        later(k * 1000 // rate, "create", names[k % nodes], k)
    next_tick: dict[str, int] = {}  # a tick event at another time was moved: skipped
    last_tick = dict.fromkeys(names, -tick_ms)
    for i, m in enumerate(names):
        next_tick[m] = i * tick_ms // nodes
        later(next_tick[m], "tick", m, None)
    spent, done, now = 0.0, 0, 0
    while events and done < n:
        now, _, kind, m, payload = heapq.heappop(events)
        if kind == "deliver":
            apply(m, *payload, now)
        elif kind == "finish":
            ended[m].append(T.Finished(payload, {"echo": payload}))
            sooner = max(now + min_ms, last_tick[m] + early_ms)
            if sooner < next_tick[m]:
                next_tick[m] = sooner
                later(sooner, "tick", m, None)
        elif kind == "create":
            t0 = time.process_time()
            refresh(m)
            draft = T.Draft(f"t{payload}", f"t{payload}", capabilities=("echo",))
            made = T.plan_create(views[m], draft, creator=m, now_ms=now)
            assert isinstance(made, T.Create), made
            ws = T.writes(made, now)
            spent += time.process_time() - t0
            publish(m, ws, now)
        elif now == next_tick[m]:
            last_tick[m] = now
            t0 = time.process_time()
            refresh(m)
            sched = scheds[m]
            finished, ended[m] = ended[m], []
            plan = sched.tick(views[m], agents=agent, now_ms=now, finished=finished)
            restated = sched.take_restated()
            tallies[m].update(views[m], sched.statuses, restated)
            ws = tuple(w for e in plan.effects for w in T.writes(e, now))
            spent += time.process_time() - t0
            publish(m, ws, now)
            for e in plan.effects:
                if isinstance(e, T.Dispatch):
                    later(now + work_ms, "finish", m, e.task_id)
            done = min(
                sum(s.state is T.State.DONE for s in scheds[o].statuses.values()) for o in names
            )
            next_tick[m] = now + tick_ms
            later(next_tick[m], "tick", m, None)
    return spent, done, now


def in_flight(n: int = 1_000, nodes: int = 4, rate: int = 200, runs: int = 3) -> None:
    tune_gc()
    best = min(_in_flight_once(n, nodes, rate) for _ in range(runs))
    print(
        f"scheduler CPU per task in flight (sans-IO, {nodes} nodes of {AGENTS} agents, {n:,} tasks "
        f"created at "
        f"{rate}/s, all done: {best[1] == n}): {1000 * best[0] / n:.2f} ms across the nodes "
        f"(view refresh, tick, tally, writes; best of {runs})"
    )
    # the same simulation with every task created in the first second: how fast the protocol's
    # own delays (bid windows, ticks, slots) let the swarm go when CPU costs nothing
    _, done, end_ms = _in_flight_once(n, nodes, n)
    print(
        f"  the pipeline without CPU limits (same simulation, all {n:,} created in the first "
        f"second): done {done} in {end_ms / 1000:.2f} s simulated = {1000 * done / end_ms:.0f} "
        f"tasks/s"
    )


def run() -> None:
    for n in SIZES:
        throughput(n)
    takeover()
    history()
    in_flight()
