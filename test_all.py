"""The test suite: `python -m pytest -q test_all.py`. Tiny shapes; every test can fail."""
import math

import pytest
import torch

from lam import FSQ, LAM, VQ, LAMConfig, code_stats, random_crop
from model import STBlock, patchify, unpatchify
from world_model import ActionEncoder, VideoDiT, WMConfig, flow_loss, rollout, sample

TINY = dict(res=16, patch=4, width=32, depth=2, n_heads=2)


def tiny_wm(**kw):
    cfg = WMConfig(**TINY, n_frames=5, n_context=2, act_width=32, act_depth=1, **kw)
    return VideoDiT(cfg), ActionEncoder(cfg)


def randomize_zero_inits(*modules):
    """Give every all-zero tensor random values so conditioning paths are live (a trained model)."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if not p.any():
                    p.normal_(0, 0.1)


# ----------------------------------------------------------------------------------------------------
# model.py

def test_patchify_round_trip():
    x = torch.randn(2, 3, 3, 16, 24)
    tok = patchify(x, 4)
    assert tok.shape == (2, 3, 4 * 6, 48)
    assert torch.equal(unpatchify(tok, 4, 16, 24), x)
    assert torch.equal(tok[0, 0, 1], x[0, 0, :, 0:4, 4:8].permute(1, 2, 0).flatten())  # row-major patches
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.randn(1, 1, 3, 10, 10), 4)


@pytest.mark.parametrize("cond", [False, True])
def test_causal_temporal_attention(cond):
    torch.manual_seed(0)
    blk = STBlock(32, 2, cond=cond)
    randomize_zero_inits(blk)
    x = torch.randn(2, 5, 4, 32)
    c = torch.randn(2, 5, 32) if cond else None
    y = blk(x, c)
    x2 = x.clone()
    x2[:, 3] += 1.0  # change frame 3 only
    y2 = blk(x2, c)
    assert torch.allclose(y[:, :3], y2[:, :3], atol=1e-6), "a future frame leaked into the past"
    assert not torch.allclose(y[:, 3:], y2[:, 3:])


def test_dit_zero_init_is_identity():
    wm, _ = tiny_wm()
    x, t = torch.randn(2, 5, 3, 16, 16), torch.rand(2, 5)
    h = torch.randn(2, 5, 16, 32)
    c = wm.t_embed(t)
    for blk in wm.blocks:
        assert torch.equal(blk(h, c), h)
    assert torch.equal(wm(x, t), torch.zeros_like(x))
    # and attaching a fresh action encoder changes nothing: its output layer is zero
    _, act = tiny_wm()
    assert torch.equal(act(torch.randn(2, 4, 2, 32)), torch.zeros(2, 5, 9 * 32))


# ----------------------------------------------------------------------------------------------------
# lam.py

def test_vq_straight_through_reaches_encoder():
    torch.manual_seed(0)
    lam = LAM(LAMConfig(**TINY, n_action_tokens=2, action_dim=8, codebook_size=4))
    out = lam(torch.randn(2, 3, 3, 16, 16))
    assert out['z'].shape == (2, 2, 2, 8) and out['codes'].shape == (2, 2, 2)
    (out['z'].square().sum() + out['codebook_loss'] + out['commit_loss']).backward()
    g = lam.idm.embed.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert lam.quantizer.codebook.grad.abs().sum() > 0
    # the forward value is exactly the chosen codebook entry
    assert torch.allclose(out['z'], lam.quantizer.codebook[out['codes']], atol=1e-6)


def test_quantizer_stats_known_histogram():
    codes = torch.tensor([0] * 6 + [1] * 2 + [2] * 2)  # 3 of 4 entries used, p = (.6, .2, .2, 0)
    s = code_stats(codes, 4)
    H = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))
    assert s['code_util'] == pytest.approx(0.75)
    assert s['code_max'] == pytest.approx(0.6)
    assert s['code_entropy'] == pytest.approx(H / math.log(4))
    assert s['code_perplexity'] == pytest.approx(math.exp(H))
    uniform = code_stats(torch.arange(8).repeat(3), 8)
    assert uniform['code_util'] == 1 and uniform['code_entropy'] == pytest.approx(1.0)


def test_fsq_uses_every_level_combination():
    torch.manual_seed(0)
    fsq = FSQ((4, 3), 16)
    z = torch.randn(20000, 16) * 3
    _, codes, _, _ = fsq(z)
    assert fsq.size == 12 and set(codes.unique().tolist()) == set(range(12))


def test_dead_code_restart_revives_entries():
    torch.manual_seed(0)
    vq = VQ(8, 4, dead_code_restart=True)
    with torch.no_grad():
        vq.codebook[1:] += 100.0  # only entry 0 is ever chosen
    z = torch.randn(64, 4)
    vq(z)
    assert code_stats(vq(z)[1], 8)['code_util'] > 0.5


def test_random_crop_same_for_all_frames():
    x = torch.rand(1, 1, 3, 16, 16).expand(2, 4, 3, 16, 16).contiguous()
    y = random_crop(x, 0.5)
    assert y.shape == x.shape
    assert torch.allclose(y[:, 0], y[:, 3])  # one crop per clip
    assert not torch.allclose(y, x)
    assert torch.allclose(random_crop(x, 1.0), x, atol=1e-5)  # full-size crop is the identity


# ----------------------------------------------------------------------------------------------------
# world_model.py

def test_action_alignment():
    """Action k (transition k -> k+1) conditions frame k+1: changing it changes only frames >= k+1."""
    torch.manual_seed(0)
    wm, act = tiny_wm()
    randomize_zero_inits(wm, act)
    x, t = torch.randn(2, 5, 3, 16, 16), torch.rand(2, 5)
    z = torch.randn(2, 4, 2, 32)
    y = wm(x, t, act(z))
    for k in range(4):
        z2 = z.clone()
        z2[:, k] += 1.0
        y2 = wm(x, t, act(z2))
        assert torch.allclose(y[:, :k + 1], y2[:, :k + 1], atol=1e-5), f"action {k} changed frames <= {k}"
        assert not torch.allclose(y[:, k + 1], y2[:, k + 1]), f"action {k} did not reach frame {k + 1}"


def test_flow_loss_falls_when_overfitting():
    torch.manual_seed(0)
    wm, act = tiny_wm()
    x0 = torch.full((4, 5, 3, 16, 16), -1.0)
    for k in range(5):  # a bright square moving right
        x0[:, k, :, 4:9, 2 + 2 * k:7 + 2 * k] = 1.0
    z = torch.randn(4, 4, 2, 32)
    opt = torch.optim.AdamW(list(wm.parameters()) + list(act.parameters()), lr=3e-3)
    held = lambda: flow_loss(wm, act, x0, z, generator=torch.Generator().manual_seed(123)).item()
    before, gen = held(), torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = flow_loss(wm, act, x0, z, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held() < 0.5 * before


def test_flow_loss_context_clean_and_unscored():
    """Context frames enter clean with t = 0, and the model's output on them carries no loss."""
    wm, _ = tiny_wm()
    randomize_zero_inits(wm)
    seen = {}

    def spoiled(x, t, mod=None):
        seen['x'], seen['t'] = x, t
        v = wm(x, t, mod)
        return torch.cat([v[:, :2] + 100.0, v[:, 2:]], dim=1)
    spoiled.cfg = wm.cfg
    x0 = torch.randn(2, 5, 3, 16, 16)
    a = flow_loss(wm, None, x0, None, generator=torch.Generator().manual_seed(1))
    b = flow_loss(spoiled, None, x0, None, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(seen['x'][:, :2], x0[:, :2]) and (seen['t'][:, :2] == 0).all()
    assert not torch.allclose(seen['x'][:, 2:], x0[:, 2:]) and (seen['t'][:, 2:] > 0).all()


def test_sampler_deterministic_and_rollout_shapes():
    torch.manual_seed(0)
    wm, act = tiny_wm()
    randomize_zero_inits(wm, act)
    ctx, z = torch.randn(2, 2, 3, 16, 16), torch.randn(2, 4, 2, 32)
    a = sample(wm, act, ctx, z, n_steps=3, generator=torch.Generator().manual_seed(7))
    b = sample(wm, act, ctx, z, n_steps=3, generator=torch.Generator().manual_seed(7))
    c = sample(wm, act, ctx, z, n_steps=3, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 3, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    guided = sample(wm, act, ctx, z, n_steps=3, cfg_scale=1.0, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(a, guided)  # the guidance scale matters
    frames = rollout(wm, act, ctx, torch.randn(2, 10, 2, 32), n_steps=2, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (2, 11, 3, 16, 16) and torch.equal(frames[:, :2], ctx)
