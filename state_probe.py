"""
The state probe: where the objects are in a frame, read by a small CNN trained on real frames, so that a
rollout is scored on whether its objects are where they should be (what a user looks at), not on pixels.
eval.py and sample.py report its errors per generated frame; the probe is trained once per dataset and cached
beside it. Imports data.py (atomic_save, prepare_once, to_model).
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import atomic_save, prepare_once, to_model

def state_layout(S):
    """Columns of a state vector of S dims: (agent xy, [block xy, ...]). The built-in simulator's (8,) is agent
    xy then 3 block xy, zeros for absent blocks; any other layout is read as agent xy then one object's xy
    (PushT: the T's position). Positions are in frame widths (the built-in arena is the frame)."""
    return (0, 1), ([(2, 3), (4, 5), (6, 7)] if S == 8 else [(2, 3)] if S >= 4 else [])


class StateProbe(nn.Module):
    """Frame (B, 3, R, R) in [-1, 1] -> two heat maps (B, 2, R, R): the agent's and the blocks'.

    Trained on real frames to draw a small Gaussian at every object's centre (dense targets, as in pose
    estimation, learn in hundreds of steps where regressing coordinates from the whole frame took thousands),
    fully convolutional, so a block is found wherever it is, one map for all blocks, so their order in the
    state does not matter. `locate` reads the peaks out.
    """

    def __init__(self, width=24):
        super().__init__()
        layers, c = [], 3
        for dilation in (1, 2, 4, 1):
            layers += [nn.Conv2d(c, width, 3, 1, dilation, dilation=dilation), nn.SiLU()]
            c = width
        self.net = nn.Sequential(*layers, nn.Conv2d(width, 2, 1))

    def forward(self, x):
        return self.net(x)


def object_maps(states, S, res, sigma=1.0):
    """Targets: states (N, S) -> (N, 2, res, res), Gaussians of height 1 at the agent's and the blocks' centres."""
    agent, blocks = state_layout(S)
    px = (torch.arange(res, device=states.device) + 0.5) / res  # pixel centres, frame widths
    def gauss(xy):  # (N, 2) -> (N, res, res); rows are y
        return torch.exp(-((px[None, :, None] - xy[:, 1, None, None]).square() + (px[None, None, :] - xy[:, 0, None, None]).square())
                         * res ** 2 / (2 * sigma ** 2))
    maps = torch.zeros(len(states), 2, res, res, device=states.device)
    maps[:, 0] = gauss(states[:, list(agent)])
    for pair in blocks:
        xy = states[:, list(pair)]
        maps[:, 1] = torch.maximum(maps[:, 1], gauss(xy) * (xy.abs().sum(1) > 0)[:, None, None])
    return maps


def locate(heat, threshold=0.3):
    """Heat maps (N, 2, R, R) -> the agent's position (N, 2) (its map's peak), a (N, R, R) mask of the block
    map's local maxima above threshold, and the sub-pixel position at every pixel (N, R, R, 2) of the block map.
    Positions are refined to sub-pixel by the centroid of the 5 x 5 neighbourhood of the peak (a 3 x 3 one
    is biased towards the pixel centre by a third of a pixel)."""
    N, _, R, _ = heat.shape
    px = (torch.arange(R, device=heat.device) + 0.5) / R
    w = heat.clamp(min=0)
    box = lambda t: F.avg_pool2d(t, 5, 1, 2, count_include_pad=False)
    mass = box(w).clamp(min=1e-6)
    cx, cy = box(w * px[None, None, None, :]) / mass, box(w * px[None, None, :, None]) / mass  # (N, 2, R, R)
    i = heat[:, 0].flatten(1).argmax(1)
    agent = torch.stack([cx[:, 0].flatten(1).gather(1, i[:, None])[:, 0], cy[:, 0].flatten(1).gather(1, i[:, None])[:, 0]], 1)
    b = heat[:, 1]
    peaks = (b == F.max_pool2d(b[:, None], 3, 1, 1)[:, 0]) & (b > threshold)
    return agent, peaks, torch.stack([cx[:, 1], cy[:, 1]], -1)


def object_distances(heat, states, miss=0.5):
    """Position errors from heat maps (N, 2, R, R) against true states (N, S): dict(agent (N,), blocks (N,)).
    A block's error is the distance to the nearest block peak (at most `miss`, also when no peak is left: a
    vanished block counts as `miss`), averaged over the blocks present; NaN where none is."""
    agent_cols, blocks = state_layout(states.shape[-1])
    agent, peaks, block_xy = locate(heat)
    out = dict(agent=(agent - states[:, list(agent_cols)]).norm(dim=-1))
    if blocks:
        true = torch.stack([states[:, list(p)] for p in blocks], 1)  # (N, n, 2)
        present = true.abs().sum(-1) > 0
        d = (block_xy.flatten(1, 2)[:, None] - true[:, :, None]).norm(dim=-1)  # (N, n, R*R)
        d = d.masked_fill(~peaks.flatten(1)[:, None], miss).min(-1).values.clamp(max=miss)
        out['blocks'] = (d * present).sum(-1) / present.sum(-1)
    return out


def fit_state_probe(sampler, device='cpu', episodes=400, steps=2400, batch=32, lr=3e-3, seed=0):
    """Train a StateProbe on the frames of up to `episodes` training episodes (MSE to the target maps, Adam,
    cosine decay). The probe is a measuring instrument: it only ever sees real frames."""
    torch.manual_seed(seed)
    eps = [sampler.get_episode(i) for i in sampler.episodes('train')[:episodes]]
    frames = torch.from_numpy(np.concatenate([e['frames'] for e in eps]))  # (N, R, R, 3) uint8
    states = torch.from_numpy(np.concatenate([e['states'] for e in eps])).float().to(device)
    probe = StateProbe().to(device)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for i in tqdm(range(steps), desc='state probe', leave=False):
        for grp in opt.param_groups:
            grp['lr'] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        idx = torch.randint(len(frames), (batch,), generator=g)
        target = object_maps(states[idx], states.shape[1], frames.shape[1])
        loss = F.mse_loss(probe(to_model(frames[idx], device)), target) * 100
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe.eval()


def load_state_probe(sampler, device='cpu', steps=2400):
    """The dataset's state probe, trained once and cached beside its shards (state_probe.pt), so that every
    checkpoint evaluated on the same data is measured by the same instrument. None without states, or when
    the states' position columns (state_layout) are not positions in frame widths, within [0, 1]."""
    if sampler.states is None:
        return None
    agent, blocks = state_layout(sampler.states.shape[1])
    cols = list(agent) + [c for pair in blocks for c in pair]
    if not (np.min(sampler.states[:, cols]) >= 0 and np.max(sampler.states[:, cols]) <= 1):
        print(f"no state probe: the states of {sampler.dir} are not positions in frame widths (columns {cols})")
        return None
    path = os.path.join(sampler.dir, 'state_probe.pt')

    def fit():
        print(f"fitting the state probe of {sampler.dir} ({steps} steps; cached in {path})")
        state = fit_state_probe(sampler, device, steps=steps).state_dict()
        atomic_save(path, lambda f: torch.save(state, f))
    prepare_once(path, lambda: os.path.isfile(path), fit)  # evaluations started together fit it once
    probe = StateProbe().to(device)
    probe.load_state_dict(torch.load(path, map_location=device))
    return probe.eval()


@torch.inference_mode()
def state_errors(probe, frames, states):
    """Object position errors of frames (B, L, 3, H, W) as the probe reads them, against the true states
    (B, L, S): object_distances, each (B, L), in frame widths (the built-in arena is 1 wide)."""
    d = object_distances(probe(frames.flatten(0, 1)), states.flatten(0, 1).to(frames))
    return {k: v.view(frames.shape[:2]) for k, v in d.items()}
