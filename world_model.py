"""
The world model: a compact video diffusion transformer (DiT) on pixel patches, its action-conditioning
modules, rectified-flow training and the Euler sampler with classifier-free guidance.

Two modules, saved separately in checkpoints (`wm` and `action`):
  VideoDiT       (`wm`)      the backbone; pretrained action-free, frozen during the warm-up.
  ActionEncoder  (`action`)  new modules that turn latent actions into per-frame modulation that is
                             ADDED to the timestep modulation in every block, as in the paper.
Alignment: frame k is conditioned on the transition that produced it, action k-1; frame 0 gets the
learned null action. Imports only model.py.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Block, STBlock, TimestepEmbedder, modulate, patchify, unpatchify


@dataclass
class WMConfig:
    """The world model's settings; the defaults are the CPU preset's, the run `python train.py` trains."""
    res: int = 32
    patch: int = 4
    channels: int = 3
    n_frames: int = 4           # clip length T the model is trained on (and rolls out in windows of)
    n_context: int = 2          # clean context frames; only the other T - n_context frames are noised
    width: int = 64
    depth: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    n_action_tokens: int = 2    # must match the LAM
    action_dim: int = 32
    act_width: int = 64         # the action transformer (paper: 6 blocks)
    act_depth: int = 1
    t_shift: float = 8.0        # flow times t -> s t / (1 + (s - 1) t) in training and sampling (SD3's shift)


# Size presets: plain values shared by WMConfig and LAMConfig (the trainer applies them to both).
# 'cpu' (the dataclasses' defaults) learns on the built-in simulator in minutes on 2 cores; 'base' is for GPUs:
# the width and depth of the paper's IDM, given here to the world model (the IDM's depth is idm_depth).
PRESETS = {
    'cpu': dict(res=32, patch=4, n_frames=4, width=64, depth=4, n_heads=4, act_width=64, act_depth=1),
    'base': dict(res=128, patch=8, n_frames=16, width=768, depth=12, n_heads=12, act_width=512, act_depth=6),
}


class VideoDiT(nn.Module):
    """Noisy clip (B, T, C, H, W) + per-frame flow time (B, T) -> predicted clean clip x0_hat (B, T, C, H, W).

    ST blocks with causal temporal attention and adaLN-Zero. The network predicts the clean frame, not
    the velocity ("x-prediction", Li & He 2025, "Back to Basics: Let Denoising Generative Models
    Denoise"): with pixel patches wider than the model (8x8x3 = 192 > 128 at the first CPU sizes), predicting
    velocity left the model at the mean image. x0_hat is a residual on the latest clean context frame, and
    the final layer starts at zero, so a fresh model predicts "nothing moves" and every block is the
    identity on its residual stream. The sampler turns x0_hat into the velocity (x_t - x0_hat) / t.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.embed = nn.Linear(cfg.patch ** 2 * cfg.channels, D)
        self.ref_embed = nn.Linear(cfg.patch ** 2 * cfg.channels, D)
        # no absolute position in space: the spatial attention sees relative positions only (rotary, in
        # STBlock), so moving the agent by the action is one operation, learned once for every place in the frame
        self.pos_time = nn.Parameter(torch.randn(cfg.n_frames, D) * 0.02)
        self.t_embed = TimestepEmbedder(D)
        self.blocks = nn.ModuleList(STBlock(D, cfg.n_heads, cfg.res // cfg.patch, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.head = nn.Linear(D, cfg.patch ** 2 * cfg.channels)
        for layer in (self.adaLN_out[1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, mod_add=None):
        """x: (B, T, C, H, W); t: (B, T) in [0, 1] (0 = clean); mod_add: (B, T, 9*D) from ActionEncoder."""
        B, T, C, H, W = x.shape
        if T > self.cfg.n_frames or (H, W) != (self.cfg.res, self.cfg.res):
            raise ValueError(f"world model takes up to {self.cfg.n_frames} frames of {self.cfg.res}x{self.cfg.res}, "
                             f"got shape {tuple(x.shape)}")
        # frame k's reference is the latest clean context frame it may see, min(k, n_context - 1); its
        # tokens also take it as input, so copying what stands still is local, not learned through time
        ref = x[:, torch.arange(T, device=x.device).clamp(max=self.cfg.n_context - 1)]
        h = self.embed(patchify(x, self.cfg.patch)) + self.ref_embed(patchify(ref, self.cfg.patch))
        h = h + self.pos_time[:T, None]  # (B, T, N, D)
        c = self.t_embed(t)  # (B, T, D)
        for blk in self.blocks:
            h = blk(h, c, mod_add)
        shift, scale = self.adaLN_out(c)[:, :, None].chunk(2, dim=-1)
        return ref + unpatchify(self.head(modulate(self.norm_out(h), shift, scale)), self.cfg.patch, H, W)


class ActionEncoder(nn.Module):
    """Latent actions (B, T-1, n_tok, d) -> per-frame modulation (B, T, 9*D) added in every DiT block.

    A small causal transformer runs over the per-frame action sequence (so action k cannot influence
    frames < k+1 through it), then one MLP gives shift/scale/gate. Its last layer starts small (std 0.02),
    so attaching it to a pretrained backbone changes little at step 0 while the latent actions get a
    gradient from the first step (a zero layer would block it). The learned `null` action stands
    in for frame 0, for dropped conditions (classifier-free guidance) and for action-free rollouts.
    """

    def __init__(self, cfg):
        super().__init__()
        A = cfg.act_width
        self.inp = nn.Linear(cfg.n_action_tokens * cfg.action_dim, A)
        self.null = nn.Parameter(torch.randn(A) * 0.02)
        self.pos = nn.Parameter(torch.randn(cfg.n_frames, A) * 0.02)
        self.blocks = nn.ModuleList(Block(A, max(1, A // 64)) for _ in range(cfg.act_depth))
        self.out = nn.Sequential(nn.LayerNorm(A), nn.Linear(A, A), nn.SiLU(), nn.Linear(A, STBlock.N_MOD * cfg.width))
        # small, not zero: a zero last layer passes no gradient back to the latent actions, and through a frozen
        # world model the IDM then waits hundreds of steps for any signal (NOTES.md)
        nn.init.normal_(self.out[-1].weight, std=0.02)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z, drop=None, T=None):
        """z: (B, T-1, n_tok, d) or None (null everywhere; then give T); drop: (B,) bool, True -> null."""
        if z is None:
            a = self.null.expand(1, T - 1, -1)
        else:
            a = self.inp(z.flatten(2))  # (B, T-1, A)
            if drop is not None:
                a = torch.where(drop[:, None, None], self.null.to(a.dtype), a)
        a = torch.cat([self.null.to(a.dtype).expand(a.shape[0], 1, -1), a], dim=1)  # frame 0: null
        a = a + self.pos[:a.shape[1]]
        for blk in self.blocks:
            a = blk(a, causal=True)
        return self.out(a)  # (B, T, 9*D)


# ----------------------------------------------------------------------------------------------------
# rectified flow: x_t = (1 - t) x_0 + t * noise, velocity noise - x_0 = (x_t - x_0) / t, t = 0 is clean

MOTION_THRESHOLD = 0.1  # a pixel "moved" when a channel changed by more than 0.1 of [-1, 1] (13/255): above sensor noise


def shift_t(t, s):
    """SD3's time shift (Esser et al. 2024): s > 1 moves flow times towards noise, keeping 0 and 1."""
    return s * t / (1 + (s - 1) * t)


def pixel_loss(pred, target, prev, motion_weight=0.0):
    """Mean squared error of pred against target frames (B, L, C, H, W). motion_weight = m > 0 weighs each pixel
    by 1 + m * [it changed by more than MOTION_THRESHOLD from prev, the frames before target] (a weighted mean):
    where the agent is a few pixels of the frame, as on PushT, the pixels that depend on the action are
    otherwise 1-2% of the loss and the IDM's gradient is too weak to find the move (NOTES.md, "PushT")."""
    if motion_weight <= 0:
        return F.mse_loss(pred, target)
    moved = (target - prev).abs().amax(2, keepdim=True) > MOTION_THRESHOLD  # (B, L, 1, H, W)
    w = 1 + motion_weight * moved.float()
    return ((pred - target).square() * w).sum() / (w.sum() * pred.shape[2])


def flow_loss(wm, action, x0, z=None, cond_drop=0.0, generator=None, motion_weight=0.0):
    """Flow-matching loss on the future frames of clean clips x0 (B, T, C, H, W) in [-1, 1].

    The first n_context frames stay clean (t = 0) and carry no loss; the others share one logit-normal
    t per clip. The loss is the squared error of the predicted clean frames, i.e. the velocity error
    weighted by t^2: unweighted, the velocity error is dominated by small t, where the frame is nearly
    given and actions do not matter (measured after pretraining: 3.5 at t = 0.05 against 0.018 at t = 0.95).
    The minimiser is the same, E[x_0 | x_t]. `action` is None for action-free pretraining; otherwise
    z (B, T-1, n_tok, d) conditions the clip and is replaced by the null action with probability cond_drop.
    motion_weight weighs the pixels that move (pixel_loss).
    """
    B, T = x0.shape[:2]
    nc = wm.cfg.n_context
    t = shift_t(torch.sigmoid(torch.randn(B, device=x0.device, generator=generator)), wm.cfg.t_shift)  # logit-normal(0, 1)
    t_frames = torch.cat([t.new_zeros(B, nc), t[:, None].expand(B, T - nc)], dim=1)  # (B, T)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    tt = t_frames[:, :, None, None, None].to(x0.dtype)
    x_t = (1 - tt) * x0 + tt * noise
    mod = None
    if action is not None:
        drop = torch.rand(B, device=x0.device, generator=generator) < cond_drop
        mod = action(z, drop)
    x0_hat = wm(x_t, t_frames, mod)
    return pixel_loss(x0_hat[:, nc:].float(), x0[:, nc:].float(), x0[:, nc - 1:-1].float(), motion_weight)


@torch.no_grad()
def sample(wm, action, ctx, z=None, T=None, n_steps=2, cfg_scale=1.0, generator=None):
    """Generate the future of one window with Euler steps from t = 1 (noise) to t = 0.

    ctx: (B, n_context, C, H, W) clean frames; z: (B, T-1, n_tok, d) latent actions of the window's T
    frames, or None for the null action (then give T; default one full window). `action` None means an
    action-free model (pretraining). With cfg_scale != 1 the conditional and null clean-frame predictions
    come from one batched call and are combined as null + s * (cond - null), which is the same as guiding
    the velocity (same x_t and t). Returns (B, T - n_context, ...).
    """
    B, nc = ctx.shape[:2]
    T = z.shape[1] + 1 if z is not None else (T or wm.cfg.n_frames)
    x = torch.randn((B, T - nc) + ctx.shape[2:], device=ctx.device, generator=generator, dtype=ctx.dtype)
    guided = action is not None and z is not None and cfg_scale != 1.0
    if action is None:
        mod = None
    elif guided:
        mod = torch.cat([action(z), action(None, T=T).expand(B, -1, -1)])
    else:
        mod = action(z, T=T)
    ts = shift_t(torch.linspace(1.0, 0.0, n_steps + 1, device=ctx.device), wm.cfg.t_shift)
    for i in range(n_steps):
        t_frames = torch.cat([ts.new_zeros(B, nc), ts[i].expand(B, T - nc)], dim=1)
        xin = torch.cat([ctx, x], dim=1)
        if guided:  # guidance on the clean-frame prediction equals guidance on the velocity: same x_t, t
            x0_cond, x0_null = wm(xin.repeat(2, 1, 1, 1, 1), t_frames.repeat(2, 1), mod).chunk(2)
            x0_hat = x0_null + cfg_scale * (x0_cond - x0_null)
        else:
            x0_hat = wm(xin, t_frames, mod)
        v = (x - x0_hat[:, nc:]) / ts[i]  # ts[i] >= 1 / n_steps: no division blow-up
        x = x + (ts[i + 1] - ts[i]) * v
    return x


@torch.no_grad()
def rollout(wm, action, ctx, z, total=None, n_steps=2, cfg_scale=1.0, generator=None):
    """Autoregressive sliding-window rollout past one clip.

    ctx: (B, n_context, ...) first frames; z: (B, total - 1, n_tok, d) latent actions for every
    transition of a `total`-frame episode (z[:, k] takes frame k to k+1), or None for the null action
    (then give `total`). Each window re-uses the last n_context frames, generated ones included, as its
    context. Returns all `total` frames, context first, clamped to [-1, 1].
    """
    nc, Tw = wm.cfg.n_context, wm.cfg.n_frames
    frames = list(ctx.unbind(1))
    total = z.shape[1] + 1 if z is not None else total
    while len(frames) < total:
        s = len(frames) - nc  # absolute index of the window's first frame
        T = min(Tw, total - s)
        zw = z[:, s:s + T - 1] if z is not None else None
        new = sample(wm, action, torch.stack(frames[s:s + nc], 1), zw, T, n_steps, cfg_scale, generator)
        frames += list(new.clamp(-1, 1).unbind(1))
    return torch.stack(frames, 1)
