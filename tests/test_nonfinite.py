"""ldm.models.nonfinite.NonFiniteSteps: the device-side check of a step and the host's in-order reading of it."""
import torch

from ldm.models.nonfinite import NonFiniteSteps

NAN, INF = float("nan"), float("inf")


class Event:
    """Stands for the CUDA event of a check's copy to the host: not done until waited for (or set done)."""

    def __init__(self, done=False):
        self.done, self.waited = done, False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = self.waited = True


def check_of(**values):
    """A host check as NonFiniteSteps.check builds it: [bad, values...], with its names."""
    bad = float(any(not torch.isfinite(torch.tensor(v)) for v in values.values()))
    return torch.tensor([bad, *values.values()]), list(values)


def test_check_flags_a_non_finite_term_or_gradient_and_names_the_values():
    terms = {"nll": torch.tensor(1.5), "l1": torch.tensor(0.5)}
    bad, check, names = NonFiniteSteps.check(terms)
    assert bad.item() == 0.0 and names == ["nll", "l1"] and check.tolist() == [0.0, 1.5, 0.5]
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.0])]
    bad, check, names = NonFiniteSteps.check(terms, grads)
    assert bad.item() == 0.0 and names[-1] == "gradients" and check[-1].item() == 5.0  # the global 2-norm
    bad, check, _ = NonFiniteSteps.check({"nll": torch.tensor(NAN)})
    assert bad.item() == 1.0 and torch.isnan(check[1])
    bad, _, _ = NonFiniteSteps.check(terms, [torch.tensor([INF])])
    assert bad.item() == 1.0


def test_read_counts_skipped_steps_their_streak_and_the_term_in_step_order():
    steps = NonFiniteSteps()
    for values in (dict(nll=1.0, l1=0.5), dict(nll=NAN, l1=NAN), dict(nll=INF, l1=0.5, gradients=INF),
                   dict(nll=2.0, l1=0.5), dict(nll=NAN, l1=0.5)):
        steps.queue(*check_of(**values), wait=False)
    # a CPU check has arrived at once: all five read; the term is the first non-finite one other than the sum
    assert (steps.skipped, steps.streak, steps.term, len(steps.pending)) == (3, 1, "nll", 0)
    assert steps.loss != steps.loss  # NaN: the last loss read
    steps = NonFiniteSteps()
    steps.queue(*check_of(nll=1.0, l1=NAN), wait=False)
    steps.queue(*check_of(nll=INF, l1=1.0, gradients=INF), wait=False)
    assert (steps.skipped, steps.streak, steps.term) == (2, 2, "gradients")


def test_a_bad_step_with_finite_values_here_was_bad_on_another_rank():
    steps = NonFiniteSteps()
    steps.pending.append((torch.tensor([1.0, 0.5]), None, ["nll"]))  # bad = 1: another rank's NaN (all-reduced)
    steps.read()
    assert (steps.skipped, steps.term, steps.loss) == (1, "(on another rank)", 0.5)


def test_the_host_reads_only_arrived_checks_unless_it_waits_or_falls_behind():
    steps = NonFiniteSteps(max_behind=3)
    events = [Event() for _ in range(3)]
    for event in events:  # three device checks whose copies have not arrived: nothing read, nothing waited for
        steps.pending.append((torch.tensor([1.0, NAN]), event, ["nll"]))
        steps.read(wait=False)
    assert steps.skipped == 0 and len(steps.pending) == 3 and not any(e.waited for e in events)
    events[1].done = True  # arrived out of order: still nothing, the first one blocks (counts stay in step order)
    steps.read(wait=False)
    assert steps.skipped == 0 and len(steps.pending) == 3
    steps.queue(*check_of(nll=1.0), wait=False)  # a fourth pending check: more than max_behind, so it waits
    assert steps.skipped == 3 and steps.streak == 0 and not steps.pending and events[0].waited


def test_under_ddp_every_rank_reads_the_finite_checks_of_the_same_steps():
    """Ranks must stop on the same step: under DDP the host reads every check but this step's, waiting for them,
    whether or not this step's has arrived; on one device it reads only what has arrived, without waiting."""
    def run(distributed):
        steps = NonFiniteSteps()
        previous = Event()  # the CUDA event of the previous step's copy, not done yet
        steps.pending.append((torch.tensor([1.0, float("nan")]), previous, ["nll"]))  # a NaN step
        steps.queue(torch.tensor([1.0, float("nan")]), ["nll"], wait=False, distributed=distributed)  # this step's:
        return steps.skipped, len(steps.pending), previous.waited  # a CPU tensor, so it has arrived

    assert run(distributed=True) == (1, 1, True)  # the previous step's read (waited for), this step's left
    assert run(distributed=False) == (0, 2, False)  # in step order: nothing past the check that has not arrived
