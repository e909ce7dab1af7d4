"""
The latent action model (LAM): inverse dynamics model (IDM), quantizers, and the two-stage baseline's
decoder (forward dynamics model, FDM).

The IDM looks at a clip of T frames and emits T-1 latent actions, one per transition (o_t, o_t+1).
In CoLA-World the IDM is trained through the world model's flow loss; in the two-stage baseline it is
trained with the small pixel decoder here first and then frozen. Imports only model.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from model import AttentionPool, Block, patchify, sincos_2d, unpatchify


@dataclass
class LAMConfig:
    """The latent action model's settings; the defaults are the CPU preset's, the run `python train.py` trains."""
    res: int = 32                # frame side in pixels
    patch: int = 4
    channels: int = 3
    max_frames: int = 4          # longest clip the IDM takes at once: the world model's n_frames
    width: int = 64
    idm_depth: int = 2           # spatial blocks of the IDM's per-frame encoder
    idm_keypoints: int = 16      # keypoints whose displacements the IDM reads the latent action from (0: none)
    n_heads: int = 4
    n_action_tokens: int = 2     # tokens per latent action
    action_dim: int = 32         # channels per token
    quantizer: str = 'vq'        # 'vq' | 'fsq' | 'none' (continuous: the ceiling of the other two)
    codebook_size: int = 32      # VQ entries (shared by all tokens: 2 tokens -> 32^2 combinations)
    fsq_levels: tuple = (8, 4)   # FSQ levels per dimension; codebook size = prod(levels)
    dec_depth: int = 0           # > 0 builds the two-stage baseline decoder with this many blocks
    dec_patch: int = 0           # the decoder's patch (0: the IDM's); finer, it renders a small agent's move

    def __post_init__(self):
        self.dec_patch = self.dec_patch or self.patch


# ----------------------------------------------------------------------------------------------------
# quantizers: each maps z_e (..., d) -> (z_q, codes, restarts) and has no loss of its own; restarts is the number
# of codebook entries this call re-initialised (VQ in training; 0 otherwise), relax(z_e) gives the continuous value
# it would quantize (the soft-to-hard start of LAM.forward), and `size` is its number of codes

class VQ(nn.Module):
    """Vector quantizer trained by noise substitution (NSVQ, Vali & Bäckström 2022), as LAPA trains its LAM.

    In training the quantized vector is z_e + ||z_e - e|| * v / ||v||, v ~ N(0, I): a point as far from z_e as
    its nearest entry e, in a random direction, so the world model's gradient reaches z_e whole and e through
    the distance, and no codebook or commitment loss is needed. In evaluation it is e itself. Entries that no
    output of a training batch picked move onto random outputs of the batch (restart_dead), or most of the
    codebook dies through the world model. Straight-through VQ against NSVQ: NOTES.md.
    """

    def __init__(self, size, dim):
        super().__init__()
        self.size = size
        # small uniform init (as in VQ-VAE): entries start near the origin, so the nearest entry to an
        # encoder output is decided by its direction and every entry is reachable from step 0
        self.codebook = nn.Parameter(torch.empty(size, dim).uniform_(-1 / size, 1 / size))

    def forward(self, z):
        flat = z.reshape(-1, z.shape[-1]).float()  # (M, d)
        codes = torch.cdist(flat, self.codebook.float()).argmin(dim=1)  # (M,)
        restarts = self.restart_dead(flat.detach(), codes) if self.training else 0
        e = self.codebook[codes].float()  # (M, d)
        if self.training:
            v = torch.randn_like(flat)
            z_q = flat + (flat - e).norm(dim=1, keepdim=True) * v / v.norm(dim=1, keepdim=True)
        else:
            z_q = e
        return z_q.view_as(z).to(z.dtype), codes.view(z.shape[:-1]), restarts

    @torch.no_grad()
    def restart_dead(self, flat, codes):
        """Move entries unused in this batch onto random encoder outputs of the batch; returns how many. Under
        DDP an entry is dead when no rank used it, rank 0 picks the outputs and sends the codebook to the
        others, so that the ranks' weights stay identical."""
        counts = torch.bincount(codes, minlength=self.size)
        ddp = dist.is_available() and dist.is_initialized()
        if ddp:
            dist.all_reduce(counts)
        dead = counts == 0
        n = int(dead.sum())
        if n:
            pick = torch.randint(len(flat), (n,), device=flat.device)
            self.codebook.data[dead] = flat[pick].to(self.codebook.dtype)
            if ddp:
                dist.broadcast(self.codebook.data, 0)
        return n

    def relax(self, z):
        return z


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): project to len(levels) dims, bound each with
    tanh, round to its grid (straight-through), project back. No codebook, no loss; codes are mixed-radix."""

    def __init__(self, levels, dim):
        super().__init__()
        self.register_buffer('levels', torch.tensor(levels), persistent=False)
        self.register_buffer('radix', torch.cumprod(torch.tensor([1] + list(levels[:-1])), 0), persistent=False)
        self.size = math.prod(levels)
        self.down = nn.Linear(dim, len(levels))
        self.up = nn.Linear(len(levels), dim)

    def bound(self, z):
        """z (..., dim) -> (..., len(levels)) in the grid's range: tanh-bounded, half-step offset for even L."""
        L = self.levels.float()
        half = (L - 1) * (1 + 1e-3) / 2
        # even level counts need a half-step offset so the rounded grid has exactly L values
        offset = (self.levels % 2 == 0).float() * 0.5
        return torch.tanh(self.down(z) + torch.atanh(offset / half)) * half - offset

    def forward(self, z):
        bounded = self.bound(z)
        r = bounded + (bounded.round() - bounded).detach()  # integers in [-L//2, (L-1)//2], straight-through
        codes = ((r.detach() + (self.levels // 2)).long() * self.radix).sum(-1)
        return self.up(r / (self.levels // 2)), codes, 0

    def relax(self, z):
        return self.up(self.bound(z) / (self.levels // 2))


class NoQuant(nn.Module):
    """Continuous latent actions (no bottleneck): the ablation the paper did not run."""
    size = 0

    def forward(self, z):
        return z, None, 0

    def relax(self, z):
        return z


def code_stats(codes, size):
    """Codebook health from a tensor of code indices (any shape), named as in log.jsonl and eval.py:
    util = fraction of entries used, max = largest single-entry frequency, entropy = H / log(size),
    perplexity = exp(H)."""
    counts = torch.bincount(codes.flatten().cpu(), minlength=size).double()
    p = counts / counts.sum().clamp(min=1)
    H = -(p[p > 0] * p[p > 0].log()).sum().item()
    return dict(code_util=(counts > 0).double().mean().item(), code_max=p.max().item(),
                code_entropy=max(0.0, H) / math.log(size), code_perplexity=math.exp(H))


def codebook_vectors(q):
    """Every code of a quantizer as the latent vector the world model receives, (size, d); None without a
    codebook (continuous latent actions)."""
    if isinstance(q, VQ):
        return q.codebook.detach()
    if isinstance(q, FSQ):  # code c has mixed-radix digits (c // radix) % levels, centred as in FSQ.forward
        digits = torch.arange(q.size, device=q.levels.device)[:, None] // q.radix % q.levels
        with torch.inference_mode():
            return q.up((digits - q.levels // 2) / (q.levels // 2))
    return None


# ----------------------------------------------------------------------------------------------------
# the IDM, the baseline decoder, and the LAM that holds them

class IDM(nn.Module):
    """Inverse dynamics: clip (B, T, C, H, W) -> continuous latent actions z_e (B, T-1, n_tok, action_dim).

    A spatial transformer encodes every frame on its own (patches plus absolute 2-D positions); two heads read
    each transition (t, t+1) from these features and their outputs add up:
    - keypoints (cfg.idm_keypoints = K): K heat maps per frame, each turned by a softmax over the patches into
      an expected position; a linear map of the keypoints' displacements from t to t+1. A displacement is
      linear in the move, so even an untrained IDM carries part of the action: the start the warm-up needs;
    - learned queries attending over the feature difference h(t+1) - h(t), where what stands still cancels
      (its output layer starts at zero when keypoints lead).
    Action t depends on frames t and t+1 only. Each head's effect on the probe: NOTES.md.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.embed = nn.Linear(cfg.patch ** 2 * cfg.channels, D)
        self.register_buffer('pos_space', sincos_2d(cfg.res // cfg.patch, D), persistent=False)
        self.blocks = nn.ModuleList(Block(D, cfg.n_heads) for _ in range(cfg.idm_depth))
        self.norm = nn.LayerNorm(D)
        self.pool = AttentionPool(D, cfg.n_heads, cfg.n_action_tokens)
        self.head = nn.Linear(D, cfg.action_dim)
        if cfg.idm_keypoints:
            n = cfg.res // cfg.patch
            g = (torch.arange(n) + 0.5) / n * 2 - 1  # patch centres in [-1, 1]
            self.register_buffer('grid', torch.stack(torch.meshgrid(g, g, indexing='xy')).flatten(1).T, persistent=False)
            self.keypoints = nn.Linear(D, cfg.idm_keypoints)
            self.sharpness = nn.Parameter(torch.tensor(10.0))  # softmax temperature: a random map is not flat
            self.kp_head = nn.Linear(2 * cfg.idm_keypoints, cfg.n_action_tokens * cfg.action_dim)
            for p in self.head.parameters():  # the difference pooling starts silent, so the keypoints lead
                nn.init.zeros_(p)

    def forward(self, x):
        B, T = x.shape[:2]
        if T < 2 or T > self.cfg.max_frames:
            raise ValueError(f"IDM takes clips of 2..{self.cfg.max_frames} frames, got shape {tuple(x.shape)}")
        h = self.embed(patchify(x, self.cfg.patch)).flatten(0, 1) + self.pos_space  # (B*T, N, D)
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h).view(B, T, *h.shape[1:])
        z = self.pool((h[:, 1:] - h[:, :-1]).flatten(0, 1))  # (B*(T-1), n_tok, D)
        z = self.head(z).view(B, T - 1, self.cfg.n_action_tokens, self.cfg.action_dim)
        if self.cfg.idm_keypoints:
            heat = (self.keypoints(h) * self.sharpness).softmax(2)  # (B, T, N, K)
            kp = torch.einsum('btnk,nc->btkc', heat, self.grid).flatten(2)  # (B, T, 2K)
            z = z + self.kp_head(kp[:, 1:] - kp[:, :-1]).view_as(z)
        return z


class Decoder(nn.Module):
    """Two-stage baseline forward dynamics model: a spatial transformer over frame t's patches plus the
    action tokens, predicting frame t+1's pixels (as a residual on frame t; zero-initialised head)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.embed = nn.Linear(cfg.dec_patch ** 2 * cfg.channels, D)
        self.act_embed = nn.Linear(cfg.action_dim, D)
        self.register_buffer('pos_space', sincos_2d(cfg.res // cfg.dec_patch, D), persistent=False)
        self.blocks = nn.ModuleList(Block(D, cfg.n_heads) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.dec_patch ** 2 * cfg.channels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, frames, z):
        """frames: (B, T-1, C, H, W) current frames; z: (B, T-1, n_tok, d) -> predicted next frames."""
        B, T1, C, H, W = frames.shape
        N = (H // self.cfg.dec_patch) ** 2
        cur = patchify(frames, self.cfg.dec_patch).flatten(0, 1)  # (B*(T-1), N, p*p*C)
        h = torch.cat([self.embed(cur) + self.pos_space, self.act_embed(z.flatten(0, 1))], dim=1)
        for blk in self.blocks:
            h = blk(h)
        delta = self.head(self.norm(h[:, :N]))
        return unpatchify((cur + delta).view(B, T1, N, -1), self.cfg.dec_patch, H, W)


class LAM(nn.Module):
    """IDM + quantizer (+ the baseline decoder when cfg.dec_depth > 0); saved as `lam` in checkpoints."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.idm = IDM(cfg)
        if cfg.quantizer == 'vq':
            self.quantizer = VQ(cfg.codebook_size, cfg.action_dim)
        elif cfg.quantizer == 'fsq':
            self.quantizer = FSQ(tuple(cfg.fsq_levels), cfg.action_dim)
        elif cfg.quantizer == 'none':
            self.quantizer = NoQuant()
        else:
            raise ValueError(f"--quantizer must be vq, fsq or none, got {cfg.quantizer!r}")
        self.decoder = Decoder(cfg) if cfg.dec_depth > 0 else None

    def forward(self, frames, p_relax=0.0):
        """frames: (B, T, C, H, W) in [-1, 1] -> dict(z (B, T-1, n_tok, d), codes (B, T-1, n_tok) or None,
        restarts: codebook entries re-initialised by this call).

        p_relax > 0 (training only) passes each transition's continuous value (quantizer.relax) in place of its
        quantized one with that probability: soft-to-hard quantization (Agustsson et al. 2017), so that a random
        IDM, whose codes say nothing yet, still gets a gradient. train.py lowers it 1 -> 0 over the first
        `relax_anneal` of the LAM's steps (NOTES.md). Codes are always those of the quantized path."""
        z_e = self.idm(frames)
        z, codes, restarts = self.quantizer(z_e)
        if self.training and p_relax > 0:
            relax = torch.rand(z_e.shape[:2], device=z_e.device) < p_relax  # (B, T-1): per transition
            z = torch.where(relax[..., None, None], self.quantizer.relax(z_e), z)
        return dict(z=z, codes=codes, restarts=restarts)
