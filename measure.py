"""
Measurements of a CoLA-World model, shared by eval.py, sample.py, plan.py, play.py and train.py's end-of-run
summary: what they start from (a checkpoint's model and its data, open_run), frame metrics (PSNR, SSIM), batched
rollout scores, codebook health, the linear (and MLP) probe of latent actions, and the real-action adapter.
Frames are batched tensors in [-1, 1]; figures come back as floats.
"""
import os
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cola
from data import ClipSampler, atomic_save, resolve_data, to_model
from lam import code_stats


def open_run(ckpt, data, device, split='val', horizon=None, seed=0, camera='', frame_stride=0):
    """What sample.py, eval.py, plan.py and play.py start from: the checkpoint's model and settings, its world
    model's config, and a clip sampler over `split` of `data` ('' = the data the checkpoint trained on). Clips
    have n_context + horizon frames, or one training window when horizon is None. A LeRobot dataset is read with
    `camera` and `frame_stride`, or ('', 0) the checkpoint's. A checkpoint that carries its data's state probe
    (export) puts it beside that data when none is there, so a fresh clone measures without fitting one."""
    model, saved = cola.load_model(ckpt, device)
    settings, wm_cfg = saved['config'], model.wm.cfg
    data_dir = resolve_data(data or settings['data'] or None, wm_cfg.res, wm_cfg.n_frames,
                            policy=settings.get('policy', 'explore'),
                            camera=camera or settings.get('camera', ''), stride=frame_stride or settings.get('frame_stride', 1))
    probe = os.path.join(data_dir, 'state_probe.pt')
    if 'state_probe' in saved and not data and not os.path.exists(probe):
        atomic_save(probe, lambda f: torch.save(saved['state_probe'], f))
    clip_len = wm_cfg.n_frames if horizon is None else wm_cfg.n_context + horizon
    return model, settings, wm_cfg, ClipSampler(data_dir, clip_len, split, seed=seed)


def export(src, dst, device='cpu'):
    """A checkpoint -> a small one to hand on: the modules' weights in fp16 (the EMA world model where saved), the
    settings, step and phase, and the state probe fitted on its training data when there is one. No optimizer
    state: it loads wherever --ckpt or --init_from does, not for --resume."""
    model, saved = cola.load_model(src, device)
    out = {name: {k: v.half() if v.is_floating_point() else v for k, v in getattr(model, name).state_dict().items()}
           for name in cola.CoLAWorld.MODULES}
    out.update(config=saved['config'], step=saved['step'], phase=saved['phase'])
    probe = os.path.join(open_run(src, '', device)[3].dir, 'state_probe.pt')
    if os.path.isfile(probe):
        out['state_probe'] = torch.load(probe, map_location='cpu')
    atomic_save(dst, lambda f: torch.save(out, f))


def psnr(a, b):
    """Per-frame PSNR in dB of clips in [-1, 1], (B, T, C, H, W) -> (B, T); identical frames give 100 dB
    (a cap, so averages stay finite)."""
    mse = ((a - b) / 2).square().flatten(2).mean(-1)
    return (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).clamp(max=100.0)


def ssim(a, b, data_range=2.0, win=11, sigma=1.5):
    """Per-frame SSIM (Wang et al. 2004) of clips in [-1, 1], (B, T, C, H, W) -> (B, T).

    Local statistics under an 11x11 Gaussian window (sigma 1.5, population variances), K1 = 0.01,
    K2 = 0.03, the SSIM map averaged over the valid region (no padding) and the channels: the same as
    skimage's structural_similarity(gaussian_weights=True, use_sample_covariance=False, channel_axis=...).
    """
    B, T, C, H, W = a.shape
    g = torch.exp(-(torch.arange(win, dtype=torch.float64) - win // 2).square() / (2 * sigma ** 2))
    g = (g / g.sum()).to(a)
    kernel = (g[:, None] * g[None]).expand(5 * C, 1, win, win)
    x, y = a.reshape(B * T, C, H, W), b.reshape(B * T, C, H, W)
    # the five local moments in one grouped convolution: E[x], E[y], E[x^2], E[y^2], E[xy]
    mx, my, mxx, myy, mxy = F.conv2d(torch.cat([x, y, x * x, y * y, x * y], 1), kernel, groups=5 * C).chunk(5, 1)
    vx, vy, cov = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).view(B, T)


def scores(gen, clips, n_context):
    """Per-horizon-step PSNR and SSIM of generated clips against the truth, batch-averaged: two lists of
    length L - n_context (the context frames are given, not scored)."""
    g, c = gen[:, n_context:], clips[:, n_context:]
    return psnr(g, c).mean(0).tolist(), ssim(g, c).mean(0).tolist()


def copy_last(clips, n_context):
    """The copy-last-frame baseline: the last context frame repeated over the horizon, (B, L, ...)."""
    return torch.cat([clips[:, :n_context], clips[:, n_context - 1:n_context].expand_as(clips[:, n_context:])], 1)


def episode_latents(model, sampler, ids, device='cpu', chunk=16):
    """The IDM's outputs and the true actions of every transition of the episodes `ids` of a ClipSampler,
    batched by episode length (eval.py's probe and adapter, plan.py's adapter): two lists, one entry per
    episode, z_e (T-1, n_tok, d) and actions (T-1, A) or None."""
    eps = [e for e in map(sampler.get_episode, ids) if len(e['frames']) >= 2]
    z_e = [None] * len(eps)
    groups = defaultdict(list)  # length -> positions in eps
    for k, e in enumerate(eps):
        groups[len(e['frames'])].append(k)
    for group in groups.values():
        for c in range(0, len(group), chunk):
            part = group[c:c + chunk]
            clips = to_model(torch.from_numpy(np.stack([eps[k]['frames'] for k in part])), device)
            for k, z in zip(part, model.latent_actions(clips)['z_e']):
                z_e[k] = z
    actions = [None if e['actions'] is None else torch.from_numpy(e['actions']).to(device) for e in eps]
    return z_e, actions


def rollout_psnr(model, clips, null=False, n_steps=2, cfg_scale=1.0, seed=0, actions=None):
    """train.py's summary: roll out driven as the model is driven (CoLAWorld.drive: the IDM's latent actions
    inferred from the ground truth, or the clips' real `actions` (B, L-1, A)), or by the null action when `null`.
    Returns per-step PSNR lists (length L - n_context) for the model and for copy-last-frame, the frames,
    and the codes (None without latent actions)."""
    nc, z, codes = model.wm.cfg.n_context, None, None
    if not null and model.real_actions:
        z = model.drive(clips, actions)
    elif not null:  # the IDM once, for the latents and their codes
        acts = model.latent_actions(clips)
        z, codes = acts['z'], acts['codes']
    gen = model.simulate(clips, z, n_steps, cfg_scale, seed)
    return dict(psnr=psnr(gen[:, nc:], clips[:, nc:]).mean(0).tolist(),
                psnr_copy=psnr(copy_last(clips, nc)[:, nc:], clips[:, nc:]).mean(0).tolist(),
                frames=gen, codes=codes)


def codebook_health(codes, size):
    """code_stats with a readable one-line form for summaries; codes may be None (continuous actions)."""
    if codes is None:
        return {}, 'continuous latent actions (no codebook)'
    st = code_stats(codes, size)
    return st, (f"codebook: {st['code_util']:.0%} of {size} entries used, max entry {st['code_max']:.0%}, "
                f"entropy {st['code_entropy']:.2f}, perplexity {st['code_perplexity']:.1f}")


def ridge_probe(x_train, y_train, x_test, y_test, ridge=1e-3):
    """The paper's linear probe of latent-action quality, in closed form: fit y = x W + b by ridge
    regression on the training pairs, score on the held-out ones. x: (N, ...) features, y: (N, A).

    The penalty is `ridge` times the mean eigenvalue of the centred Gram matrix, so it does not depend on
    the scale of the latents, plus a tiny floor: constant latents (a collapsed codebook) then predict the
    training mean instead of amplified round-off. Returns dict(l1: mean absolute error (the paper's
    metric), r2: 1 - SS_res / SS_tot averaged over action dimensions, r2_per_dim: the same per dimension,
    l1_mean: the L1 of always predicting the training mean)."""
    x, y = x_train.flatten(1).double(), y_train.double()
    xt, yt = x_test.flatten(1).double(), y_test.double()
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    penalty = ridge * gram.diagonal().mean() + 1e-8 * len(x)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    W = torch.linalg.solve(gram + penalty * eye, xc.T @ (y - my))
    return probe_scores((xt - mx) @ W + my, yt, my)


def probe_scores(pred, y, y_train_mean):
    """L1, R² (mean and per dimension) of held-out predictions pred (N, A) against y (N, A)."""
    pred, y = pred.double(), y.double()
    r2 = 1 - (pred - y).square().sum(0) / (y - y.mean(0)).square().sum(0).clamp(min=1e-12)
    return dict(l1=(pred - y).abs().mean().item(), r2=r2.mean().item(), r2_per_dim=r2.tolist(),
                l1_mean=(y - y_train_mean.double()).abs().mean().item())


def mlp_probe(x_train, y_train, x_test, y_test, hidden=128, steps=1000, lr=3e-3, seed=0):
    """A small non-linear probe: a 2-hidden-layer MLP fit full batch (Adam) on standardised features and
    targets, scored on the held-out pairs like ridge_probe. Where it beats the linear probe, the latent holds
    the action but not linearly (e.g. FSQ's grid, whose linear span has only len(levels) dims per token)."""
    torch.manual_seed(seed)
    x, xt = x_train.flatten(1).float().clone(), x_test.flatten(1).float().clone()  # may come from inference_mode
    y = y_train.float().clone()
    mx, sx, my, sy = x.mean(0), x.std(0).clamp(min=1e-6), y.mean(0), y.std(0).clamp(min=1e-6)
    net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, y.shape[1])).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.mse_loss(net((x - mx) / sx), (y - my) / sy)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = net((xt - mx) / sx) * sy + my
    return probe_scores(pred, y_test, my)


class Adapter(nn.Module):
    """Real action (..., A) -> continuous latent action (..., n_tok, d): the paper's 2-layer MLP adapter.
    Its output goes through the LAM's own quantizer, so the world model gets a valid latent action."""

    def __init__(self, action_dim, n_tok, dim, hidden=256):
        super().__init__()
        self.n_tok, self.dim = n_tok, dim
        self.net = nn.Sequential(nn.Linear(action_dim, hidden), nn.SiLU(), nn.Linear(hidden, n_tok * dim))

    def forward(self, a):
        return self.net(a).unflatten(-1, (self.n_tok, self.dim))


def train_adapter(actions, z_e, steps=500, lr=3e-3, seed=0):
    """Fit an Adapter on labelled transitions, full batch: actions (N, A) -> the IDM's output z_e (N, n_tok, d).

    The target is z_e, before quantization: quantizing it gives back exactly the IDM's latent action, for
    every quantizer (VQ's nearest entry, FSQ's rounding), so the adapter lands where the quantizer expects.
    Returns (adapter in eval mode, the loss at every step)."""
    torch.manual_seed(seed)
    actions, z_e = actions.float().clone(), z_e.float().clone()  # ordinary tensors: may come from inference_mode
    adapter = Adapter(actions.shape[1], *z_e.shape[1:]).to(actions.device)
    opt = torch.optim.Adam(adapter.parameters(), lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.mse_loss(adapter(actions), z_e)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return adapter.eval(), losses
