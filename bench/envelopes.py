"""Envelope seal/open rates against raw PyNaCl sign/verify in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable

import nacl.signing

from mossnode.crypto.envelope import Envelope, ReplayWindow, open_envelope, seal
from mossnode.crypto.identity import Identity

N = 20_000
SWARM = b"\x07" * 32
BODY = {"task": "t-123", "state": "in_progress", "progress": 0.5, "note": "x" * 100}


def rate(fn: Callable[[int], object], n: int = N) -> float:
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def run() -> None:
    ident = Identity.generate()
    sk = nacl.signing.SigningKey(ident.seed)
    vk = sk.verify_key
    msg = b"m" * 200
    signed = sk.sign(msg)
    raw_sign = rate(lambda i: sk.sign(msg))
    raw_verify = rate(lambda i: vk.verify(signed))
    now = 1_800_000_000_000
    wires = [
        seal(ident, swarm_id=SWARM, type="state.update", seq=i + 1, timestamp=now, body=BODY)
        for i in range(N)
    ]
    seal_rate = rate(
        lambda i: seal(
            ident, swarm_id=SWARM, type="state.update", seq=i + 1, timestamp=now, body=BODY
        )
    )
    windows = [ReplayWindow() for _ in range(3)]
    counter = iter(range(10**9))

    def do_open(i: int) -> None:
        w = windows[next(counter) // N]
        r = open_envelope(wires[i], swarm_id=SWARM, now_ms=now, replay=w)
        assert isinstance(r, Envelope)

    open_rate = rate(do_open)
    print(
        f"envelope size            {len(wires[0])} bytes (body {len(BODY['note']) + 60} B approx)"
    )
    print(f"raw PyNaCl sign          {raw_sign:10.0f} /s")
    print(f"raw PyNaCl verify        {raw_verify:10.0f} /s")
    print(
        f"envelope seal            {seal_rate:10.0f} /s   ratio seal/raw-sign   {seal_rate / raw_sign:.2f}"
    )
    print(
        f"envelope open (checked)  {open_rate:10.0f} /s   ratio open/raw-verify {open_rate / raw_verify:.2f}"
        f"   (target >= 0.80)"
    )
