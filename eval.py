"""
Measure a CoLA-World checkpoint as the paper does, in one command (about a minute for the CPU default run):

  python eval.py --ckpt=out/ckpt.pt
  python eval.py --ckpt=out/ckpt.pt --data=/path/to/episodes --n_clips=64 --horizon=20

1. video simulation: PSNR and SSIM of world-model rollouts on held-out clips, driven by the IDM's latent
   actions inferred from the ground truth, per horizon step and averaged; next to copying the last context
   frame and to the same world model driven by the null action (the gap to the null action is the control
   the latent actions carry);
2. latent action quality: a linear probe (closed-form ridge) from the latent actions (quantized vectors
   for quantized models) to the true actions, fit on training episodes and scored on held-out ones;
3. codebook health of the IDM's codes on held-out episodes;
4. real-action adaptation: a 2-layer MLP adapter from real actions to latent actions, learned from a few
   dozen labelled training episodes, then the world model driven by real actions through it, and the
   codebook usage of the adapter's outputs (the paper: two-stage adapters collapse onto few codes).
The held-out split is the one train.py held out (data.ClipSampler). Probe and adapter need true actions;
a folder without them gets parts 1 and 3 only. The last line of stdout is one JSON object.
LPIPS and FVD need network weights that cannot be downloaded here: they are not computed.
"""
import json
import sys
import time
from collections import defaultdict

import numpy as np
import torch

import cola
from configurator import configure, fail
from data import ClipSampler, resolve_data
from lam import code_stats

# ----------------------------------------------------------------------------------------------------
# settings
ckpt = 'out/ckpt.pt'
data = ''               # folder of episodes to evaluate on; '' = the data the checkpoint was trained on
n_clips = 16            # held-out clips for video simulation
horizon = 10            # generated frames per clip, after the n_context given ones
sample_steps = 10       # Euler steps per window
cfg_scale = 4.0         # classifier-free guidance scale
n_episodes = 48         # at most this many episodes of each split for the probe and codebook health
probe_ridge = 1e-3      # ridge penalty, relative to the mean eigenvalue of the latents' Gram matrix
adapter_episodes = 32   # labelled training episodes the adapter learns from
adapter_steps = 500     # full-batch Adam steps of the adapter
device = ''             # 'cpu', 'cuda', 'cuda:N'; '' = cuda if available
seed = 0
configure(globals(), sys.argv[1:])
# ----------------------------------------------------------------------------------------------------

device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
t_start = time.time()
try:
    models, settings = cola.load_models(ckpt, device)
    wm_cfg, _ = cola.model_configs(settings)
    data_dir = resolve_data(data or settings['data'] or None, wm_cfg.res, clip_len=wm_cfg.n_frames)
    sampler = ClipSampler(data_dir, wm_cfg.n_context + horizon, 'val', seed=seed)
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
nc, lam, size = wm_cfg.n_context, models['lam'], models['lam'].quantizer.size
rnd = lambda v: [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)
mean = lambda xs: sum(xs) / len(xs)


@torch.inference_mode()
def quantize(z_e):
    """Continuous latent actions (..., n_tok, d) -> (quantized, codes or None), by the LAM's own quantizer."""
    z, codes, _, _ = lam.quantizer(z_e)
    return z, codes


def episode_latents(ids, chunk=16):
    """The IDM's outputs and the true actions of every transition of the episodes `ids`, batched by
    episode length: two lists, one entry per episode, z_e (T-1, n_tok, d) and actions (T-1, A) or None."""
    eps = [e for e in map(sampler.get_episode, ids) if len(e['frames']) >= 2]
    z_e = [None] * len(eps)
    groups = defaultdict(list)  # length -> positions in eps
    for k, e in enumerate(eps):
        groups[len(e['frames'])].append(k)
    for group in groups.values():
        for c in range(0, len(group), chunk):
            part = group[c:c + chunk]
            clips = cola.to_model(torch.from_numpy(np.stack([eps[k]['frames'] for k in part])), device)
            for k, z in zip(part, cola.latent_actions(lam, clips)['z_e']):
                z_e[k] = z
    actions = [None if e['actions'] is None else torch.from_numpy(e['actions']).to(device) for e in eps]
    return z_e, actions


def report(prefix, gen):
    """Score a batch of rollouts against the held-out clips: {prefix}psnr, ssim and their per-step lists."""
    p, s = cola.scores(gen, clips, nc)
    return {f'{prefix}psnr': mean(p), f'{prefix}ssim': mean(s), f'{prefix}psnr_per_step': p, f'{prefix}ssim_per_step': s}


# ----------------------------------------------------------------------------------------------------
# 1. video simulation on held-out clips: IDM latent actions vs the null action vs copying the last frame
batch = sampler.sample(n_clips)
clips = cola.to_model(batch['frames'], device)  # (n_clips, n_context + horizon, 3, H, W)
print(f"{ckpt} ({settings['mode']}): {n_clips} held-out clips of {data_dir}, {nc} context + {horizon} generated "
      f"frames, {sample_steps} Euler steps, guidance {cfg_scale}")
z_idm = cola.latent_actions(lam, clips)['z']  # (n_clips, L-1, n_tok, d)
out = dict(ckpt=ckpt, mode=settings['mode'], n_clips=n_clips, horizon=horizon)
out.update(report('', cola.simulate(models, clips, z_idm, sample_steps, cfg_scale, seed)))
out.update(report('null_', cola.simulate(models, clips, None, sample_steps, cfg_scale, seed)))
out.update(report('copy_', cola.copy_last(clips, nc)))
out['psnr_gain_over_null'] = out['psnr'] - out['null_psnr']
print("step   PSNR dB: latent / null / copy-last    SSIM: latent / null / copy-last")
for k in range(horizon):
    print(f"{k + 1:4d}   {out['psnr_per_step'][k]:14.2f} {out['null_psnr_per_step'][k]:6.2f} "
          f"{out['copy_psnr_per_step'][k]:6.2f}    {out['ssim_per_step'][k]:12.3f} "
          f"{out['null_ssim_per_step'][k]:6.3f} {out['copy_ssim_per_step'][k]:6.3f}")
print(f"mean   {out['psnr']:14.2f} {out['null_psnr']:6.2f} {out['copy_psnr']:6.2f}    "
      f"{out['ssim']:12.3f} {out['null_ssim']:6.3f} {out['copy_ssim']:6.3f}")

# ----------------------------------------------------------------------------------------------------
# 2, 3. the IDM on whole episodes: codebook health on held-out ones, linear probe train -> held-out
val_ids = sampler.episodes('val')[:n_episodes]
train_ids = sampler.episodes('train')[:max(n_episodes, adapter_episodes)]  # the adapter's are the first ones
ze_val, a_val = episode_latents(val_ids)
ze_val = torch.cat(ze_val)  # (N, n_tok, d), every held-out transition
z_val, codes_val = quantize(ze_val)
if codes_val is not None:
    stats, line = cola.codebook_health(codes_val, size)
    out.update(stats)
    print(f"held-out {line}")
if a_val[0] is None:
    print("no true actions in this data: no linear probe, no adapter")
else:
    a_val = torch.cat(a_val)
    ze_train, a_train = episode_latents(train_ids)
    probe = cola.ridge_probe(quantize(torch.cat(ze_train[:n_episodes]))[0], torch.cat(a_train[:n_episodes]),
                             z_val, a_val, probe_ridge)
    out.update(probe_l1=probe['l1'], probe_r2=probe['r2'], probe_l1_mean=probe['l1_mean'])
    print(f"linear probe latent -> true action ({min(n_episodes, len(ze_train))} train / {len(val_ids)} held-out "
          f"episodes): L1 {probe['l1']:.4f} (predicting the mean: {probe['l1_mean']:.4f}), R^2 {probe['r2']:.3f}")

    # ------------------------------------------------------------------------------------------------
    # 4. real-action adaptation: real action -> adapter -> the LAM's quantizer -> world model
    n_ad = min(adapter_episodes, len(ze_train))
    adapter, losses = cola.train_adapter(torch.cat(a_train[:n_ad]), torch.cat(ze_train[:n_ad]), adapter_steps, seed=seed)
    with torch.inference_mode():
        z_ad = quantize(adapter(batch['actions'].to(device)))[0]  # (n_clips, L-1, n_tok, d)
        codes_ad = quantize(adapter(a_val))[1]  # the adapter's codes over the held-out transitions
    out.update(report('adapter_', cola.simulate(models, clips, z_ad, sample_steps, cfg_scale, seed)))
    out.update(adapter_episodes=n_ad, adapter_loss=losses[-1])
    print(f"adapter ({n_ad} labelled episodes, loss {losses[0]:.4f} -> {losses[-1]:.4f}): "
          f"PSNR {out['adapter_psnr']:.2f} dB, SSIM {out['adapter_ssim']:.3f} driven by real actions")
    if codes_ad is not None:
        stats, line = cola.codebook_health(codes_ad, size)
        out.update({f'adapter_{k}': v for k, v in stats.items()})
        print(f"adapter {line}")

out['wall_s'] = time.time() - t_start
print(f"done in {out['wall_s']:.0f} s (LPIPS and FVD are not computed: their networks cannot be downloaded here)")
print(json.dumps({k: rnd(v) if isinstance(v, (float, list)) else v for k, v in out.items()}))
