"""What the heartbeats cost a training rank (orchestrator.train.heartbeat): the training thread's
phase marks per step, and the sender thread's one actor call per interval, against a step time.

    .venv/bin/python bench/heartbeat_cost.py                 # against a 50 ms step (gpt_tiny on 2 cores)
    .venv/bin/python bench/heartbeat_cost.py --step-ms 800   # a GPU step of a larger model

The training thread marks a phase 2 x micro-batches + 4 times a step (data, forward/backward and
optimizer step per micro-batch, collective, and stepped()). The sender pickles one Beat and submits
one fire-and-forget actor call per `--interval-s`; the call is timed on a local Ray with a real
actor. Prints both as a fraction of the step time (the issue's target: within 0.5% of tokens/s).
"""

from __future__ import annotations

import argparse
import time

from orchestrator.train.heartbeat import COLLECTIVE, DATA, FORWARD_BACKWARD, OPTIMIZER_STEP, Heartbeat

IDENT = dict(group="1796673578815", rank=1, world_size=2, node="10.0.0.3", node_id="ab" * 28, pid=4711)


def phase_cost_s(micro: int, steps: int = 200_000) -> float:
    """Seconds the training thread spends on heartbeat marks per step."""
    hb = Heartbeat(None, IDENT, 1.0)
    t0 = time.perf_counter()
    for s in range(steps):
        hb.stepped(s, 0.05)
        hb.phase(DATA)
        for _ in range(micro):
            hb.phase(FORWARD_BACKWARD)
        hb.phase(OPTIMIZER_STEP)
        hb.phase(COLLECTIVE)
    return (time.perf_counter() - t0) / steps


def send_cost_s(calls: int = 2000) -> float:
    """Seconds of the sending thread per beat: building it and submitting the actor call."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)

    @ray.remote(num_cpus=0)
    class Sink:
        def heartbeat(self, beat) -> None:
            pass

    sink = Sink.remote()
    hb = Heartbeat(sink, IDENT, 1.0)
    ray.get(sink.heartbeat.remote(hb.beat()))  # (the actor is up)
    t0 = time.perf_counter()
    for _ in range(calls):
        sink.heartbeat.remote(hb.beat())
    spent = (time.perf_counter() - t0) / calls
    ray.shutdown()
    return spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-ms", type=float, default=50.0)
    p.add_argument("--micro", type=int, default=2, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--interval-s", type=float, default=1.0)
    args = p.parse_args()
    step_s = args.step_ms / 1000
    marks = phase_cost_s(args.micro)
    send = send_cost_s()
    print(f"training thread: {marks * 1e6:.2f} us of heartbeat marks per step = {marks / step_s:.5%} of a "
          f"{args.step_ms:g} ms step")
    print(f"sender thread: {send * 1e6:.0f} us per beat, one per {args.interval_s:g} s = "
          f"{send / args.interval_s:.4%} of one core (it holds the GIL that long)")
    print(f"ratio (cost / step time), both: {(marks / step_s) + send / args.interval_s:.5f}")


if __name__ == "__main__":
    main()
