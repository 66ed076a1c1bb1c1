"""Non-finite training steps: detected on the device, counted on the host without waiting for the device."""
import math
from collections import deque
from typing import Iterable

import torch


class NonFiniteSteps:
    """Counts optimiser steps skipped because a loss term or the gradients were not finite.

    Each step queues a small device tensor, [bad, loss terms..., gradient norm]; the host reads the checks in step
    order once their copies have arrived (CUDA events: no host sync), or all of them when asked to wait. `skipped`
    counts skipped steps over the run, `streak` the consecutive ones, `term` names what was non-finite last, and
    `loss` is the last loss read (for the progress bar).
    """

    def __init__(self, max_behind: int = 8):
        self.skipped, self.streak, self.term, self.loss = 0, 0, None, None
        self.pending = deque()  # (check, CUDA event or None, names) of steps not yet read on the host
        self.max_behind = max_behind  # the host reads at most this many steps behind the device

    @staticmethod
    def check(terms: dict, grads: Iterable[torch.Tensor] = (), distributed: bool = False):
        """(bad, check, names) on the device, no host sync: check = [bad, loss terms..., gradient norm], bad = 1.0
        where any of them is non-finite (on any rank, with `distributed`: every rank must skip the same steps)."""
        names = list(terms)
        values = [v.detach().float().reshape(()) for v in terms.values()]
        grads = list(grads)
        if grads:
            values.append(torch.nn.utils.get_total_norm(grads).float())
            names.append("gradients")
        values = torch.stack(values)
        bad = (~torch.isfinite(values)).any().float()
        if distributed:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bad, torch.cat([bad.reshape(1), values]), names

    def queue(self, check: torch.Tensor, names: list, wait: bool, distributed: bool = False) -> None:
        """Queue a step's check for the host and account for every check that has arrived: all of them with `wait`
        (a host sync), else those whose copy is done (a CPU check has arrived at once). With `distributed`, every
        rank reads the same checks: all but this step's, waiting for them (no idle device: this step is still
        queued, and the signal vote of the previous batch end synced it), so all ranks stop at the same step."""
        event = None
        if check.device.type == "cuda":
            host = torch.empty(check.shape, dtype=check.dtype, pin_memory=True)
            host.copy_(check, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            check = host
        self.pending.append((check, event, names))
        if distributed and not wait:
            self.read(keep=1)
        else:
            self.read(wait=wait or len(self.pending) > self.max_behind)

    def read(self, wait: bool = True, keep: int = 0) -> None:
        """Count the skipped steps (and the streak of them) in step order, of all checks but the newest `keep`:
        those that have arrived, or with `wait` all of them."""
        while len(self.pending) > keep:
            check, event, names = self.pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self.pending.popleft()
            bad, *values = check.tolist()
            values = dict(zip(names, values))
            self.loss = values["nll"]
            if not bad:
                self.streak = 0
                continue
            self.skipped += 1
            self.streak += 1
            here = [n for n, v in values.items() if not math.isfinite(v)]
            self.term = next((n for n in here if n != "nll"), here[0] if here else "(on another rank)")
