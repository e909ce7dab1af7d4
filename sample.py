"""
See what a CoLA-World checkpoint does: GIFs of its rollouts on held-out clips, latent-action transfer from
one clip to another, and a tour of its codebook.

  python sample.py --ckpt=out/ckpt.pt                              # writes samples/*.gif
  python sample.py --ckpt=out/ckpt.pt --horizon=46 --n_clips=8 --out_dir=samples-long

out_dir/rollout_K.gif  ground truth | generated | absolute difference, for held-out clip K: the world model
                       rolls out from the clip's first n_context frames, driven by the latent actions the
                       IDM infers from the ground truth (sliding windows past one training clip), or by the
                       clip's real actions for a checkpoint of `train.py --mode=actions`
out_dir/transfer.gif   one row per clip K: clip K | clip K+1 | clip K+1's first frames driven by clip K's
                       latent actions (the classic latent-action demo: the motion moves, the scene stays)
out_dir/codebook.gif   one cell per codebook entry (FSQ: level combination), that code in every token slot,
                       played for tour_steps frames from the same start
A bar under every GIF frame marks time: green over the given context frames, red over generated ones.
Prints PSNR/SSIM per horizon step, and on data with states the position errors of the agent and blocks read by
the data's state probe (eval.py); the last line of stdout is one JSON object.
"""
import json
import math
import os
import sys

import numpy as np
import torch

import measure
import state_probe
from configurator import configure, fail
from lam import codebook_vectors
from data import to_uint8, write_gif

# ----------------------------------------------------------------------------------------------------
# settings
ckpt = 'out/ckpt.pt'
data = ''               # folder of episodes to sample from; '' = the data the checkpoint was trained on
camera = ''             # LeRobot --data: the camera (video or image feature); '' = the checkpoint's, else the first
frame_stride = 0        # LeRobot --data: keep every Nth frame; 0 = the checkpoint's
out_dir = 'samples'
n_clips = 4             # held-out clips (one rollout GIF each; at least 2 for the transfer GIF)
horizon = 22            # generated frames per clip, after the n_context given ones
tour_steps = 4          # frames each code is played for in the codebook tour
euler_steps = 2         # Euler steps per window (as eval.py)
cfg_scale = 1.0         # classifier-free guidance scale (as eval.py)
state_probe_steps = 2400  # the data's state probe (as eval.py; cached beside the data); 0 = none
fps = 5
scale = 2               # GIF pixels per frame pixel
device = ''             # 'cpu', 'cuda', 'cuda:N'; '' = cuda if available
seed = 0
RENAMED = {'sample_steps': 'euler_steps'}  # old flags that still work
configure(globals(), sys.argv[1:])
# ----------------------------------------------------------------------------------------------------

device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
try:
    model, settings, wm_cfg, sampler = measure.open_run(ckpt, data, device, 'val', horizon, seed, camera, frame_stride)
except (ValueError, OSError) as e:  # OSError: a full disk while preparing the data
    fail(str(e))
nc, quantizer = wm_cfg.n_context, model.lam.quantizer
os.makedirs(out_dir, exist_ok=True)
gifs = []


def gif(name, cells):
    """cells: uint8 (rows, cols, T, H, W, 3) videos -> out_dir/name (data.write_gif), listed in `gifs`."""
    gifs.append(os.path.join(out_dir, name))
    write_gif(gifs[-1], cells, fps, scale, nc)


# ----------------------------------------------------------------------------------------------------
# rollouts on held-out clips, driven by the IDM's latent actions (or the clips' real actions)
batch = sampler.sample(n_clips, device)
clips = batch['frames']  # (n_clips, n_context + horizon, 3, H, W)
real = model.real_actions  # a world model trained on the data's real actions
if real and batch['actions'] is None:
    fail(f"{ckpt} was trained on real actions (--mode=actions); {sampler.dir} has none")
z = model.drive(clips, batch['actions'])  # the IDM's latent actions, or the clips' real ones (n_clips, L-1, n_tok, d)
gen = model.simulate(clips, z, euler_steps, cfg_scale, seed)
copy = measure.copy_last(clips, nc)
p, s = measure.scores(gen, clips, nc)
p_copy, s_copy = measure.scores(copy, clips, nc)
print(f"{ckpt} ({settings['mode']}): {n_clips} held-out clips of {sampler.dir}, {nc} context + {horizon} generated "
      f"frames, driven by the {'real' if real else 'latent'} actions")
mean = lambda xs: sum(xs) / len(xs)
columns = {'PSNR dB': p, 'SSIM': s, 'copy PSNR': p_copy, 'copy SSIM': s_copy}
locator = state_probe.load_state_probe(sampler, device, state_probe_steps) if state_probe_steps else None
if locator is not None:  # object position errors, arena units; means over the clips that have the object
    truth_states = batch['states'][:, nc:]
    for name, frames in (('', gen), ('copy ', copy)):
        for obj, err in state_probe.state_errors(locator, frames[:, nc:], truth_states).items():
            columns[f'{name}{obj} err'] = err.nanmean(0).tolist()
print('step ' + ''.join(f"{k:>13}" for k in columns))
for k in range(horizon):
    print(f"{k + 1:4d} " + ''.join(f"{v[k]:13.3f}" for v in columns.values()))
print('mean ' + ''.join(f"{mean(v):13.3f}" for v in columns.values()))
truth, fake = to_uint8(clips), to_uint8(gen)  # (n_clips, L, H, W, 3)
diff = np.abs(truth.astype(np.int16) - fake).astype(np.uint8)
for k in range(n_clips):
    gif(f'rollout_{k}.gif', np.stack([truth[k], fake[k], diff[k]])[None])

# ----------------------------------------------------------------------------------------------------
# action transfer: clip k's latent actions drive the first frames of clip k+1
if n_clips >= 2:
    target = torch.arange(1, n_clips + 1) % n_clips
    moved = to_uint8(model.simulate(clips[target], z, euler_steps, cfg_scale, seed))
    gif('transfer.gif', np.stack([truth, truth[target.numpy()], moved], 1))

# ----------------------------------------------------------------------------------------------------
# codebook tour: from clip 0's context (and its true context actions), each code repeated for tour_steps
codebook = None if real else codebook_vectors(quantizer)
if codebook is None:
    print("real or continuous actions: no codebook tour")
else:
    n_tok = z.shape[2]
    z_tour = torch.cat([z[:1, :nc - 1].expand(len(codebook), -1, -1, -1),
                        codebook[:, None, None].expand(-1, tour_steps, n_tok, -1)], 1)  # (size, nc-1+tour_steps, n_tok, d)
    tour = model.simulate(clips[:1, :nc].expand(len(codebook), -1, -1, -1, -1), z_tour, euler_steps, cfg_scale, seed)
    cols = math.ceil(math.sqrt(len(codebook)))
    rows = math.ceil(len(codebook) / cols)
    cells = np.zeros((rows * cols,) + tour.shape[1:2] + truth.shape[2:], np.uint8)  # empty cells stay black
    cells[:len(codebook)] = to_uint8(tour)
    gif('codebook.gif', cells.reshape(rows, cols, *cells.shape[1:]))

print(f"wrote {', '.join(gifs)}")
print(json.dumps(dict(ckpt=ckpt, n_clips=n_clips, horizon=horizon, psnr=round(mean(p), 4), ssim=round(mean(s), 4),
                      copy_psnr=round(mean(p_copy), 4), copy_ssim=round(mean(s_copy), 4),
                      psnr_per_step=[round(x, 4) for x in p], ssim_per_step=[round(x, 4) for x in s], gifs=gifs)))
