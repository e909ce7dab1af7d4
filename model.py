"""
Shared transformer parts for the IDM (lam.py) and the video DiT (world_model.py).

Everything here works on video tokens shaped (B, T, N, D): B clips, T frames, N patches per frame,
D channels. Space-time (ST) blocks factorise attention into spatial attention within each frame and
causal temporal attention across frames at each patch position, so frame t never sees frames > t.
This module imports no sibling.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# ----------------------------------------------------------------------------------------------------
# patches

def patchify(x, p):
    """(B, T, C, H, W) frames -> (B, T, N, p*p*C) tokens, N = (H/p)*(W/p), row-major patches."""
    H, W = x.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"frame size {H}x{W} is not divisible by patch size {p}")
    return rearrange(x, 'b t c (h p1) (w p2) -> b t (h w) (p1 p2 c)', p1=p, p2=p)


def unpatchify(tokens, p, H, W):
    """(B, T, N, p*p*C) tokens -> (B, T, C, H, W) frames; the inverse of patchify."""
    return rearrange(tokens, 'b t (h w) (p1 p2 c) -> b t c (h p1) (w p2)', h=H // p, w=W // p, p1=p, p2=p)


def sincos_2d(n_side, dim):
    """Fixed 2-D sine-cosine position embedding, (n_side*n_side, dim), as in MAE/DiT."""
    assert dim % 4 == 0, "width must be divisible by 4 for the 2-D sincos embedding"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(n_side, dtype=torch.float64),
                            torch.arange(n_side, dtype=torch.float64), indexing='ij')
    out = []
    for pos in (ys.flatten(), xs.flatten()):
        ang = pos[:, None] * omega[None]
        out += [ang.sin(), ang.cos()]
    return torch.cat(out, dim=1).float()


def rope_2d(n_side, head_dim, base=100.0):
    """2-D rotary position tables (cos, sin), each (n_side*n_side, head_dim/2), for row-major patches: the
    first half of a head's channel pairs turn with the patch's row, the second half with its column."""
    assert head_dim % 4 == 0, "head width must be divisible by 4 for 2-D rotary embeddings"
    freqs = base ** (-torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))
    ys, xs = torch.meshgrid(torch.arange(n_side, dtype=torch.float64), torch.arange(n_side, dtype=torch.float64),
                            indexing='ij')
    ang = torch.cat([ys.flatten()[:, None] * freqs, xs.flatten()[:, None] * freqs], 1)
    return ang.cos().float(), ang.sin().float()


def rotate(x, cos, sin):
    """Apply rotary tables (L, d/2) to x (..., L, d): each channel pair (2i, 2i+1) turns by its angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


# ----------------------------------------------------------------------------------------------------
# layers

class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash kernel on GPU).

    `causal=True` uses SDPA's own is_causal flag rather than a dense mask: a dense bool mask falls off
    the flash kernel on H100 (5.7 ms vs 3.4 ms at 4k tokens).
    """

    def __init__(self, dim, n_heads, rope_side=0):
        super().__init__()
        assert dim % n_heads == 0, f"width {dim} not divisible by n_heads {n_heads}"
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope_side > 0
        if self.rope:
            cos, sin = rope_2d(rope_side, dim // n_heads)
            self.register_buffer('cos', cos, persistent=False)
            self.register_buffer('sin', sin, persistent=False)

    def forward(self, x, causal=False):  # x: (B, L, D)
        q, k, v = rearrange(self.qkv(x), 'b l (three h d) -> three b h l d', three=3, h=self.n_heads)
        if self.rope:
            q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(rearrange(y, 'b h l d -> b l (h d)'))


class MLP(nn.Sequential):
    """Two-layer GELU MLP."""

    def __init__(self, dim, hidden):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate='tanh'), nn.Linear(hidden, dim))


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with per-frame (B, T, 1, D) shift/scale broadcast over patches."""
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Plain pre-norm transformer block over one token sequence (B, L, D); optionally causal."""

    def __init__(self, dim, n_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, causal=False):
        x = x + self.attn(self.norm1(x), causal=causal)
        return x + self.mlp(self.norm2(x))


class STBlock(nn.Module):
    """Spatial attention within each frame, causal temporal attention across frames, then an MLP: the DiT's block.

    Every sub-layer is wrapped in adaLN-Zero: a per-frame conditioning vector c (B, T, D) is projected to
    (shift, scale, gate) x 3 sub-layers = (B, T, 9*D); the projection starts at zero, so a fresh block is the
    identity. `mod_add` (B, T, 9*D) is added to that modulation: this is where the latent actions enter the
    world model. The spatial attention sees relative positions only (2-D rotary embeddings on an
    n_side x n_side grid of patches).
    """
    N_MOD = 9  # modulation vectors per block: (shift, scale, gate) for the spatial, temporal and MLP sub-layers

    def __init__(self, dim, n_heads, n_side, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.spatial = Attention(dim, n_heads, rope_side=n_side)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.temporal = Attention(dim, n_heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.N_MOD * dim))
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)

    def forward(self, x, c, mod_add=None):
        """x: (B, T, N, D); c: (B, T, D); mod_add: (B, T, 9*D) or None."""
        B, T, N, D = x.shape
        mod = self.adaLN(c) if mod_add is None else self.adaLN(c) + mod_add
        (shift_sp, scale_sp, gate_sp, shift_tm, scale_tm, gate_tm,
         shift_mlp, scale_mlp, gate_mlp) = mod[:, :, None].chunk(self.N_MOD, dim=-1)  # each (B, T, 1, D)
        # spatial: frames are independent sequences of N patches
        h = modulate(self.norm1(x), shift_sp, scale_sp).reshape(B * T, N, D)
        x = x + gate_sp * self.spatial(h).reshape(B, T, N, D)
        # temporal: each patch position is a sequence of T frames, causal so the past never sees the future
        h = rearrange(modulate(self.norm2(x), shift_tm, scale_tm), 'b t n d -> (b n) t d')
        x = x + gate_tm * rearrange(self.temporal(h, causal=True), '(b n) t d -> b t n d', b=B)
        return x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class TimestepEmbedder(nn.Module):
    """Scalar flow time t in [0, 1] -> D-dim vector: sinusoidal features then an MLP (as in DiT)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t: any shape, values in [0, 1] -> (*t.shape, D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        ang = (t.float() * 1000)[..., None] * freqs  # scale to DiT's integer-timestep range
        return self.mlp(torch.cat([ang.cos(), ang.sin()], dim=-1))


class AttentionPool(nn.Module):
    """Learned-query attention pooling: n_queries learned vectors attend over a token set.

    (B, L, D) -> (B, n_queries, D). The IDM uses it to summarise a pair of adjacent frames into the
    latent action's tokens.
    """

    def __init__(self, dim, n_heads, n_queries):
        super().__init__()
        self.n_heads = n_heads
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.norm(x)
        q = rearrange(self.q(self.queries), 'q (h d) -> 1 h q d', h=self.n_heads).expand(x.shape[0], -1, -1, -1)
        k, v = rearrange(self.kv(x), 'b l (two h d) -> two b h l d', two=2, h=self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(y, 'b h q d -> b q (h d)'))
