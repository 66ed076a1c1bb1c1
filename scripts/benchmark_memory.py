"""The memory part of scripts/benchmark.py (--max-batch): the largest batch per GPU for x1.5 and x2.

CUDA: a search with real training steps and OOM caught, one fresh process per setting. CPU: an estimate from
the per-image activation memory counted on the meta device (fp32; bf16-mixed holds less).
"""
import torch

from benchmark import ROOT, build_ours, fit_ours, gib, in_child, load, make_batch, quiet

MAX_BATCH_PRESETS = [("x1.5", "configs/x1_5.yaml"), ("x2", "configs/x2.yaml")]


def search_max_batch(files, overrides):
    """Child process on CUDA: the largest batch whose 2 training steps of ours fit (lo) and the smallest
    that ran out of memory (hi); a linear guess from batches 1 and 2, then galloping and bisection."""
    import gc
    quiet()
    cfg = load(files, overrides, 1)
    device = torch.device("cuda")
    system = build_ours(cfg)

    def fits(b):
        cfg.data.batch_size = b
        system.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            fit_ours(system, cfg, *make_batch(cfg, device), steps=2)  # step 2 holds the Adam states
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        system.trainer = None  # drop the last trainer's optimiser states before the next try
        gc.collect()
        torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated(device)
        print(f"  batch {b}: {'fits, peak ' + gib(peak) if ok else 'out of memory'}", flush=True)  # partial results
        return ok, peak

    total = torch.cuda.mem_get_info(device)[1]
    found = dict(device=f"{torch.cuda.get_device_name(device)} ({gib(total)})")
    (ok1, p1), (ok2, p2) = fits(1), fits(2)
    if not (ok1 and ok2):
        return dict(found, lo=1, hi=2) if ok1 else dict(found, lo=0, hi=1)
    lo, hi = 2, None
    guess = max(3, int(2 + (total * 0.97 - p2) / max(1, p2 - p1)))
    while hi is None:
        if fits(guess)[0]:
            lo, guess = guess, guess + max(1, guess // 8)
        else:
            hi = guess
    while hi - lo > max(1, lo // 20):  # within 5 %
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid)[0] else (lo, mid)
    return dict(found, lo=lo, hi=hi)


def meta_system(cfg):
    """Our system on the meta device: shapes only, no memory, no compute."""
    from train import build_system
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
        print("largest batch per GPU: 2 real training steps of ours per try (fresh process per setting), "
              "OOM caught; 'max batch B' fits, 'B+k: out of memory' does not")
    else:
        print(f"CPU estimate of the largest batch per GPU in {args.memory_budget_gb:g} GiB: weights + grads + Adam "
              f"(fp32) + saved activations counted on the meta device (fp32: bf16-mixed holds less)")
    for preset, file in MAX_BATCH_PRESETS:
        if preset not in args.presets:
            continue
        for res in args.resolutions:
            for ckpt in (False, True):
                overrides = [*args.overrides, f"data.resolution={res}",
                             f"model.autoencoder.gradient_checkpointing={str(ckpt).lower()}"]
                name = f"{preset:<5} {res} px  gradient_checkpointing={str(ckpt).lower():<5}"
                if cuda:
                    r = in_child(search_max_batch, [str(ROOT / file)], overrides)
                    print(f"{name}  max batch {r['lo']} (batch {r['hi']}: out of memory) on {r['device']}")
                else:
                    n, fixed, per = estimate_max_batch([str(ROOT / file)], overrides, args.memory_budget_gb * 2**30)
                    print(f"{name}  estimated max batch {n}  (fixed {gib(fixed)}, per image {gib(per)})")
