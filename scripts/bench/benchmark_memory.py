"""The memory part of scripts/bench/benchmark.py (--max-batch): the largest batch per GPU for x1.5 and x2.

CUDA: a search with real training steps and OOM caught, one fresh process per preset (cuDNN autotuning off,
so each new batch size costs no algorithm search). CPU: an estimate from the per-image activation memory
counted on the meta device (fp32; bf16-mixed holds less).
"""
import torch

from harness import ROOT, build_ours, fit_ours, gib, in_child, load, make_batch, quiet

MAX_BATCH_PRESETS = [("x1.5", "configs/x1_5.yaml"), ("x2", "configs/x2.yaml")]


def largest_fitting(fits, first_guess, tolerance: float = 0.05):
    """(lo, hi): the largest batch that fits and the smallest that does not, hi - lo within `tolerance` of lo.

    `fits(b)` must be monotone (True up to some batch). Once batches 1 and 2 fit, starts from first_guess()
    (at least 3), gallops up (by 1/8 of the guess, the step doubling each time) while it fits, then bisects."""
    if not fits(1):
        return 0, 1
    if not fits(2):
        return 1, 2
    lo, hi, guess = 2, None, max(3, first_guess())
    step = max(1, guess // 8)
    while hi is None:
        if fits(guess):
            lo, guess, step = guess, guess + step, 2 * step
        else:
            hi = guess
    while hi - lo > max(1, int(lo * tolerance)):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi


def search_max_batch(files, overrides, resolutions, budget_gib=None):
    """Child process on CUDA, one preset: for each resolution and gradient checkpointing off / on, the largest
    batch whose training step of ours fits next to the Adam states. Each try is one short fit: a batch-1
    step (which creates the Adam states) then the step at batch b; out of memory is caught. `budget_gib`
    below the card caps PyTorch's allocator there (the figure for a smaller card)."""
    import gc
    quiet()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = False  # no algorithm search for each new batch size
    total = card = torch.cuda.mem_get_info(device)[1]
    if budget_gib is not None and budget_gib * 2**30 < card:
        total = int(budget_gib * 2**30)
        torch.cuda.set_per_process_memory_fraction(total / card)  # the current device
    cfg = load(files, overrides, 1)
    system = build_ours(cfg)
    results = []
    for res in resolutions:
        for ckpt in (False, True):
            cfg.data.resolution = res
            system.vae.decoder.gradient_checkpointing = ckpt
            peaks = {}

            def fits(b):
                system.zero_grad(set_to_none=True)
                torch.cuda.reset_peak_memory_stats(device)
                try:
                    cfg.data.batch_size = 1
                    first = make_batch(cfg, device)
                    cfg.data.batch_size = b
                    fit_ours(system, cfg, *make_batch(cfg, device), steps=2, first_batch=first)
                    ok = True
                except torch.OutOfMemoryError:
                    ok = False
                system.trainer = None  # drop the trainer's optimiser states before the next try
                gc.collect()
                torch.cuda.empty_cache()
                peaks[b] = torch.cuda.max_memory_allocated(device)
                print(f"  {res} px, gradient_checkpointing={ckpt}: batch {b} "
                      f"{'fits, peak ' + gib(peaks[b]) if ok else 'out of memory'}", flush=True)  # partial results
                return ok

            def first_guess():  # linear in the batch from the peaks at batches 1 and 2
                return int(2 + (total * 0.97 - peaks[2]) / max(1, peaks[2] - peaks[1]))

            lo, hi = largest_fitting(fits, first_guess)
            results.append(dict(resolution=res, checkpointing=ckpt, lo=lo, hi=hi))
    capped = f", capped at {gib(total)}" if total < card else ""
    return dict(device=f"{torch.cuda.get_device_name(device)} ({gib(card)}{capped})", results=results)


def meta_system(cfg):
    """Our system on the meta device: shapes only, no memory, no compute."""
    from ldm.training.run import build_system
    with torch.device("meta"):
        return build_system(cfg).to("meta")  # .to: lpips makes its scaling buffers on the CPU


def saved_activation_bytes(system, cfg, batch):
    """Bytes the autograd graph of our step keeps, counted on the meta device, fp32:
    (decoder, decoder with gradient checkpointing, losses: LPIPS + discriminator, largest tensor)."""
    import lpips
    with torch.device("meta"):
        r = cfg.data.resolution
        z, image = torch.empty(batch, cfg.model.autoencoder.embed_dim, r // 8, r // 8), torch.empty(batch, 3, r, r)
        mask = torch.empty(batch, 1, r, r)
    params = {p.untyped_storage()._cdata for p in system.parameters()}
    seen, tag = {}, ["outside"]  # storage -> (bytes, segment)

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen.setdefault(key, (t.untyped_storage().nbytes(), tag[0], t))
        return t

    decoder, inputs, plain_run = system.vae.decoder, [], system.vae.decoder._run

    def tagged_run(fn, *args):  # the units that gradient checkpointing recomputes; their inputs stay stored
        inputs.append(sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor)))
        tag[0] = len(inputs)
        out = plain_run(fn, *args)
        tag[0] = "outside"
        return out

    decoder._run, decoder.gradient_checkpointing = tagged_run, False
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        recon, _ = system.decode_with_features(z, image, mask)
        dec = dict(seen)
        recon = recon.detach().requires_grad_(True)
        lpips.LPIPS.forward(system.perceptual, recon, image)  # PerceptualLoss.forward without its autocast
        system.discriminator(recon)
    per_unit = {}
    for size, unit, _ in dec.values():
        per_unit[unit] = per_unit.get(unit, 0) + size
    outside = per_unit.pop("outside", 0)
    full = outside + sum(per_unit.values())
    checkpointed = outside + sum(inputs) + max(per_unit.values(), default=0)
    losses = sum(size for k, (size, _, _) in seen.items() if k not in dec)
    largest = max(size for size, _, _ in seen.values())
    return full, checkpointed, losses, largest


def estimate_peak(system, cfg, batch):
    """Estimated peak bytes of our step: weights, grads and Adam states, saved activations, in-flight grads."""
    total = sum(p.numel() for p in system.parameters()) * 4
    trained = sum(p.numel() for p in system.parameters() if p.requires_grad) * 4
    full, checkpointed, losses, largest = saved_activation_bytes(system, cfg, batch)
    act = checkpointed if cfg.model.autoencoder.gradient_checkpointing else full
    return total + 3 * trained + act + losses + 2 * largest


def estimate_max_batch(files, overrides, budget):
    """CPU: the largest batch under `budget` bytes, from the per-image activation memory at batch 1 and 2."""
    cfg = load(files, overrides, 1)
    system = meta_system(cfg)
    p1, p2 = estimate_peak(system, cfg, 1), estimate_peak(system, cfg, 2)
    per_image = p2 - p1
    return int((budget - (p1 - per_image)) // per_image), p1 - per_image, per_image


def run_max_batch(args):
    quiet()
    cuda = torch.cuda.is_available()  # no CUDA context here: the searching process gets the whole card
    if cuda:
        print("largest batch per GPU: per try, a batch-1 training step of ours (creating the Adam states) then one "
              "at the batch tried, OOM caught; 'max batch B' fits, 'B+k: out of memory' does not")
    else:
        budget = 80.0 if args.memory_budget_gb is None else args.memory_budget_gb
        print(f"CPU estimate of the largest batch per GPU in {budget:g} GiB: weights + grads + Adam "
              f"(fp32) + saved activations counted on the meta device (fp32: bf16-mixed holds less)")
    for preset, file in MAX_BATCH_PRESETS:
        if preset not in args.presets:
            continue
        if cuda:
            found = in_child(search_max_batch, [str(ROOT / file)], list(args.overrides), list(args.resolutions),
                             args.memory_budget_gb)
            for r in found["results"]:
                print(f"{preset:<5} {r['resolution']} px  gradient_checkpointing={str(r['checkpointing']).lower():<5}  "
                      f"max batch {r['lo']} (batch {r['hi']}: out of memory) on {found['device']}")
            continue
        for res in args.resolutions:
            for ckpt in (False, True):
                overrides = [*args.overrides, f"data.resolution={res}",
                             f"model.autoencoder.gradient_checkpointing={str(ckpt).lower()}"]
                n, fixed, per = estimate_max_batch([str(ROOT / file)], overrides, budget * 2**30)
                print(f"{preset:<5} {res} px  gradient_checkpointing={str(ckpt).lower():<5}  estimated max batch {n}  "
                      f"(fixed {gib(fixed)}, per image {gib(per)})")
