"""
Measure a CoLA-World checkpoint as the paper does, in one command (under a minute for the CPU default run):

  python eval.py --ckpt=out/ckpt.pt
  python eval.py --ckpt=out/ckpt.pt --data=/path/to/episodes --n_clips=64 --horizon=20

1. latent action quality: codebook health of the IDM's codes on held-out episodes, and probes to the true
   actions, fit on training episodes and scored on held-out ones: the paper's linear probe (closed-form
   ridge) on the latent actions (quantized vectors for quantized models), and beside it a linear probe on
   one-hot codes (the same capacity for VQ and FSQ), one on the IDM's output before quantization, and an
   MLP on the quantized vector, each with R^2 per action dimension;
2. real-action adaptation: a 2-layer MLP adapter from real actions to latent actions, learned from a few
   dozen labelled training episodes, and the codebook usage of its outputs (the paper: two-stage adapters
   collapse onto few codes);
3. video simulation: PSNR and SSIM of world-model rollouts on held-out clips, per horizon step and
   averaged, driven by the IDM's latent actions inferred from the ground truth, by real actions through
   the adapter, and by the null action (the gap to it is the control the latent actions carry), next to
   copying the last context frame.
4. fit: the world model's flow loss on training clips and on held-out ones, with the same noise; where the
   two part, the model has learned its episodes rather than the world, and more data would help.
A checkpoint of `train.py --mode=actions` (a world model driven by real actions) gets 3. and 4. alone, its rollouts
driven by the clips' real actions. The held-out split is the one train.py held out (data.ClipSampler). The
probe and the adapter need true actions; a folder without them gets the rest. The last line of stdout is one JSON object (keys: README).
LPIPS and FVD need network weights that cannot be downloaded here: they are not computed.
"""
import json
import sys
import time

import numpy as np
import torch

import measure
import state_probe
from configurator import configure, fail
from data import ClipSampler
from world_model import flow_loss

# ----------------------------------------------------------------------------------------------------
# settings
ckpt = 'out/ckpt.pt'
data = ''               # folder of episodes to evaluate on; '' = the data the checkpoint was trained on
camera = ''             # LeRobot --data: the camera (video or image feature); '' = the checkpoint's, else the first
frame_stride = 0        # LeRobot --data: keep every Nth frame; 0 = the checkpoint's
n_clips = 16            # held-out clips for video simulation
horizon = 10            # generated frames per clip, after the n_context given ones
euler_steps = 2         # Euler steps per window of the rollouts (sampling from noise to a frame)
cfg_scale = 1.0         # classifier-free guidance scale (4.0 cost 3 dB with true actions; NOTES.md)
n_episodes = 48         # at most this many episodes of each split for the probe and codebook health
probe_ridge = 1e-3      # ridge penalty, relative to the mean eigenvalue of the latents' Gram matrix
adapter_episodes = 32   # labelled training episodes the adapter learns from
adapter_steps = 500     # full-batch Adam steps of the adapter
state_probe_steps = 2400  # training steps of the data's state probe (cached beside the data); 0 = no state probe
flow_clips = 512        # clips of each split for the flow loss on training against held-out clips; 0 = skip
device = ''             # 'cpu', 'cuda', 'cuda:N'; '' = cuda if available
seed = 0
RENAMED = {'sample_steps': 'euler_steps'}  # old flags that still work
configure(globals(), sys.argv[1:])
# ----------------------------------------------------------------------------------------------------

device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
t_start = time.time()
try:
    model, settings, wm_cfg, sampler = measure.open_run(ckpt, data, device, 'val', horizon, seed, camera, frame_stride)
except (ValueError, OSError) as e:  # OSError: a full disk while preparing the data
    fail(str(e))
nc, lam, size = wm_cfg.n_context, model.lam, model.lam.quantizer.size
rnd = lambda v: [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)
mean = lambda xs: sum(xs) / len(xs)


@torch.inference_mode()
def quantize(z_e):
    """Continuous latent actions (..., n_tok, d) -> (quantized, codes or None), by the LAM's own quantizer."""
    z, codes, _ = lam.quantizer(z_e)
    return z, codes


# ----------------------------------------------------------------------------------------------------
# 1. the IDM on whole episodes: codebook health on held-out ones, linear probe train -> held-out
print(f"{ckpt} ({settings['mode']}) on {sampler.dir}")
out = dict(ckpt=ckpt, mode=settings['mode'], n_clips=n_clips, horizon=horizon)
real = model.real_actions  # a world model driven by real actions: no IDM to measure, no adapter
if real and sampler.actions is None:
    fail(f"{ckpt} was trained on real actions (--mode=actions); {sampler.dir} has none")
labelled, adapter = sampler.actions is not None, None
if not real:
    val_ids = sampler.episodes('val')[:n_episodes]
    train_ids = sampler.episodes('train')[:max(n_episodes, adapter_episodes)]  # the adapter's are the first ones
    ze_val, a_val = measure.episode_latents(model, sampler, val_ids, device)
    ze_val = torch.cat(ze_val)  # (N, n_tok, d), every held-out transition
    z_val, codes_val = quantize(ze_val)
    if codes_val is not None:
        stats, line = measure.codebook_health(codes_val, size)
        out.update(stats)
        print(f"held-out {line}")
    if not labelled:
        print("no true actions in this data: no linear probe, no adapter")
if not real and labelled:
    a_val = torch.cat(a_val)
    ze_train, a_train = measure.episode_latents(model, sampler, train_ids, device)
    ze_tr, a_tr = torch.cat(ze_train[:n_episodes]), torch.cat(a_train[:n_episodes])
    z_tr, codes_tr = quantize(ze_tr)
    probe = measure.ridge_probe(z_tr, a_tr, z_val, a_val, probe_ridge)
    out.update(probe_l1=probe['l1'], probe_r2=probe['r2'], probe_r2_per_dim=probe['r2_per_dim'],
               probe_l1_mean=probe['l1_mean'])
    print(f"linear probe latent -> true action ({min(n_episodes, len(ze_train))} train / {len(val_ids)} held-out "
          f"episodes): L1 {probe['l1']:.4f} (predicting the mean: {probe['l1_mean']:.4f}), R^2 {probe['r2']:.3f}")
    # The paper's probe reads the quantized vector, which is not the same test for every quantizer: FSQ's is
    # linear in len(levels) grid coordinates per token, VQ's gives each entry a free 32-d vector. One-hot codes
    # give both the same capacity; the IDM's output before quantization shows what the bottleneck lost; an MLP
    # on the quantized vector tells "the action is there" from "it is linearly readable".
    fair = dict(pre=measure.ridge_probe(ze_tr, a_tr, ze_val, a_val, probe_ridge),
                mlp=measure.mlp_probe(z_tr, a_tr, z_val, a_val, seed=seed))
    if codes_val is not None:
        onehot = lambda c: torch.nn.functional.one_hot(c, size).flatten(1).float()  # (N, n_tok * size)
        fair['onehot'] = measure.ridge_probe(onehot(codes_tr), a_tr, onehot(codes_val), a_val, probe_ridge)
    for name, p in fair.items():
        out.update({f'probe_{name}_r2': p['r2'], f'probe_{name}_r2_per_dim': p['r2_per_dim']})
    print("probe R^2 per action dim: quantized " + ', '.join(f"{r:.3f}" for r in probe['r2_per_dim']) + "; "
          + "; ".join(f"{name} {p['r2']:.3f}" for name, p in fair.items()))
    # What else the latent holds. The speed |a|: a code that is a speed dial, no direction, reads it well and the
    # action badly. The agent's move read off the states (their first two numbers are the agent's xy in the
    # built-in simulator and PushT): what the frames show, where the action is a command (PushT's PD target).
    feats = dict(quantized=(z_tr, z_val), pre=(ze_tr, ze_val))
    if codes_val is not None:
        feats['onehot'] = (onehot(codes_tr), onehot(codes_val))
    targets = dict(speed=(a_tr.norm(dim=1, keepdim=True), a_val.norm(dim=1, keepdim=True)))
    if sampler.states is not None:
        moves = lambda ids: torch.cat([torch.from_numpy(np.diff(sampler.get_episode(i)['states'][:, :2], axis=0))
                                       for i in ids]).to(device)  # (N, 2), aligned with the latents
        targets['disp'] = (moves(train_ids[:n_episodes]), moves(val_ids))
    for target, (y_tr, y_val) in targets.items():
        r2 = {name: measure.ridge_probe(x_tr, y_tr, x_val, y_val, probe_ridge)['r2']
              for name, (x_tr, x_val) in feats.items()}
        out.update({f"probe_{'' if name == 'quantized' else name + '_'}{target}_r2": r for name, r in r2.items()})
        print(f"probe R^2 of the {dict(speed='speed |a|', disp='agent displacement')[target]}: "
              + "; ".join(f"{name} {r:.3f}" for name, r in r2.items()))

    # ------------------------------------------------------------------------------------------------
    # 2. real-action adaptation: real action -> adapter -> the LAM's quantizer -> world model (rolled out in 3.)
    n_ad = min(adapter_episodes, len(ze_train))
    adapter, losses = measure.train_adapter(torch.cat(a_train[:n_ad]), torch.cat(ze_train[:n_ad]), adapter_steps, seed=seed)
    out.update(adapter_episodes=n_ad, adapter_loss=losses[-1])
    print(f"adapter fit on {n_ad} labelled episodes: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    with torch.inference_mode():
        codes_ad = quantize(adapter(a_val))[1]  # the adapter's codes over the held-out transitions
    if codes_ad is not None:
        stats, line = measure.codebook_health(codes_ad, size)
        out.update({f'adapter_{k}': v for k, v in stats.items()})
        print(f"adapter {line}")

# ----------------------------------------------------------------------------------------------------
# 3. video simulation on held-out clips, driven by the IDM's latent actions (or the real actions), by the
#    adapter's, by the null action, and copying the last frame
batch = sampler.sample(n_clips, device)
clips = batch['frames']  # (n_clips, n_context + horizon, 3, H, W)
# where the objects are in every generated frame, read by a probe trained on real frames; its error on the
# real held-out frames themselves is the floor of what it can tell
locator = state_probe.load_state_probe(sampler, device, state_probe_steps) if state_probe_steps else None
if locator is not None:
    for obj, err in state_probe.state_errors(locator, clips[:, nc:], batch['states'][:, nc:]).items():
        out[f'state_floor_{obj}'] = err.nanmean().item()


def report(prefix, gen):
    """Score a batch of rollouts against the held-out clips: {prefix}psnr, ssim, and with a state probe the
    objects' position errors {prefix}state_err_agent, _blocks; each with its per-step list."""
    p, s = measure.scores(gen, clips, nc)
    out = {f'{prefix}psnr': mean(p), f'{prefix}ssim': mean(s), f'{prefix}psnr_per_step': p, f'{prefix}ssim_per_step': s}
    if locator is not None:
        for obj, err in state_probe.state_errors(locator, gen[:, nc:], batch['states'][:, nc:]).items():
            per_step = err.nanmean(0).tolist()  # over clips; NaN only where no clip has the object
            out.update({f'{prefix}state_err_{obj}': mean(per_step), f'{prefix}state_err_{obj}_per_step': per_step})
    return out


print(f"video simulation: {n_clips} held-out clips, {nc} context + {horizon} generated frames, "
      f"{euler_steps} Euler steps, guidance {cfg_scale}")
# Every condition is rolled out by its own call with the same seed: the clips share their sampling noise
# across conditions (common random numbers), so "PSNR - null" is exactly 0 for a model that ignores actions.
simulate = lambda z: model.simulate(clips, z, euler_steps, cfg_scale, seed)
z = model.drive(clips, batch['actions'])  # the IDM's latent actions, or the clips' real ones (n_clips, L-1, n_tok, d)
out.update(report('', simulate(z)))
# The shuffle control: each clip driven by its own latent actions in another order in time. What the rollout
# loses is what the latents say about each transition; a code that holds only something constant over a clip
# (its speed, say) loses nothing, though it may beat the null action by far.
shuffle = torch.randperm(z.shape[1], generator=torch.Generator().manual_seed(seed))  # one order for every clip
out.update(report('shuffled_', simulate(z[:, shuffle])))
if adapter is not None:
    with torch.inference_mode():
        out.update(report('adapter_', simulate(model.encode_actions(batch['actions'], adapter))))
out.update(report('null_', simulate(None)))
out.update(report('copy_', measure.copy_last(clips, nc)))
# how long a rollout keeps each object: the generated frames whose position error is within a quarter (a half) of
# copy-last's, or within 0.01 of what the probe can tell on real frames
for obj in ('agent', 'blocks'):
    if f'state_err_{obj}' in out:
        for name, frac in (('quarter', 0.25), ('half', 0.5)):
            out[f'{obj}_frames_within_{name}'] = sum(
                e <= max(frac * c, out[f'state_floor_{obj}'] + 0.01)
                for e, c in zip(out[f'state_err_{obj}_per_step'], out[f'copy_state_err_{obj}_per_step']))
out['psnr_gain_over_null'] = out['psnr'] - out['null_psnr']
out['psnr_gain_over_shuffled'] = out['psnr'] - out['shuffled_psnr']
cols = [(name, p) for name, p in (('real' if real else 'latent', ''), ('shuffled', 'shuffled_'), ('adapter', 'adapter_'),
                                  ('null', 'null_'), ('copy-last', 'copy_'))
        if p + 'psnr' in out]
row = lambda first, psnrs, ssims: print(f"{first:>5} " + ''.join(f"{x:10.2f}" for x in psnrs) + "  |"
                                        + ''.join(f"{x:10.3f}" for x in ssims))
print("PSNR dB (left) and SSIM (right) per generated frame\n step " + ''.join(f"{n:>10}" for n, _ in cols)
      + "  |" + ''.join(f"{n:>10}" for n, _ in cols))
for k in range(horizon):
    row(k + 1, [out[p + 'psnr_per_step'][k] for _, p in cols], [out[p + 'ssim_per_step'][k] for _, p in cols])
row('mean', [out[p + 'psnr'] for _, p in cols], [out[p + 'ssim'] for _, p in cols])
for obj in ('agent', 'blocks'):
    if f'state_err_{obj}' in out:
        print(f"{obj} position error per generated frame (arena units; the probe on real frames: "
              f"{out[f'state_floor_{obj}']:.4f})\n step " + ''.join(f"{n:>10}" for n, _ in cols))
        for k in list(range(horizon)) + ['mean']:
            key = lambda p: out[f'{p}state_err_{obj}'] if k == 'mean' else out[f'{p}state_err_{obj}_per_step'][k]
            print(f"{k + 1 if k != 'mean' else k:>5} " + ''.join(f"{key(p):10.4f}" for _, p in cols))
        print(f"{obj} held for {out[f'{obj}_frames_within_quarter']} / {out[f'{obj}_frames_within_half']} of {horizon} "
              f"generated frames (error within a quarter / half of copy-last's, or the probe's + 0.01)")

# ----------------------------------------------------------------------------------------------------
# 4. fit: the flow loss (train.py's, without the null-action drop or the motion weight) on training windows against
#    held-out ones. Each split has its own sampler, so the clips of 1.-3. are unchanged; both splits see the same
#    flow times and noise, so only the clips differ (at 512 windows a split the gap still moves by about 0.1).
if flow_clips:
    flow = {}
    for split in ('train', 'val'):
        windows, g = ClipSampler(sampler.dir, wm_cfg.n_frames, split, seed=seed), torch.Generator(device).manual_seed(seed)
        losses = []
        for _ in range(max(1, flow_clips // 16)):
            b = windows.sample(16, device)
            with torch.inference_mode():
                z = model.drive(b['frames'], b['actions'])
                losses.append(flow_loss(model.wm, model.action, b['frames'], z, generator=g).item())
        flow[split] = mean(losses)
    out.update(flow_train=flow['train'], flow_val=flow['val'], flow_gap=flow['val'] / flow['train'] - 1)
    print(f"flow loss on {16 * len(losses)} training / held-out windows (the same noise): {flow['train']:.5f} / "
          f"{flow['val']:.5f} (held-out {out['flow_gap']:+.1%})")

out['wall_s'] = time.time() - t_start
print(f"done in {out['wall_s']:.0f} s (LPIPS and FVD are not computed: their networks cannot be downloaded here)")
print(json.dumps({k: rnd(v) if isinstance(v, (float, list)) else v for k, v in out.items()}))
