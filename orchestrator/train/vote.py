"""What the ranks agree on after every step, in one float64 all-reduce: the mean loss, whether a
checkpoint is due and whether a stop was requested.

A time-based checkpoint interval is judged by each rank's own clock and a stop request reaches only
rank 0, so every such decision goes through this vote: all ranks then act the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepVote:
    """The outcome of one step's vote, the same on every rank."""

    loss: float  # mean micro-batch loss over all ranks
    checkpoint_due: bool  # some rank says a checkpoint is due
    stop: bool  # some rank (rank 0: the runner asked) says stop
    shares: tuple[float, ...] = ()  # the element-wise sum of the ranks' `shares` (each fills its own slot)


def all_sum(values: list[float], device) -> list[float]:
    """Element-wise sum of a small vector over all ranks (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_mean(values: list[float], device) -> float:
    """Mean of a per-rank list of floats over all ranks."""
    total, n = all_sum([sum(values), len(values)], device)
    return total / n


def step_vote(losses: list, checkpoint_due: bool, stop: bool, device, shares: list[float] = ()) -> StepVote:
    """This rank's micro-batch losses (tensors on `device`, or floats) and votes in; everyone's agreed
    outcome out. The losses are summed on the device, so a step waits for its device once (here),
    not once per micro-batch. `shares`: a vector every rank passes (the same length), summed over
    ranks (each rank's value in its own slot: every rank then has all of them)."""
    loss_sum = torch.stack([torch.as_tensor(x, device=device).detach().to(torch.float64).reshape(())
                            for x in losses]).sum().reshape(1)
    flags = torch.tensor([len(losses), float(checkpoint_due), float(stop), *shares], dtype=torch.float64, device=device)
    t = torch.cat([loss_sum, flags])
    dist.all_reduce(t)
    total, n, due_votes, stop_votes, *summed = t.tolist()
    return StepVote(loss=total / n, checkpoint_due=due_votes > 0, stop=stop_votes > 0, shares=tuple(summed))
