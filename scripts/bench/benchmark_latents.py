"""The latent cache's part of scripts/bench/benchmark.py (--cached-latents): our step with the posterior in the batch.

"ours-cached" runs the same training step on the same batch plus "mean" and "logvar", as a cache from
scripts/cache_latents.py gives them (float32, computed once before timing), so the frozen encoder is skipped.
The encoder's share of our step is measured apart (its forward alone, same precision, layout and compiling), so the
images/s gain can be checked against it: a step without the encoder should take (1 - share) of ours.
"""
import torch

from reference_steps import autocast_for, durations, mark


@torch.no_grad()
def cache_inputs(system, image, mask, precision, steps):
    """(the batch's cached posterior {"mean", "logvar"}, seconds of `steps` encoder forwards after a warm-up,
    timed as the steps are: between reference_steps.mark()s, CUDA events on the stream)."""
    system.to(image.device)
    image = system.inputs({"image": image, "mask": mask})[0]  # channels_last as the step has it
    posterior = system.vae.encode(image)
    cached = {"mean": posterior.mean.float(), "logvar": posterior.logvar.float()}
    system.configure_model()  # the encoder timed as the step would run it: compiled under model.compile
    marks = [mark(image.device)]
    for _ in range(steps + 1):  # the first is a warm-up (compiling, cuDNN's autotuning)
        with autocast_for(str(precision), image.device):
            system.latent({}, image)  # what training_step does without a cache
        marks.append(mark(image.device))
    return cached, durations(marks)[1:]


def cache_report(batch_size, ours, cached, encoder, best_ratio):
    """Lines comparing ours and ours-cached (median seconds per step) with the encoder's measured share."""
    share = encoder / ours
    return [f"latent cache: ours {batch_size / ours:.3f} images/s -> ours-cached {batch_size / cached:.3f} images/s "
            f"({ours / cached:.2f}x, step {100 * (1 - cached / ours):.1f} % shorter; best steps {best_ratio:.2f}x)",
            f"encoder alone: {encoder:.4f} s per batch = {100 * share:.1f} % of our step "
            f"(removing exactly that would give {1 / (1 - share):.2f}x)"]
