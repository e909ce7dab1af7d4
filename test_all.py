"""The test suite: `python -m pytest -q test_all.py`. Tiny shapes; every test can fail."""
import ast
import base64
import errno
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cola
import data
import measure
import plan
import pusht
import state_probe
from lam import FSQ, LAM, VQ, LAMConfig, code_stats
from model import STBlock, patchify, rope_2d, rotate, unpatchify
from sim import SENSOR_NOISE, PushSim, generate_episode
from world_model import MOTION_THRESHOLD, PRESETS, ActionEncoder, VideoDiT, WMConfig, flow_loss, pixel_loss, rollout, sample


# ----------------------------------------------------------------------------------------------------
# helpers: tiny shapes, the programs run as users run them, what must run in a process of its own, fixtures

HERE = os.path.dirname(os.path.abspath(__file__))
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


HAVE_PUSHT = importlib.util.find_spec('gym_pusht') is not None
needs_pusht = pytest.mark.skipif(not HAVE_PUSHT, reason='gym-pusht is absent (pip install -r requirements-pusht.txt)')


def moving_square(B, T, res=16):
    """Clips (B, T, 3, res, res) in [-1, 1]: a still random scene in which a 4 x 4 white square moves 2 px a frame."""
    x = torch.rand(B, 1, 3, res, res).repeat(1, T, 1, 1, 1) * 2 - 1
    for k in range(T):
        x[:, k, :, 4:8, 2 + 2 * k:6 + 2 * k] = 1.0
    return x


def _write_npz(d, name, T, res=16, seed=0):
    ep = generate_episode(seed, T, res)
    np.savez(os.path.join(d, name), frames=ep['frames'], actions=ep['actions'], states=ep['states'])
    return ep


class FullDisk:
    """A file whose writes fail after the first `room` bytes, with ENOSPC, as on a full disk."""
    def __init__(self, path, mode, room):
        self.f, self.room, self.name = open(path, mode), room, path

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        return self.f.write(b)

    def close(self):
        self.f.close()


def _psnr(a, b):
    return 10 * np.log10(255 ** 2 / max(np.mean((a.astype(float) - b) ** 2), 1e-10))


TINY_TRAIN = ['--res=16', '--patch=4', '--width=32', '--depth=1', '--n_heads=2', '--act_width=32', '--act_depth=1',
              '--n_frames=4', '--action_dim=8', '--quantizer=vq', '--codebook_size=8', '--batch_size=2', '--lr_ramp=1',
              '--log_interval=1', '--eval_clips=2', '--eval_len=6', '--euler_steps=2']
FAST = ['--horizon=6', '--n_clips=2', '--euler_steps=2', '--state_probe_steps=30']  # 2 context + 6 generated frames


def run(program, *flags, torchrun=0):
    """Run one of the programs as users do (under torchrun with that many processes); CompletedProcess."""
    # --standalone: torchrun picks a free port, so back-to-back runs never collide on the default one
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}']
    launcher = launcher if torchrun else [sys.executable]
    return subprocess.run(launcher + [os.path.join(HERE, program), *flags], capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


def train(out, *flags, data_dir=None, check=True, torchrun=0):
    """train.py with tiny settings; asserts success unless check=False."""
    r = run('train.py', f'--out_dir={out}', *TINY_TRAIN, *flags, *([f'--data={data_dir}'] if data_dir else []),
            torchrun=torchrun)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def ckpt(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def log_of(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


def in_subprocess(helper, *args, **kw):
    """Popen of `python -c` calling test_all.helper(*args) in this folder: what must run in a process of its own."""
    return subprocess.Popen([sys.executable, '-c', f'import sys, test_all; test_all.{helper}(*sys.argv[1:])', *map(str, args)],
                            cwd=HERE, **kw)


def prepare_when_told(folder, ready, go):
    """In a subprocess: say `ready`, wait for `go` so that every process starts at the same moment, prepare `folder`
    (data.prepare_once lets one of them do it) and print its episode count and a digest of its frames."""
    import hashlib
    open(ready, 'w').close()
    while not os.path.exists(go):
        time.sleep(0.001)
    sampler = data.ClipSampler(data.resolve_data(folder, 16, clip_len=4), 4, 'train')
    digest = hashlib.sha256()
    for i in range(len(sampler.index)):
        digest.update(sampler.get_episode(i)['frames'].tobytes())
    print(len(sampler.index), digest.hexdigest())


def prepare_slowly(folder, marker):
    """In a subprocess: prepare `folder` slowly enough to be killed in the middle, touching `marker` as it goes."""
    load = data.load_episode

    def slow(path, res):
        open(marker, 'w').close()
        time.sleep(0.1)
        return load(path, res)
    data.load_episode = slow
    data.resolve_data(folder, 16)


def train_on_a_full_disk(*flags):
    """In a subprocess: train.py with torch.save failing from its second call on, as on a disk with room for one
    checkpoint (torch.save raises RuntimeError('unexpected pos') with the OSError in its context)."""
    import runpy
    save, calls = torch.save, []

    def full_disk(obj, f, *args, **kw):
        calls.append(1)
        if len(calls) == 1:
            return save(obj, f, *args, **kw)
        f.write(b'x' * 4096)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 4000512 vs 4000400')
    torch.save = full_disk
    sys.argv = ['train.py', *flags]
    runpy.run_path(os.path.join(HERE, 'train.py'), run_name='__main__')


def save_often(path):
    """In a subprocess: save one tensor to `path` 150 times through data.atomic_save."""
    for _ in range(150):
        data.atomic_save(path, lambda f: torch.save({'w': torch.ones(200, 200)}, f))


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return data.prepare_from_sim(str(tmp_path_factory.mktemp('d') / 'p'), episodes=6, T=12, res=16)


@pytest.fixture(scope='module')
def pretrained(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('pre'))
    train(out, '--mode=pretrain', '--pretrain_steps=3', data_dir=tiny_data)
    return out


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    """A tiny CoLA checkpoint (pretrain -> warm-up -> joint, a few steps) trained on 8 simulator episodes."""
    d = data.prepare_from_sim(str(tmp_path_factory.mktemp('d') / 'p'), episodes=8, T=12, res=16)
    out = str(tmp_path_factory.mktemp('ck'))
    train(out, '--pretrain_steps=3', '--warmup_steps=3', '--joint_steps=2', '--eval_clips=0', data_dir=d)
    return os.path.join(out, 'ckpt.pt')


@pytest.fixture(scope='module')
def builtin_root(tmp_path_factory):
    """A root for $COLA_DATA holding the built-in dataset (1000 episodes, 32 px) simulated afresh, as on a new clone."""
    root = str(tmp_path_factory.mktemp('builtin'))
    data.default_dataset(32, root=root)
    return root


@pytest.fixture(scope='module')
def lerobot_sets(tmp_path_factory):
    """The same 9 simulator episodes (10-12 frames, 32 px) as a v3.0 dataset (AV1 if PyAV has an encoder; 2
    episodes per video file, 8 per data file) and as a v2.1 one (H.264, a file per episode)."""
    pytest.importorskip('av')
    pytest.importorskip('pyarrow')
    import lerobot
    eps = [generate_episode(data.episode_seed(7, i), 10 + i % 3, 32) for i in range(9)]
    root = tmp_path_factory.mktemp('lerobot')
    v30, v21 = str(root / 'v30'), str(root / 'v21')
    codec = lerobot.write_dataset(v30, iter(eps), episodes_per_file=2)
    lerobot.write_dataset(v21, iter(eps), version='v2.1', codec='libx264')
    return eps, v30, v21, codec


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


def test_causal_temporal_attention():
    torch.manual_seed(0)
    blk = STBlock(32, 2, n_side=2)
    randomize_zero_inits(blk)
    x = torch.randn(2, 5, 4, 32)  # 5 frames of 2 x 2 patches
    c = torch.randn(2, 5, 32)
    y = blk(x, c)
    x2 = x.clone()
    x2[:, 3] += 1.0  # change frame 3 only
    y2 = blk(x2, c)
    assert torch.allclose(y[:, :3], y2[:, :3], atol=1e-6), "a future frame leaked into the past"
    assert not torch.allclose(y[:, 3:], y2[:, 3:])


def test_rotary_turns_each_pair_and_attention_sees_offsets_only():
    torch.manual_seed(0)
    cos, sin = rope_2d(4, 8)  # a 4 x 4 grid of patches, heads of width 8
    x = torch.randn(16, 8)
    # each channel pair (2i, 2i+1), read as the complex number x_2i + j x_2i+1, turns by its angle
    ang = torch.atan2(sin, cos).double()  # (patches, pairs)
    turned = torch.view_as_complex(x.double().view(16, 4, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)
    ref = torch.view_as_real(turned)
    assert torch.allclose(rotate(x, cos, sin).double(), ref.flatten(-2), atol=1e-6)
    # one query and one key at every patch: their score depends on the offset between the patches alone
    q, k = rotate(torch.randn(8).expand(16, 8), cos, sin), rotate(torch.randn(8).expand(16, 8), cos, sin)
    score = lambda a, b: (q[a[0] * 4 + a[1]] * k[b[0] * 4 + b[1]]).sum()
    assert torch.allclose(score((0, 0), (1, 2)), score((2, 1), (3, 3)), atol=1e-5)
    assert not torch.allclose(score((0, 0), (1, 2)), score((0, 0), (2, 1)), atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# lam.py

def test_vq_noise_substitution_reaches_encoder_and_codebook():
    """In training VQ passes z_e plus noise as large as the quantization error (NSVQ): the gradient reaches the
    IDM and the codebook without a codebook loss; in evaluation it passes the nearest entry itself."""
    torch.manual_seed(0)
    lam = LAM(LAMConfig(res=16, patch=4, width=32, idm_depth=2, n_heads=2, n_action_tokens=2, action_dim=8, quantizer='vq', codebook_size=4))
    x = torch.randn(2, 3, 3, 16, 16)
    out = lam(x)
    assert out['z'].shape == (2, 2, 2, 8) and out['codes'].shape == (2, 2, 2) and out['restarts'] >= 0
    out['z'].square().sum().backward()
    g = lam.idm.embed.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert lam.quantizer.codebook.grad.abs().sum() > 0
    vq = lam.quantizer
    z_e = torch.randn(64, 8)
    z, codes, _ = vq(z_e)
    e = vq.codebook[codes].detach()  # after this batch's restarts, the entries the forward used
    assert torch.allclose((z - z_e).norm(dim=1), (e - z_e).norm(dim=1), atol=1e-5)  # the error's size, ...
    assert not torch.allclose(z, e, atol=1e-3)  # ... in a random direction
    z, codes, _ = vq.eval()(z_e)
    assert torch.equal(z, vq.codebook[codes]) and torch.equal(codes, torch.cdist(z_e, vq.codebook).argmin(1))


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
    fsq = FSQ((4, 3, 2), 16)  # even, odd and the smallest level count
    z = torch.randn(20000, 16) * 3
    z_q, codes, _ = fsq(z)
    assert fsq.size == 24 and set(codes.unique().tolist()) == set(range(24)) and torch.isfinite(z_q).all()


def test_fresh_idm_already_reads_the_move_from_keypoints():
    """An untrained IDM's latent must carry some of the move, or nothing tells the warm-up where to start: a
    square moves by a random step over a fixed textured background; a ridge probe from the fresh IDM's output
    to the step reaches R² > 0.4 on every seed (difference pooling alone: about 0.2)."""
    g = torch.Generator().manual_seed(0)
    n, res = 1200, 16
    x = (torch.rand(n, 1, 3, res, res, generator=g) * 0.2 - 0.6).repeat(1, 2, 1, 1, 1)  # (n, 2 frames, 3, H, W)
    pos, move = torch.randint(3, res - 7, (n, 2), generator=g), torch.randint(-2, 3, (n, 2), generator=g)
    for i, ((cx, cy), (dx, dy)) in enumerate(zip(pos.tolist(), move.tolist())):
        x[i, 0, :, cy:cy + 4, cx:cx + 4] = 0.8
        x[i, 1, :, cy + dy:cy + dy + 4, cx + dx:cx + dx + 4] = 0.8
    for seed in range(3):
        r2 = {}
        for k in (16, 0):
            torch.manual_seed(seed)
            cfg = LAMConfig(res=res, patch=4, width=32, idm_depth=1, n_heads=2, action_dim=8, quantizer='none',
                            max_frames=2, idm_keypoints=k)
            with torch.no_grad():
                z = LAM(cfg).eval().idm(x)[:, 0]
            r2[k] = measure.ridge_probe(z[:800], move[:800].float(), z[800:], move[800:].float())['r2']
        assert r2[16] > 0.4 and r2[16] > r2[0] + 0.2, (seed, r2)


def test_dead_code_restart_revives_entries():
    torch.manual_seed(0)
    vq = VQ(8, 4)
    with torch.no_grad():
        vq.codebook[1:] += 100.0  # only entry 0 is ever chosen
    z = torch.randn(64, 4)
    assert vq.eval()(z)[2] == 0  # restarts happen in training only
    assert vq.train()(z)[2] == 7 and code_stats(vq(z)[1], 8)['code_util'] > 0.5  # the 7 dead entries, counted


def test_soft_to_hard_passes_the_continuous_latent_with_probability_p_relax():
    torch.manual_seed(0)
    lam = LAM(LAMConfig(res=16, patch=4, width=32, idm_depth=1, n_heads=2, action_dim=8, max_frames=6, quantizer='fsq'))
    x = torch.randn(8, 6, 3, 16, 16)
    with torch.no_grad():
        z_e = lam.idm(x)
        hard, soft = lam.quantizer(z_e)[0], lam.quantizer.relax(z_e)
        assert not torch.allclose(hard, soft)
        assert torch.allclose(lam(x, p_relax=0.0)['z'], hard) and torch.allclose(lam(x, p_relax=1.0)['z'], soft)
        half = lam(x, p_relax=0.5)['z']
        is_soft, is_hard = (torch.isclose(half, ref, atol=1e-6).flatten(2).all(-1) for ref in (soft, hard))  # (B, T-1)
        assert (is_soft | is_hard).all() and 0.2 < is_soft.float().mean() < 0.8  # per transition
        assert torch.allclose(lam.eval()(x, p_relax=1.0)['z'], hard)  # evaluation is always quantized


# ----------------------------------------------------------------------------------------------------
# world_model.py

def test_dit_zero_init_is_identity():
    """adaLN-Zero: every fresh block is the identity, and a fresh DiT predicts "nothing moves": the clean
    frame is the latest context frame, with or without a fresh action encoder."""
    wm, _ = tiny_wm()
    x, t = torch.randn(2, 5, 3, 16, 16), torch.rand(2, 5) * 0.9 + 0.1
    h = torch.randn(2, 5, 16, 32)
    c = wm.t_embed(t)
    for blk in wm.blocks:
        assert torch.equal(blk(h, c), h)
    ref = x[:, [0, 1, 1, 1, 1]]
    assert torch.equal(wm(x, t), ref)
    # a fresh action encoder is small but live: the DiT still copies, and the latent actions get a gradient
    _, act = tiny_wm()
    z = torch.randn(2, 4, 2, 32, requires_grad=True)
    mod = act(z)
    assert mod.abs().max() < 1 and torch.equal(wm(x, t, mod), ref)
    mod.square().sum().backward()
    assert z.grad.abs().sum() > 0


def test_dit_is_causal_in_time():
    torch.manual_seed(0)
    wm, _ = tiny_wm()
    randomize_zero_inits(wm)
    x, t = torch.randn(2, 5, 3, 16, 16), torch.rand(2, 5)
    x2 = x.clone()
    x2[:, 3] += 1.0
    y, y2 = wm(x, t), wm(x2, t)
    assert torch.allclose(y[:, :3], y2[:, :3], atol=1e-5) and not torch.allclose(y[:, 3], y2[:, 3])


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_pixel_loss_weighs_the_pixels_that_moved():
    """motion_weight m: a pixel that changed since the frame before counts 1 + m times; m = 0 is plain MSE."""
    prev = torch.zeros(1, 1, 3, 4, 4)
    target = prev.clone()
    target[..., 0, 0] = 1.0  # one pixel moved, in every channel
    pred = target.clone()
    pred[..., 0, 0] += 0.5  # an error on the moved pixel ...
    pred[..., 3, 3] += 0.5  # ... and the same error on a still one
    assert torch.equal(pixel_loss(pred, target, prev), F.mse_loss(pred, target))
    m = 9.0  # weights: 10 on the moved pixel, 1 on the 15 others, per channel
    assert pixel_loss(pred, target, prev, m).item() == pytest.approx((10 * 0.25 + 0.25) / (10 + 15))
    target[..., 0, 0] = MOTION_THRESHOLD / 2  # a change under the threshold is sensor noise: not "moved"
    assert pixel_loss(pred, target, prev, m).item() == pytest.approx(F.mse_loss(pred, target).item())
    # flow_loss passes it on: a different loss with the same noise (on a still scene: in a clip of i.i.d. noise
    # every pixel moves, and the weighted mean is the plain one)
    x0 = moving_square(2, 5)
    wm, act = tiny_wm()
    a, b = (flow_loss(wm, None, x0, None, generator=torch.Generator().manual_seed(1), motion_weight=w) for w in (0, 50))
    assert torch.isfinite(b) and not torch.equal(a, b)


def test_sampler_deterministic_and_rollout_shapes():
    torch.manual_seed(0)
    wm, act = tiny_wm()
    randomize_zero_inits(wm, act)
    ctx, z = torch.randn(2, 2, 3, 16, 16), torch.randn(2, 4, 2, 32)
    a = sample(wm, act, ctx, z, n_steps=3, cfg_scale=4.0, generator=torch.Generator().manual_seed(7))
    b = sample(wm, act, ctx, z, n_steps=3, cfg_scale=4.0, generator=torch.Generator().manual_seed(7))
    c = sample(wm, act, ctx, z, n_steps=3, cfg_scale=4.0, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 3, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    guided = sample(wm, act, ctx, z, n_steps=3, cfg_scale=1.0, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(a, guided)  # the guidance scale matters
    frames = rollout(wm, act, ctx, torch.randn(2, 10, 2, 32), n_steps=2, generator=torch.Generator().manual_seed(0))
    assert rollout(wm, act, ctx, None, total=9, n_steps=2).shape == (2, 9, 3, 16, 16)
    assert frames.shape == (2, 11, 3, 16, 16) and torch.equal(frames[:, :2], ctx)


# ----------------------------------------------------------------------------------------------------
# cola.py

def test_cola_world_owns_the_loss_and_the_optimizer_of_every_phase():
    """model(x, phase) -> loss; set_phase(phase) and configure_optimizers(phase) train exactly CoLAWorld.PHASES[phase],
    the optimizer carries the AdamW state of what trained before (warm-up -> joint keeps the LAM's moments), and
    building it has no side effects."""
    torch.manual_seed(0)
    settings = dict(preset='cpu', res=16, width=32, depth=1, idm_depth=1, n_heads=2, act_width=32, action_dim=8,
                    codebook_size=8, mode='two_stage', dec_depth=1)
    model = cola.CoLAWorld(settings)
    x, opt = torch.rand(2, 4, 3, 16, 16) * 2 - 1, None
    for phase in ('pretrain', 'warmup', 'joint', 'lam', 'wm'):
        before = [(p.requires_grad, m.training) for m in model.modules() for p in m.parameters(recurse=False)]
        old, (opt, params) = opt, model.configure_optimizers(phase, lr=1e-3, old=opt)
        assert before == [(p.requires_grad, m.training) for m in model.modules() for p in m.parameters(recurse=False)]
        model.set_phase(phase)  # building an optimizer changes nothing; set_phase freezes what the phase leaves
        if phase == 'joint':  # the LAM's moments from the warm-up step came along
            assert opt[0].state[model.lam.idm.embed.weight]['step'] == 1
        out = model(x, phase, p_relax=0.5)
        assert out['loss'].ndim == 0 and out['recon' if phase == 'lam' else 'flow'] is out['loss']
        assert set(out) == {'loss', 'flow', 'recon', 'codes', 'restarts'}  # the same keys in every phase
        assert (out['codes'] is None) == (phase == 'pretrain')
        out['loss'].backward()
        for name in cola.CoLAWorld.MODULES:
            got_grad = any(p.grad is not None for p in getattr(model, name).parameters())
            assert got_grad == (name in cola.CoLAWorld.PHASES[phase]), (phase, name)
        opt[0].step()
        opt[0].zero_grad(set_to_none=True)
    real = cola.CoLAWorld(dict(settings, mode='actions'))  # made for real actions: they fill the latent slot
    out = real(x, 'wm', actions=torch.rand(2, 3, 2))
    assert real.real_actions and not model.real_actions and out['codes'] is None and out['flow'] is out['loss']


def test_muon_is_torchs_update_in_fp32_on_the_hidden_matrices_only():
    """cola.Muon makes torch.optim.Muon's step (Nesterov momentum, Newton-Schulz, AdamW-matched RMS, decoupled weight
    decay) up to torch's bf16 rounding; with muon=True it trains exactly the blocks' 2-D weights, AdamW the rest."""
    torch.manual_seed(0)
    ours = [torch.randn(192, 64, requires_grad=True), torch.randn(64, 256, requires_grad=True),
            torch.randn(192, 64, requires_grad=True)]
    ref = [w.detach().clone().requires_grad_() for w in ours]
    start = [w.detach().clone() for w in ours]
    opts = (cola.Muon(ours, lr=1e-2, weight_decay=0.1),
            torch.optim.Muon(ref, lr=1e-2, weight_decay=0.1, adjust_lr_fn='match_rms_adamw'))
    for _ in range(3):
        for w, r in zip(ours, ref):
            w.grad = torch.randn_like(w)
            r.grad = w.grad.clone()
        for o in opts:
            o.step()
    for w, r, w0 in zip(ours, ref, start):
        assert torch.linalg.norm((w - w0) - (r - w0)) < 0.02 * torch.linalg.norm(r - w0)
    s = torch.linalg.svdvals(cola.orthogonalise(torch.randn(3, 64, 192)))
    assert s.min() > 0.5 and s.max() < 1.5  # about orthogonal, batched over the leading dim
    model = cola.CoLAWorld(dict(preset='cpu', res=16, width=32, depth=1, idm_depth=1, n_heads=2, act_width=32,
                                action_dim=8, codebook_size=8))
    (adamw, muon), params = model.configure_optimizers('joint', lr=1e-3, muon=True)
    named = dict(model.named_parameters())
    in_muon = {n for n, p in named.items() if any(p is q for q in muon.param_groups[0]['params'])}
    assert 'wm.blocks.0.spatial.qkv.weight' in in_muon and 'lam.idm.blocks.0.mlp.0.weight' in in_muon
    assert not in_muon & {'wm.embed.weight', 'wm.head.weight', 'wm.pos_time', 'lam.quantizer.codebook',
                          'wm.blocks.0.spatial.qkv.bias', 'action.inp.weight'}
    assert len(adamw.param_groups[0]['params']) + len(in_muon) == len(params) == len(named)


def test_motion_weight_weighs_only_where_actions_drive_the_world_model():
    """--motion_weight changes the flow loss of the phases that condition the world model on actions (warm-up,
    joint, wm, --mode=actions) and leaves pretraining and the LAM's pixel decoder at plain MSE."""
    settings = dict(preset='cpu', res=16, width=32, depth=1, idm_depth=1, n_heads=2, act_width=32, action_dim=8,
                    codebook_size=8, mode='two_stage', dec_depth=1)
    x = moving_square(2, 4)
    torch.manual_seed(0)
    plain, weighted = cola.CoLAWorld(settings), cola.CoLAWorld(dict(settings, motion_weight=50.0))
    weighted.load_state_dict(plain.state_dict())
    for phase in ('pretrain', 'lam', 'warmup', 'joint', 'wm', 'actions'):
        losses = []
        for model in (plain, weighted):
            torch.manual_seed(1)  # the same noise, times and dropped conditions for both
            real = torch.rand(2, 3, 2) if phase == 'actions' else None
            losses.append(model(x, 'wm' if phase == 'actions' else phase, real)['loss'])
        assert torch.equal(*losses) == (phase in ('pretrain', 'lam')), phase


def test_recon_weight_keeps_the_pixel_loss_beside_the_flow_loss():
    """--recon_weight w: in the warm-up and joint phases the loss is flow + w * the pixel decoder's, and the
    decoder's gradient reaches the IDM; w = 0 leaves the flow loss alone."""
    settings = dict(preset='cpu', res=16, width=32, depth=1, idm_depth=1, n_heads=2, act_width=32, action_dim=8,
                    mode='cola', lam_init_steps=1, dec_depth=1, quantizer='fsq', fsq_levels=(5, 5))
    x = moving_square(2, 4)
    torch.manual_seed(0)
    plain, kept = cola.CoLAWorld(settings), cola.CoLAWorld(dict(settings, recon_weight=0.5))
    torch.nn.init.normal_(plain.lam.decoder.head.weight, std=0.02)  # zero at init: no gradient would pass it
    kept.load_state_dict(plain.state_dict())
    for phase in ('warmup', 'joint'):
        outs = []
        for model in (plain, kept):
            model.set_phase(phase)
            torch.manual_seed(1)
            outs.append(model(x, phase))
        assert outs[0]['recon'] is None and outs[0]['loss'] is outs[0]['flow']
        assert torch.allclose(outs[1]['flow'], outs[0]['flow'])
        assert torch.allclose(outs[1]['loss'], outs[1]['flow'] + 0.5 * outs[1]['recon'])
        kept.zero_grad()
        (outs[1]['loss'] - outs[1]['flow']).backward()  # the pixel term alone
        assert kept.lam.decoder.embed.weight.grad.abs().sum() > 0 and kept.lam.idm.embed.weight.grad.abs().sum() > 0


def test_latent_actions_window_like_the_idm():
    model = cola.CoLAWorld(dict(preset='cpu', res=16, width=32, idm_depth=1, n_heads=2, action_dim=8, codebook_size=8))
    lam = model.eval().lam
    clips = torch.rand(2, 9, 3, 16, 16) * 2 - 1
    out = model.latent_actions(clips)
    assert out['z'].shape == (2, 8, 2, 8) and out['codes'].shape == (2, 8, 2)
    with torch.no_grad():  # windows of 4 frames sharing a frame: transitions 0-2, 3-5, 6-7
        want = torch.cat([lam(clips[:, s:s + 4])['z'] for s in (0, 3, 6)], 1)
    assert torch.allclose(out['z'], want, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# train.py, run as users run it: tiny shapes, a few steps

@pytest.mark.slow
def test_warmup_freezes_wm_then_joint_trains_all(tiny_data, pretrained, tmp_path):
    out = str(tmp_path)
    train(out, f'--init_from={pretrained}/ckpt.pt', '--warmup_steps=3', '--joint_steps=0', data_dir=tiny_data)
    pre, warm = ckpt(pretrained), ckpt(out)
    assert warm['phase'] == 'warmup' and warm['step'] == 3
    assert same(warm['wm'], pre['wm']), "warm-up changed the world model"
    torch.manual_seed(0)
    built = cola.CoLAWorld(warm['config'])
    fresh = {k: getattr(built, k).state_dict() for k in cola.CoLAWorld.MODULES}
    assert same(fresh['lam'], pre['lam']) and same(fresh['action'], pre['action'])  # the start we compare to
    assert not same(warm['lam'], fresh['lam']) and not same(warm['action'], fresh['action'])
    for rec in log_of(out):
        assert rec['phase'] == 'warmup' and rec['grad_wm'] == 0
        assert rec['grad_lam'] > 0 and rec['grad_action'] > 0 and 0 < rec['code_util'] <= 1
    # without --init_from the schedule would pretrain first and run step 3 as pretraining: refused, nothing written
    r = train(out, '--resume', '--warmup_steps=3', '--joint_steps=2', data_dir=tiny_data, check=False)
    assert r.returncode != 0 and 'began with --init_from=' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert same(ckpt(out)['lam'], warm['lam']) and ckpt(out)['step'] == 3
    train(out, '--resume', f'--init_from={pretrained}/ckpt.pt', '--warmup_steps=3', '--joint_steps=2',
          data_dir=tiny_data)
    joint = ckpt(out)
    assert joint['phase'] == 'joint' and joint['step'] == 5
    for k in ('wm', 'action', 'lam'):
        assert not same(joint[k], warm[k]), f"joint training left {k} unchanged"
    assert all(r['grad_wm'] > 0 for r in log_of(out) if r['phase'] == 'joint')
    # soft-to-hard: p_relax falls 1 -> 0 over relax_anneal (0.9) of the LAM's steps: 3 in the first run, 5 after
    # the resume, which continues the count at step 3
    want = [1 - i / 2.7 for i in range(3)] + [1 - i / 4.5 for i in range(3, 5)]
    assert [r['p_relax'] for r in log_of(out)] == pytest.approx(want)


@pytest.mark.slow
def test_two_stage_freezes_lam_in_second_stage(tiny_data, pretrained, tmp_path):
    out = str(tmp_path)
    train(out, '--mode=two_stage', f'--init_from={pretrained}/ckpt.pt', '--lam_steps=2', '--wm_steps=0',
          data_dir=tiny_data)
    stage1 = ckpt(out)
    assert same(stage1['wm'], ckpt(pretrained)['wm']) and any(k.startswith('decoder.') for k in stage1['lam'])
    assert all('recon' in r and r['phase'] == 'lam' for r in log_of(out))
    train(out, '--resume', '--mode=two_stage', f'--init_from={pretrained}/ckpt.pt', '--lam_steps=2',
          '--wm_steps=2', data_dir=tiny_data)
    stage2 = ckpt(out)
    assert stage2['phase'] == 'wm' and same(stage2['lam'], stage1['lam'])
    assert not same(stage2['wm'], stage1['wm']) and not same(stage2['action'], stage1['action'])
    assert all(r['grad_lam'] == 0 for r in log_of(out) if r['phase'] == 'wm')


@pytest.mark.slow
def test_frozen_lam_warms_up_then_trains_only_the_wm(tiny_data, pretrained, tmp_path):
    """The paper's Fig. 4b control: warm-up as in CoLA, then the LAM stays frozen while the WM trains."""
    out, flags = str(tmp_path), ['--mode=frozen_lam', f'--init_from={pretrained}/ckpt.pt', '--warmup_steps=2']
    train(out, *flags, '--joint_steps=0', data_dir=tiny_data)
    warm = ckpt(out)
    assert warm['phase'] == 'warmup' and same(warm['wm'], ckpt(pretrained)['wm'])
    train(out, '--resume', *flags, '--joint_steps=2', data_dir=tiny_data)
    final = ckpt(out)
    assert final['phase'] == 'wm' and final['step'] == 4 and same(final['lam'], warm['lam'])
    assert not same(final['wm'], warm['wm']) and not same(final['action'], warm['action'])
    assert [r['phase'] for r in log_of(out)] == ['warmup'] * 2 + ['wm'] * 2
    assert all(r['grad_lam'] == 0 and r['grad_wm'] > 0 for r in log_of(out) if r['phase'] == 'wm')


@pytest.mark.slow
def test_lam_init_trains_the_lam_on_pixels_before_the_warmup(tiny_data, pretrained, tmp_path):
    """--lam_init_steps: CoLA's LAM first learns with the pixel decoder (the WM untouched), then warm-up and joint;
    --idm_patch gives the IDM a finer patch than the world model's, --dec_patch the decoder one of its own."""
    out = str(tmp_path)
    train(out, f'--init_from={pretrained}/ckpt.pt', '--lam_init_steps=2', '--warmup_steps=2', '--joint_steps=1',
          '--motion_weight=50', '--idm_patch=2', '--dec_patch=1', data_dir=tiny_data)
    lam = ckpt(out)['lam']
    assert lam['idm.embed.weight'].shape[1] == 2 * 2 * 3 and ckpt(out)['wm']['embed.weight'].shape[1] == 4 * 4 * 3
    assert lam['decoder.embed.weight'].shape[1] == 1 * 1 * 3
    log = log_of(out)
    assert [r['phase'] for r in log] == ['lam'] * 2 + ['warmup'] * 2 + ['joint']
    assert all('recon' in r and r['grad_wm'] == 0 and r['grad_action'] == 0 for r in log[:2])
    assert all('flow' in r and r['grad_lam'] > 0 for r in log[2:])
    assert any(k.startswith('decoder.') for k in ckpt(out)['lam'])  # the checkpoint loads where it trained
    assert not any(k.startswith('decoder.') for k in cola.CoLAWorld(dict(ckpt(out)['config'], lam_init_steps=0)).lam.state_dict())


@pytest.mark.slow
def test_actions_mode_trains_the_world_model_on_real_actions_with_ema(tiny_data, pretrained, tmp_path):
    """--mode=actions: the WM and action encoder learn from the real actions at actions_lr, the LAM is never
    touched; with ema_decay the checkpoint's ema_wm is the running average of the WM's weights."""
    out = str(tmp_path)
    train(out, '--mode=actions', f'--init_from={pretrained}/ckpt.pt', '--actions_steps=1', '--ema_decay=0.5',
          '--actions_lr=3e-3', data_dir=tiny_data)
    pre, act = ckpt(pretrained), ckpt(out)
    torch.manual_seed(0)
    fresh = cola.CoLAWorld(act['config']).lam.state_dict()
    assert act['phase'] == 'wm' and same(act['lam'], fresh) and not same(act['wm'], pre['wm'])
    assert [(r['lr'], r['grad_lam']) for r in log_of(out)] == [(3e-3, 0)] and log_of(out)[0]['grad_action'] > 0
    for k, v in act['ema_wm'].items():  # one step at decay 0.5: halfway between the start and the trained weights
        assert torch.allclose(v, 0.5 * (pre['wm'][k] + act['wm'][k]), atol=1e-7), k


def test_dataclass_defaults_are_the_default_run():
    """One source per default: WMConfig() and LAMConfig() are the models `python train.py` builds (its settings
    under the cpu preset), and the cpu preset is the dataclasses' sizes."""
    settings = {}
    for node in ast.parse(open(os.path.join(HERE, 'train.py')).read()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id == 'config':
            break  # the settings end where the configurator runs
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            settings[node.targets[0].id] = ast.literal_eval(node.value)
    assert settings['preset'] == 'cpu' and cola.model_configs(settings) == (WMConfig(), LAMConfig())
    assert all(getattr(WMConfig(), k) == v for k, v in PRESETS['cpu'].items())


@pytest.mark.slow
def test_sigterm_checkpoint_and_exact_resume(tiny_data, tmp_path):
    """An uninterrupted run and one stopped by SIGTERM then resumed log identical losses (CPU, same seed)."""
    import signal
    import time
    flags = ['--pretrain_steps=150', '--warmup_steps=100', '--joint_steps=100', '--eval_clips=0']
    ref = str(tmp_path / 'ref')
    train(ref, *flags, data_dir=tiny_data)
    out = str(tmp_path / 'cut')
    cmd = [sys.executable, os.path.join(HERE, 'train.py'), f'--out_dir={out}', f'--data={tiny_data}'] + TINY_TRAIN + flags
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    log = os.path.join(out, 'log.jsonl')
    while p.poll() is None and not (os.path.exists(log) and len(open(log).readlines()) >= 120):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate()
    assert p.returncode == 0 and 'stopped by signal' in stdout
    cut = ckpt(out)
    assert 120 <= cut['step'] < 350, "the signal did not land inside training"
    train(out, '--resume', *flags, data_dir=tiny_data)
    a, b = log_of(ref), log_of(out)
    assert [(r['step'], r['loss']) for r in a] == [(r['step'], r['loss']) for r in b]
    changed = train(out, '--resume', *flags, '--stop_at=170', '--lr=5e-3', data_dir=tiny_data)  # past the end: no step
    assert "--resume: --lr changed from the checkpoint's 0.001 to 0.005" in changed.stdout
    # --stop_at: the same, at a step of our choosing; a second stop there trains nothing (experiments.py reruns)
    at = str(tmp_path / 'at')
    train(at, *flags, '--stop_at=170', data_dir=tiny_data)
    assert ckpt(at)['step'] == 170 and ckpt(at)['phase'] == 'warmup'
    train(at, '--resume', *flags, '--stop_at=170', data_dir=tiny_data)
    assert ckpt(at)['step'] == 170
    train(at, '--resume', *flags, data_dir=tiny_data)
    assert [(r['step'], r['loss']) for r in a] == [(r['step'], r['loss']) for r in log_of(at)]


@pytest.mark.slow
def test_muon_and_wsd_resume_exactly(tiny_data, tmp_path):
    """--optimizer=muon keeps two optimizers whose states a checkpoint holds, so a stopped run resumes bit for bit;
    --lr_schedule=wsd holds the peak, then cools down linearly to 0 over the last `cooldown` of each phase."""
    flags = ['--optimizer=muon', '--lr_schedule=wsd', '--cooldown=0.5', '--pretrain_steps=4', '--warmup_steps=2',
             '--joint_steps=4', '--eval_clips=0']
    ref, cut = str(tmp_path / 'ref'), str(tmp_path / 'cut')
    train(ref, *flags, data_dir=tiny_data)
    train(cut, *flags, '--stop_at=7', data_dir=tiny_data)
    train(cut, '--resume', *flags, data_dir=tiny_data)
    assert [(r['step'], r['loss']) for r in log_of(ref)] == [(r['step'], r['loss']) for r in log_of(cut)]
    assert [r['lr'] for r in log_of(ref)][:4] == [1e-3, 1e-3, 1e-3, 5e-4]  # pretraining: warm-up 1, cool-down 2
    assert len(ckpt(ref)['optimizer']) == 2  # AdamW and Muon


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tiny_data, tmp_path):
    out = str(tmp_path)
    # gradient accumulation syncs the ranks' gradients on the last micro-batch only: their weights must agree
    train(out, '--pretrain_steps=2', '--warmup_steps=2', '--joint_steps=2', '--grad_accum=2', data_dir=tiny_data,
          torchrun=2)
    ranks = ckpt(out)['ranks']
    assert len(ranks) == 2 and ranks[0]['fingerprint'] == ranks[1]['fingerprint'], "ranks' weights differ"
    assert ranks[0]['sampler'] != ranks[1]['sampler']  # each rank draws its own clips
    assert [r['step'] for r in log_of(out)] == list(range(1, 7))  # one record per optimizer step, not per micro-batch


@pytest.mark.slow
def test_bad_input_one_line_errors(tiny_data, pretrained, tmp_path):
    cases = [(['--bogus=1'], 'unknown flag --bogus'),
             (['--data=/no/such/dir'], 'no such folder'),
             ([f'--data={tmp_path}'], 'empty dataset'),
             ([f'--data={tiny_data}', '--n_frames=13'], 'has 13 frames'),
             ([f'--data={tiny_data}', '--width=64', f'--init_from={pretrained}/ckpt.pt'], 'incompatible config'),
             # settings are refused before any data is prepared (no --data: the built-in one is never built)
             (['--res=30'], '--res=30 must be divisible by --patch=4'),
             (['--batch_size=0'], '--batch_size must be positive, got 0'),
             (['--pretrain_steps=-5'], '--pretrain_steps must be at least 0, got -5'),
             (['--mode=bogus'], '--mode must be one of pretrain, cola, two_stage, frozen_lam, actions'),
             (['--recon_weight=1'], '--recon_weight=1.0 needs the pixel decoder')]
    for flags, msg in cases:
        r = train(str(tmp_path / 'o'), *flags, check=False)
        assert r.returncode != 0 and msg in r.stderr, (flags, r.stderr[-500:])
        assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # the same checks in process (train.py turns each ValueError into its one line, as above)
    base = dict(preset='cpu', res=16, dec_depth=2, idm_depth=2, mode='cola')
    for bad, msg in ((dict(idm_patch=3), '--res=16 must be divisible by --idm_patch=3'),
                     (dict(dec_patch=3), '--res=16 must be divisible by --dec_patch=3'),
                     (dict(quantizer='xx'), '--quantizer must be one of vq, fsq, none'),
                     (dict(n_context=4), '--n_context=4 must be at least 1 and below n_frames=4'),
                     (dict(width=30), '--width=30 must be divisible by --n_heads=4')):
        with pytest.raises(ValueError, match=re.escape(msg)):
            cola.model_configs({**base, **bad})


@pytest.mark.slow
def test_init_from_takes_only_the_world_model(tiny_data, pretrained, tmp_path):
    """--init_from loads `wm` alone, so another quantizer may start from the same pretrained world model."""
    train(str(tmp_path), f'--init_from={pretrained}/ckpt.pt', '--quantizer=fsq', '--fsq_levels=(4, 2)',
          '--warmup_steps=1', '--joint_steps=0', data_dir=tiny_data)
    assert same(ckpt(str(tmp_path))['wm'], ckpt(pretrained)['wm'])


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, pretrained, tmp_path):
    out = str(tmp_path)
    r = train(out, f'--init_from={pretrained}/ckpt.pt', '--warmup_steps=20', '--joint_steps=0', '--lr=1e30',
              '--grad_clip=1e30', '--lr_ramp=0', '--ckpt_interval=1', data_dir=tiny_data, check=False)
    assert r.returncode == 1 and 'non-finite loss' in r.stderr
    last = ckpt(out)
    assert last['step'] < 20 and all(torch.isfinite(v).all() for v in last['lam'].values())


@pytest.mark.slow
def test_full_disk_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    out = str(tmp_path / 'run')
    p = in_subprocess('train_on_a_full_disk', f'--out_dir={out}', *TINY_TRAIN, '--pretrain_steps=6', '--warmup_steps=0',
                      '--joint_steps=0', '--ckpt_interval=2', f'--data={tiny_data}', stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    r = subprocess.CompletedProcess(p.args, p.wait(), *p.communicate())
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert f'cannot write {out}/ckpt.pt: No space left on device at step 4' in r.stderr
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')] and ckpt(out)['step'] == 2


@pytest.mark.slow
def test_a_second_run_on_a_busy_out_dir_is_refused_and_resume_after_a_kill_is_not(tiny_data, tmp_path):
    out = str(tmp_path / 'run')
    first = subprocess.Popen([sys.executable, os.path.join(HERE, 'train.py'), f'--out_dir={out}', *TINY_TRAIN,
                              '--pretrain_steps=100000', '--warmup_steps=0', '--joint_steps=0', '--ckpt_interval=5',
                              f'--data={tiny_data}'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        log = os.path.join(out, 'log.jsonl')
        while not (os.path.exists(os.path.join(out, 'ckpt.pt')) and open(log).read().count('\n') >= 5):
            assert first.poll() is None
            time.sleep(0.05)
        second = train(out, '--pretrain_steps=3', '--warmup_steps=0', '--joint_steps=0', data_dir=tiny_data, check=False)
        assert second.returncode == 2 and second.stderr.count('\n') == 1, second.stderr[-2000:]
        assert f'--out_dir={out} is in use by another run (pid {first.pid})' in second.stderr
    finally:
        first.kill()  # SIGKILL: no chance to clean up, the kernel frees the lock
        first.wait()
    steps = [rec['step'] for rec in log_of(out)]  # the first run's log is whole, its steps rise
    assert steps == sorted(set(steps)) and len(steps) >= 5
    resumed = train(out, '--resume', '--pretrain_steps=100000', f'--stop_at={ckpt(out)["step"] + 2}',
                    '--warmup_steps=0', '--joint_steps=0', data_dir=tiny_data)
    assert 'stopped (--stop_at)' in resumed.stdout


# ----------------------------------------------------------------------------------------------------
# measure.py

def test_probe_recovers_linear_map_and_not_noise():
    g = torch.Generator().manual_seed(0)
    actions = torch.rand(3000, 2, generator=g) * 2 - 1
    latents = (actions @ torch.randn(2, 16, generator=g) + 0.5).view(-1, 2, 8)  # a known linear map, (N, n_tok, d)
    fit = measure.ridge_probe(latents[:2000], actions[:2000], latents[2000:], actions[2000:])
    assert fit['r2'] > 0.999 and fit['l1'] < 0.01 < fit['l1_mean']
    noise = torch.randn(3000, 2, 8, generator=g)
    fit = measure.ridge_probe(noise[:2000], actions[:2000], noise[2000:], actions[2000:])
    assert abs(fit['r2']) < 0.05 and fit['l1'] == pytest.approx(fit['l1_mean'], rel=0.05)
    constant = torch.ones(3000, 2, 8)  # a collapsed codebook: the probe predicts the mean, no blow-up
    fit = measure.ridge_probe(constant[:2000], actions[:2000], constant[2000:] + 1, actions[2000:])
    assert fit['l1'] == pytest.approx(fit['l1_mean'], abs=1e-6)


@pytest.mark.slow
def test_probes_tell_linear_from_nonlinear_codes():
    """eval.py's fair probes on latents with a known map: FSQ-like grid coordinates that are a non-monotone
    function of the action defeat the linear probe but not the MLP or one-hot probes; per-dim R² is per dim."""
    g = torch.Generator().manual_seed(0)
    actions = torch.rand(3000, 2, generator=g) * 2 - 1
    bins = ((actions + 1) * 4).long().clamp(max=7)  # 8 bins per dim: code = 8 * bin_x + bin_y, a known lookup
    codes = bins[:, 0] * 8 + bins[:, 1]
    scramble = torch.randperm(8, generator=g)  # grid coordinates in a scrambled order: not linear in the action
    grid = scramble[bins].float()[:, None, :]  # (N, n_tok=1, 2), like FSQ's rounded coordinates
    tr, te = slice(0, 2000), slice(2000, None)
    linear = measure.ridge_probe(grid[tr], actions[tr], grid[te], actions[te])
    mlp = measure.mlp_probe(grid[tr], actions[tr], grid[te], actions[te])
    onehot = F.one_hot(codes, 64).float()
    hot = measure.ridge_probe(onehot[tr], actions[tr], onehot[te], actions[te])
    assert linear['r2'] < 0.5 and mlp['r2'] > 0.9 and hot['r2'] > 0.9  # 8 bins: R² of binning is 1 - 1/64
    assert len(mlp['r2_per_dim']) == 2 and mlp['r2'] == pytest.approx(sum(mlp['r2_per_dim']) / 2)
    half = torch.cat([actions[:, :1], torch.randn(3000, 1, generator=g)], 1)[:, None]  # only dim 0 is encoded
    fit = measure.ridge_probe(half[tr], actions[tr], half[te], actions[te])
    assert fit['r2_per_dim'][0] > 0.99 and abs(fit['r2_per_dim'][1]) < 0.05


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 2, 3, 24, 20, generator=g) * 2 - 1
    b = (a + 0.4 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    b[0, 0] = a[0, 0] * 0.5 + 0.2  # a contrast/brightness change as well as noise
    ours = measure.ssim(a, b)
    for i in range(2):
        for t in range(2):
            ref = structural_similarity(a[i, t].permute(1, 2, 0).double().numpy(), b[i, t].permute(1, 2, 0).double().numpy(),
                                        data_range=2.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, channel_axis=2)
            assert abs(ours[i, t].item() - ref) < 1e-3


def test_identical_clips_score_finite():
    a = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    assert torch.equal(measure.psnr(a, a), torch.full((2, 3), 100.0))  # the cap, not inf
    assert torch.allclose(measure.ssim(a, a), torch.ones(2, 3))
    p, s = measure.scores(a, a, 1)
    assert all(math.isfinite(x) for x in p + s) and len(p) == 2


def test_adapter_training_lowers_loss_and_feeds_the_quantizer():
    g = torch.Generator().manual_seed(0)
    actions = torch.rand(500, 2, generator=g) * 2 - 1
    z_e = torch.tanh(actions @ torch.randn(2, 16, generator=g)).view(-1, 2, 8)  # (N, n_tok, d)
    adapter, losses = measure.train_adapter(actions, z_e, steps=200)
    assert losses[-1] < 0.1 * losses[0]
    with torch.inference_mode():
        z, codes, _ = VQ(8, 8)(adapter(actions))
    assert z.shape == (500, 2, 8) and codes.min() >= 0 and codes.max() < 8


# ----------------------------------------------------------------------------------------------------
# eval.py and sample.py

@pytest.mark.slow
def test_eval_json_and_determinism(tiny_ckpt):
    flags = [f'--ckpt={tiny_ckpt}', *FAST, '--adapter_steps=30', '--adapter_episodes=3']
    runs = [run('eval.py', *flags) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:]
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    for prefix in ('', 'shuffled_', 'null_', 'copy_', 'adapter_'):
        for k in ('psnr', 'ssim'):
            assert math.isfinite(a[prefix + k]) and len(a[f'{prefix}{k}_per_step']) == 6
    assert a['psnr_gain_over_shuffled'] == pytest.approx(a['psnr'] - a['shuffled_psnr'])
    for k in ('psnr_gain_over_null', 'psnr_gain_over_shuffled', 'probe_speed_r2', 'probe_onehot_speed_r2',
              'probe_pre_speed_r2', 'probe_disp_r2', 'probe_onehot_disp_r2', 'probe_pre_disp_r2', 'probe_l1', 'probe_r2', 'probe_l1_mean', 'code_util', 'code_max',
              'code_entropy', 'code_perplexity', 'adapter_code_util', 'adapter_code_max', 'adapter_loss',
              'probe_onehot_r2', 'probe_pre_r2', 'probe_mlp_r2', 'flow_gap'):
        assert math.isfinite(a[k]), k
    assert a['flow_train'] > 0 and a['flow_val'] > 0  # training windows against held-out ones, the same noise
    for p in ('', 'adapter_', 'null_', 'copy_'):  # the state probe's position errors, per step
        for obj in ('agent', 'blocks'):
            assert math.isfinite(a[f'{p}state_err_{obj}']) and len(a[f'{p}state_err_{obj}_per_step']) == 6
    assert a['state_floor_agent'] >= 0 and a['state_floor_blocks'] >= 0
    for obj in ('agent', 'blocks'):  # frames held: counted from the per-step errors, a half holds at least a quarter's
        held = lambda frac: sum(e <= max(frac * c, a[f'state_floor_{obj}'] + 0.01) for e, c in
                                zip(a[f'state_err_{obj}_per_step'], a[f'copy_state_err_{obj}_per_step']))
        assert a[f'{obj}_frames_within_quarter'] == held(0.25) <= a[f'{obj}_frames_within_half'] == held(0.5) <= 6
    for k in ('probe_r2', 'probe_onehot_r2', 'probe_pre_r2', 'probe_mlp_r2'):  # 2-d actions: two R² each
        assert len(a[k + '_per_dim']) == 2 and a[k] == pytest.approx(sum(a[k + '_per_dim']) / 2, abs=1e-3), k
    assert not any('lpips' in k or 'fvd' in k for k in a)
    a.pop('wall_s'), b.pop('wall_s')
    assert a == b  # the same --seed gives the same figures


def readme_row(first_cell):
    """The numbers in the README's table row that starts with first_cell (a row's '+2.85 (22.63)' gives 2.85, 22.63)."""
    row = next(line for line in open(os.path.join(HERE, 'README.md')) if line.startswith(f'| {first_cell} |'))
    return [float(x) for cell in row.split('|')[3:] for x in re.findall(r'[-+−]?\d+\.\d+', cell.replace('−', '-'))]


def eval_gives_readme_row(ckpt, *flags, env=None):
    """Run eval.py on a shipped checkpoint (2 threads) and check its figures against the README's row for it;
    returns eval.py's stdout. Tolerances: 0.02 dB is the README's rounding and another CPU's; broken on purpose,
    sampling without noise moves sim.pt's PSNR by 0.05, a reversed adapter by 3.7 (pusht.pt's: NOTES.md)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, 'eval.py'), f'--ckpt={ckpt}', *flags], capture_output=True,
                       text=True, cwd=HERE, env={**os.environ, 'OMP_NUM_THREADS': '2', **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    e = json.loads(r.stdout.strip().splitlines()[-1])
    psnr, copy, shuffled, probe, adapter = readme_row(f'`{ckpt}`')
    assert e['copy_psnr'] == pytest.approx(copy, abs=0.01)  # the same held-out clips
    assert e['psnr'] == pytest.approx(psnr, abs=0.02) and e['psnr_gain_over_shuffled'] == pytest.approx(shuffled, abs=0.02)
    assert e['probe_r2'] == pytest.approx(probe, abs=0.002) and e['adapter_psnr'] == pytest.approx(adapter, abs=0.05)
    return r.stdout


@pytest.mark.slow
def test_shipped_checkpoint_gives_the_readme_figures(builtin_root):
    """checkpoints/sim.pt, the default run's seed 0 in fp16, on the built-in data simulated afresh: eval.py's defaults
    give the README's figures, measured by the state probe the checkpoint carries (nothing is fitted but the
    probe of the latents and the adapter). A broken sampler or adapter moves them far beyond the tolerance, another CPU's rounding does not."""
    out = eval_gives_readme_row('checkpoints/sim.pt', env={'COLA_DATA': builtin_root})
    assert 'fitting the state probe' not in out


@pytest.mark.slow
@needs_pusht
def test_shipped_pusht_checkpoint_gives_the_readme_figures(tmp_path):
    """checkpoints/pusht.pt, config/pusht.py's seed 0 in fp16, on 40 PushT episodes it never saw (data.py's seed 1,
    as the README's row): eval.py gives the README's figures. Its 300 training episodes would take minutes to
    write; these take seconds, and their held-out split is fixed by the data (data.SPLIT_SEED)."""
    unseen = str(tmp_path / 'pusht-unseen')
    r = run('data.py', '--env=pusht', f'--out_dir={unseen}', '--episodes=40', '--seed=1')
    assert r.returncode == 0, r.stderr[-2000:]
    eval_gives_readme_row('checkpoints/pusht.pt', f'--data={unseen}')


@pytest.mark.slow
def test_sample_writes_gifs(tiny_ckpt, tmp_path):
    r = run('sample.py', f'--ckpt={tiny_ckpt}', f'--out_dir={tmp_path}', *FAST, '--n_clips=3', '--tour_steps=3')
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res['psnr_per_step']) == 6 and math.isfinite(res['psnr']) and len(res['gifs']) == 5
    # scale 2; 16-pixel frames with 1-pixel gaps; a 3-pixel time bar under them
    rollout = iio.imread(tmp_path / 'rollout_0.gif')  # truth | generated | difference, 2 + 6 frames
    assert rollout.shape == (8, 2 * (16 + 3), 2 * (3 * 17 - 1), 3)
    transfer = iio.imread(tmp_path / 'transfer.gif')  # 3 clips x 3 panels
    assert transfer.shape == (8, 2 * (3 * 17 - 1 + 3), 2 * (3 * 17 - 1), 3)
    tour = iio.imread(tmp_path / 'codebook.gif')  # 8 codes in a 3 x 3 grid, 2 + 3 frames
    assert tour.shape == (5, 2 * (3 * 17 - 1 + 3), 2 * (3 * 17 - 1), 3)


@pytest.mark.slow
def test_actions_checkpoint_is_driven_by_real_actions(tiny_data, tmp_path):
    """A --mode=actions checkpoint: eval.py rolls it out with the clips' real actions, and sample.py does the
    same (same clips, same noise: the same PSNR), not with its untrained LAM."""
    out = str(tmp_path / 'act')
    train(out, '--mode=actions', '--actions_steps=4', data_dir=tiny_data)
    flags = [f'--ckpt={out}/ckpt.pt', *FAST]
    e, s = run('eval.py', *flags), run('sample.py', *flags, f'--out_dir={tmp_path}')
    assert e.returncode == 0 and s.returncode == 0, e.stderr[-2000:] + s.stderr[-2000:]
    ev, sa = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (e, s))
    assert ev['mode'] == 'actions' and 'probe_r2' not in ev and 'adapter_psnr' not in ev
    assert 'driven by the real actions' in s.stdout and sa['psnr'] == pytest.approx(ev['psnr'], abs=1e-3)
    with torch.no_grad():  # and a different action sequence gives a different rollout: the actions are used
        model, _ = cola.load_model(f'{out}/ckpt.pt')
        clips = torch.rand(2, 5, 3, 16, 16) * 2 - 1
        a = torch.rand(2, 4, 2) * 2 - 1
        z = lambda acts: cola.real_latents(acts, model.lam.cfg)
        assert not torch.equal(model.simulate(clips, z(a)), model.simulate(clips, z(-a)))


@pytest.mark.slow
@pytest.mark.parametrize('program', ['sample.py', 'eval.py'])
def test_bad_checkpoint_is_one_line_error(program, tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    for path in (tmp_path / 'missing.pt', bad):
        r = run(program, f'--ckpt={path}')
        assert r.returncode == 2 and str(path) in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# plan.py

def test_planning_tasks_are_reachable():
    for family in ('reach', 'push'):
        for seed in range(3):
            task = plan.make_task(family, seed, horizon=20, res=32)
            args = (task['goal_state'], task['n_blocks'])
            assert plan.task_success(family, task['goal_state'], *args)
            assert not plan.task_success(family, task['start_state'], *args)
            sim = PushSim(32, task['episode_seed'])  # replaying the plan reaches the goal frame
            for a in task['actions']:
                frame = sim.step(a)
            assert np.array_equal(frame, task['goal_frame'])
    batch = np.stack([task['start_state'], task['goal_state']])
    assert plan.task_success('push', batch, task['goal_state'], task['n_blocks']).tolist() == [False, True]


@pytest.mark.parametrize('method', ['mppi', 'cem'])
def test_planner_finds_minimum_of_quadratic(method):
    target = torch.tensor([[0.5, -0.3], [-0.7, 0.2], [0.1, 0.9]])  # (H, A), inside [-1, 1]
    cost = lambda a: ((a - target).square().sum((1, 2)), a)
    p = plan.Planner(method, 3, 2, n_samples=100, n_iters=30, std=0.3, smoothing=0.0, seed=0)
    mean, best = p.plan(cost)
    # MPPI keeps its noise level, so its mean stays within ~std / sqrt(effective samples) of the minimum
    assert (mean - target).abs().max() < (0.1 if method == 'mppi' else 0.02), mean
    assert cost(mean[None])[0] < 0.02 * cost(torch.zeros(1, 3, 2))[0] and cost(best[None])[0] < 0.05
    p.shift(1)  # warm start: the rest of the plan, then zeros
    assert torch.equal(p.mean, torch.cat([mean[1:], torch.zeros(1, 2)]))


def test_planner_with_the_simulator_as_model_solves_reach():
    """The oracle: the same MPC loop with PushSim itself as the model reaches the goal of reach tasks."""
    solved, moved = [], []
    for k in range(4):
        task = plan.sim_task('reach', k, res=32, task_horizon=8)
        start = task.result()['dist']
        p = plan.Planner('mppi', 8, 2, n_samples=32, seed=k)
        r, obs, pred, times = plan.run_episode(task, p, lambda o, d, g: plan.simulator_cost(task.sim, g), 16, 4, 2)
        solved.append(r['success'])
        moved.append(r['dist'] < start)
        assert len(obs) == len(pred) == 17 and len(times) == 4  # start + 16 steps; a plan every 4 steps
    assert sum(solved) >= 3 and all(moved), (solved, moved)


@needs_pusht
def test_pusht_task_goal_is_the_envs_goal_pose():
    task = plan.pusht_task(0, res=16)
    assert task.goal.shape == (16, 16, 3)
    assert 0.3 < task.result()['coverage'] < 0.8 and not task.result()['success']
    sim = pusht.PushT()
    sim.reset(state=[100, 100, *sim.env.goal_pose])  # reset_to_state, corrected for the T's centre of gravity
    assert sim.coverage() > 0.999 and sim.success()


@pytest.mark.slow
def test_plan_prints_json_and_writes_gifs(tiny_ckpt, tmp_path):
    tasks = 'reach,push,pusht' if HAVE_PUSHT else 'reach,push'
    r = run('plan.py', f'--ckpt={tiny_ckpt}', f'--out_dir={tmp_path}', f'--tasks={tasks}', '--n_tasks=1',
            '--n_samples=8', '--horizon=4', '--exec_steps=2', '--max_steps=4', '--euler_steps=2',
            '--adapter_steps=20', '--adapter_episodes=3', '--n_gifs=1', '--device=cpu')
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for family in tasks.split(','):
        for name in ('ours', 'random', 'oracle'):  # one task: solved or not
            assert out[f'{family}_{name}_success'] in (0.0, 1.0)
        assert out[f'{family}_ours_s_per_plan'] > 0
    assert 'pusht_ours_coverage' in out or 'pusht' not in tasks
    assert len(out['gifs']) == len(tasks.split(','))
    gif = iio.imread(out['gifs'][0])  # observed | predicted | goal, start + 4 steps, time bar, scale 2, 1-pixel gaps
    assert gif.shape == (5, 2 * (16 + 3), 2 * (3 * 17 - 1), 3)
    bad = run('plan.py', f'--ckpt={tiny_ckpt}', '--tasks=fly')
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# play.py

def test_play_session_follows_the_keys(tiny_ckpt):
    """play.Session: the context is the held-out episode's own frames; a move key or a code adds one generated frame
    whose truth is gone, E keeps the episode's truth beside, and the same keys give the same frames."""
    import play
    model, _, _, sampler = measure.open_run(tiny_ckpt, '', 'cpu', 'train')
    z_e, acts = measure.episode_latents(model, sampler, sampler.episodes('train')[:4], 'cpu')
    adapter = measure.train_adapter(torch.cat(acts), torch.cat(z_e), 20)[0]
    views = []
    for _ in range(2):
        s = play.Session(model, sampler, adapter)
        first = s.view()
        assert np.array_equal(first[:, :16], first[:, 16:])  # context: generated = truth, the episode's frame 1
        assert 'held-out episode' in s.press('')
        s.press('e')
        assert s.on_episode and np.array_equal(s.view()[:, 16:], s.episode['frames'][2])
        s.press('right')
        assert not s.on_episode and (s.view()[:, 16:] == 128).all()  # moved off the episode: no truth
        assert 'code 3' in s.press('3') and 'nothing to do' in s.press('x')
        assert len(s.frames) == 5 and len(s.z) == 4  # 2 context frames, 3 generated; a latent action per transition
        views.append(np.stack([f.numpy() for f in s.frames]))
        s.press('r')
        assert len(s.frames) == 2 and s.clip == 1
    assert np.array_equal(*views) and not np.array_equal(views[0][3], views[0][4])


@pytest.mark.slow
def test_play_headless_gif_and_page(tiny_ckpt, tmp_path):
    """--keys writes the session as a GIF (generated | truth, a frame a key); without it the page serves on
    localhost and answers a key with a new frame."""
    r = run('play.py', f'--ckpt={tiny_ckpt}', '--keys=right,e,3,r,d', f'--out={tmp_path}/p.gif', '--adapter_steps=20')
    assert r.returncode == 0, r.stderr[-2000:]
    assert iio.imread(tmp_path / 'p.gif').shape == (6, 4 * (16 + 3), 4 * 33, 3)  # scale 4, 2 panels, a time bar
    p = subprocess.Popen([sys.executable, os.path.join(HERE, 'play.py'), f'--ckpt={tiny_ckpt}', '--port=0',
                          '--adapter_steps=20'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        line = p.stdout.readline()
        assert line.startswith('adapter fit'), line + p.stderr.read()
        port = int(p.stdout.readline().split('localhost:')[1].split()[0])
        import urllib.request
        assert b'generated | truth' in urllib.request.urlopen(f'http://localhost:{port}/').read()
        answer = json.loads(urllib.request.urlopen(f'http://localhost:{port}/key?k=right').read())
        assert answer['frame'] == 2 and 'right' in answer['said'] and answer['ms'] > 0  # the time: README, not a test
        image = iio.imread(base64.b64decode(answer['image'].split(',')[1]))
        assert image.shape == (16 * 8, 32 * 8, 3)
    finally:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_shipped_checkpoint_moves_the_agent_right_under_right_keys(builtin_root, monkeypatch):
    """play.py on checkpoints/sim.pt: six 'right' keys (real actions through the adapter and the quantizer) carry the
    agent at least 0.1 arena widths right of where it started, as the state probe reads the 6th generated frame
    (the median over the first four held-out clips whose agent starts with room to move: x <= 0.6 of the arena)."""
    import play
    monkeypatch.setenv('COLA_DATA', builtin_root)
    model, _, _, sampler = measure.open_run('checkpoints/sim.pt', '', 'cpu', 'train')
    z_e, acts = measure.episode_latents(model, sampler, sampler.episodes('train')[:play.adapter_episodes], 'cpu')
    adapter = measure.train_adapter(torch.cat(acts), torch.cat(z_e), play.adapter_steps)[0]
    probe = state_probe.load_state_probe(sampler)
    session, moves = play.Session(model, sampler, adapter), []
    while len(moves) < 4:
        if session.episode['states'][1][0] <= 0.6:
            for _ in range(6):
                session.press('right')
            with torch.no_grad():
                x = state_probe.locate(probe(torch.cat([session.frames[1], session.frames[-1]])))[0][:, 0]
            moves.append(float(x[1] - x[0]))
        session.press('r')
    assert np.median(moves) >= 0.1, moves


# ----------------------------------------------------------------------------------------------------
# data.py

@pytest.mark.slow
def test_cli_writes_npz_episodes(tmp_path):
    out = tmp_path / 'eps'
    subprocess.run([sys.executable, os.path.join(HERE, 'data.py'), f'--out_dir={out}', '--episodes', '2',
                    '--T', '8', '--res=32'], check=True, capture_output=True)
    files = sorted(os.listdir(out))
    assert files == ['ep_000000.npz', 'ep_000001.npz']
    ep = data.load_episode(str(out / files[1]), 32)
    ref = generate_episode(data.episode_seed(0, 1), 8, 32)
    for k in ('frames', 'actions', 'states'):
        assert np.array_equal(ep[k], ref[k])
    assert int(np.load(out / files[1])['n_blocks']) == ref['n_blocks']
    r = subprocess.run([sys.executable, os.path.join(HERE, 'data.py'), '--nope=1'], capture_output=True, text=True)
    assert r.returncode != 0 and '--nope' in r.stderr and '--out_dir' in r.stderr


def test_video_round_trip(tmp_path):
    frames = generate_episode(1, 10, 64)['frames']
    frames[:, :8, :8] = np.arange(10)[:, None, None, None] * 25  # Pillow's GIF writer merges repeated frames
    iio.imwrite(tmp_path / 'a.mp4', frames, plugin='FFMPEG', fps=10)
    iio.imwrite(tmp_path / 'b.gif', frames, loop=0)
    for name, tol in (('a.mp4', 12), ('b.gif', 12)):
        ep = data.load_episode(str(tmp_path / name), 64)
        assert ep['frames'].shape == (10, 64, 64, 3) and ep['frames'].dtype == np.uint8 and ep['actions'] is None
        assert np.abs(ep['frames'].astype(int) - frames).mean() < tol
    small = data.load_episode(str(tmp_path / 'a.mp4'), 32)['frames']
    assert small.shape == (10, 32, 32, 3)
    # grey and RGBA npz frames become RGB; non-square frames are centre-cropped
    np.savez(tmp_path / 'g.npz', frames=np.zeros((3, 20, 40), np.uint8))
    assert data.load_episode(str(tmp_path / 'g.npz'), 16)['frames'].shape == (3, 16, 16, 3)


def test_bad_and_short_files_are_named(tmp_path):
    _write_npz(tmp_path, 'good.npz', 8)
    _write_npz(tmp_path, 'short.npz', 3)
    (tmp_path / 'bad.mp4').write_bytes(b'not a video')
    with pytest.raises(ValueError, match='bad.mp4'):
        data.load_episode(str(tmp_path / 'bad.mp4'), 16)
    with pytest.raises(ValueError, match='bad.mp4'):
        data.prepare(str(tmp_path), str(tmp_path / 'p'), 16)
    (tmp_path / 'bad.mp4').unlink()
    with pytest.raises(ValueError, match='short.npz'):
        data.prepare(str(tmp_path), str(tmp_path / 'p'), 16, clip_len=6)
    (tmp_path / 'bad.npz').write_bytes(b'PK\x03\x04 truncated')
    with pytest.warns(UserWarning) as rec:
        out = data.prepare(str(tmp_path), str(tmp_path / 'p'), 16, clip_len=6, skip_bad=True)
    assert any('bad.npz' in str(w.message) for w in rec) and any('short.npz' in str(w.message) for w in rec)
    assert [e['source'] for e in json.load(open(os.path.join(out, 'index.json')))['episodes']] == ['good.npz']


def test_non_finite_actions_or_states_are_named_or_skipped(tmp_path):
    """A NaN or inf in an episode's actions or states is refused while preparing, naming the file, or the file
    is left out with --skip_bad: it would otherwise poison a run hours later, far from its cause."""
    _write_npz(tmp_path, 'good.npz', 8)
    for key in ('actions', 'states'):
        ep = _write_npz(tmp_path, 'bad.npz', 8)
        ep[key][2, 0] = np.inf if key == 'states' else np.nan
        np.savez(tmp_path / 'bad.npz', frames=ep['frames'], actions=ep['actions'], states=ep['states'])
        with pytest.raises(ValueError, match=f'bad.npz: its {key} hold NaN or inf'):
            data.prepare(str(tmp_path), str(tmp_path / 'p'), 16)
        with pytest.warns(UserWarning, match='bad.npz'):
            out = data.prepare(str(tmp_path), str(tmp_path / 'p'), 16, skip_bad=True)
        assert [e['source'] for e in json.load(open(os.path.join(out, 'index.json')))['episodes']] == ['good.npz']


def test_a_full_disk_while_preparing_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    for i in range(3):
        _write_npz(tmp_path, f'e{i}.npz', 8, seed=i)
    monkeypatch.setattr(data, 'open', lambda path, mode='r': FullDisk(path, mode, 5000), raising=False)
    out = str(tmp_path / 'p')
    with pytest.raises(OSError, match=f'^cannot prepare {re.escape(out)}: No space left on device$') as e:
        data.prepare(str(tmp_path), out, 16)
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(out) == []  # no shard, no index: the next run prepares it anew


def test_resolve_data_errors_and_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match='--data'):
        data.resolve_data(str(tmp_path / 'missing'), 16)
    with pytest.raises(ValueError, match='empty dataset'):
        data.resolve_data(str(tmp_path), 16)
    _write_npz(tmp_path, 'a.npz', 8)
    out = data.resolve_data(str(tmp_path), 16)
    assert out == str(tmp_path / '.prepared_16') and data.resolve_data(str(tmp_path), 16) == out
    assert data.resolve_data(out, 16) == out
    with pytest.raises(ValueError, match='res=16'):
        data.resolve_data(out, 32)


def test_prepare_and_clip_sampler(tmp_path):
    d = data.prepare_from_sim(str(tmp_path / 'p'), episodes=6, T=10, res=16, seed=0, shard_frames=25)
    meta = json.load(open(os.path.join(d, 'index.json')))
    assert len(meta['shards']) == 3 and sum(s['frames'] for s in meta['shards']) == 60
    s = data.ClipSampler(d, clip_len=4, val_frac=0.2)
    b = s.sample(5)
    assert b['frames'].shape == (5, 4, 3, 16, 16) and b['frames'].dtype == torch.float32  # as the model takes them
    assert b['actions'].shape == (5, 3, 2) and b['states'].shape == (5, 4, 8) and str(b['actions'].dtype) == 'torch.float32'
    for k in range(5):
        i, t = int(b['episode'][k]), int(b['start'][k])
        ep = s.get_episode(i)
        assert np.array_equal(data.to_uint8(b['frames'][k:k + 1])[0], ep['frames'][t:t + 4])
        assert np.array_equal(b['actions'][k].numpy(), ep['actions'][t:t + 3])
        assert np.array_equal(b['states'][k].numpy(), ep['states'][t:t + 4])
        assert i in s.episodes('train')
    ref = generate_episode(data.episode_seed(0, 2), 10, 16)
    ep = s.get_episode(2)
    assert all(np.array_equal(ep[k], ref[k]) for k in ('frames', 'actions', 'states'))
    train, val = set(s.episodes('train')), set(s.episodes('val'))
    assert len(val) == 1 and not train & val and train | val == set(range(6))
    assert set(data.ClipSampler(d, 4, split='val', val_frac=0.2).sample(8)['episode'].tolist()) == val
    # ranks differ, same (seed, rank) repeats, and the RNG state resumes exactly
    r0, r1 = data.ClipSampler(d, 4, rank=0, world_size=2), data.ClipSampler(d, 4, rank=1, world_size=2)
    assert not np.array_equal(r0.sample(8)['frames'], r1.sample(8)['frames'])
    again = data.ClipSampler(d, 4, rank=1, world_size=2)
    again.sample(8)
    sd = again.state_dict()
    nxt = again.sample(8)['frames']
    assert np.array_equal(r1.sample(8)['frames'], nxt)
    fresh = data.ClipSampler(d, 4, rank=1, world_size=2)
    fresh.load_state_dict(sd)
    assert np.array_equal(fresh.sample(8)['frames'], nxt)
    with pytest.raises(ValueError, match='11 frames'):
        data.ClipSampler(d, 11)


def test_interrupted_prepare_leaves_no_dataset(tmp_path, monkeypatch):
    for i in range(4):
        _write_npz(tmp_path, f'e{i}.npz', 6, seed=i)
    out = str(tmp_path / 'p')
    data.prepare(str(tmp_path), out, 16, shard_frames=6)  # a previous, complete dataset
    real, calls = data.load_episode, []

    def flaky(path, res):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, res)
    monkeypatch.setattr(data, 'load_episode', flaky)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(str(tmp_path), out, 16, shard_frames=6)
    assert os.listdir(out) == []


def test_default_dataset_is_cached(tmp_path):
    a = data.default_dataset(res=16, episodes=3, T=6, seed=1, root=str(tmp_path))
    mtime = os.path.getmtime(os.path.join(a, 'index.json'))
    assert data.default_dataset(res=16, episodes=3, T=6, seed=1, root=str(tmp_path)) == a
    assert os.path.getmtime(os.path.join(a, 'index.json')) == mtime
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(a)]
    assert data.ClipSampler(a, 6).sample(2)['frames'].shape == (2, 6, 3, 16, 16)


@pytest.mark.slow
def test_runs_started_together_prepare_one_folder_once(tmp_path):
    folder = str(tmp_path / 'eps')
    data.write_episodes(folder, 40, seed=5, T=48, res=64)
    procs = [in_subprocess('prepare_when_told', folder, tmp_path / f'ready{k}', tmp_path / 'go', stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for k in range(3)]
    while not all((tmp_path / f'ready{k}').exists() for k in range(3)):
        assert all(p.poll() is None for p in procs), procs[0].communicate()
    (tmp_path / 'go').touch()
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-800:] for _, err in outs]
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1  # the same frames in all three ...
    assert outs[0][0].strip().splitlines()[-1].startswith('40 ')  # ... every episode of them
    assert sum(out.count('prepared ') for out, _ in outs) == 1  # one prepared, the others waited for it


@pytest.mark.slow
def test_a_run_killed_while_preparing_leaves_nothing_that_looks_finished(tmp_path):
    folder, marker = str(tmp_path / 'eps'), str(tmp_path / 'preparing')
    data.write_episodes(folder, 12, seed=5, T=12, res=32)
    p = in_subprocess('prepare_slowly', folder, marker)
    while not os.path.exists(marker):
        assert p.poll() is None
    time.sleep(0.5)  # a few episodes into the first shard
    p.kill()
    p.wait()
    prepared = os.path.join(folder, '.prepared_16')
    assert any(f.endswith('.tmp') for f in os.listdir(prepared)) and not os.path.exists(os.path.join(prepared, 'index.json'))
    train(str(tmp_path / 'run'), '--pretrain_steps=2', '--warmup_steps=0', '--joint_steps=0', '--eval_clips=0',
          data_dir=folder)  # the lock died with its holder: this run prepares again and trains
    assert len(data.ClipSampler(prepared, 4, 'train').index) == 12


def test_failed_atomic_save_removes_its_temp_file_and_names_the_cause(tmp_path):
    """A write that fails (a full disk: torch.save raises RuntimeError('unexpected pos') with the OSError in its
    context) leaves the earlier file as it was and no temporary file, and says which file and why."""
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(b'good')

    def full_disk(f):
        f.write(b'x' * 1000)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    with pytest.raises(OSError, match=f'cannot write {re.escape(str(path))}: No space left on device'):
        data.atomic_save(str(path), full_disk)
    with pytest.raises(ValueError, match='not an OSError'):  # a failure the system did not explain stays as it was
        data.atomic_save(str(path), lambda f: (f.write(b'x'), (_ for _ in ()).throw(ValueError('not an OSError'))))
    assert os.listdir(tmp_path) == ['ckpt.pt'] and path.read_bytes() == b'good'


@pytest.mark.slow
def test_atomic_torch_save_is_safe_for_concurrent_writers(tmp_path):
    """Two processes saving the same file at once (two evaluations caching one state probe, as experiments.py
    runs them) both succeed and leave a whole file: each writes its own temporary name before the rename."""
    path = tmp_path / 'probe.pt'
    procs = [in_subprocess('save_often', path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert torch.equal(torch.load(path)['w'], torch.ones(200, 200)) and os.listdir(tmp_path) == ['probe.pt']


# ----------------------------------------------------------------------------------------------------
# lerobot.py: simulator episodes written in both layouts, read back, trained on

def test_lerobot_layouts_read_back(lerobot_sets):
    import av
    import lerobot
    eps, v30, v21, codec = lerobot_sets
    assert codec in lerobot.AV1_ENCODERS, f"no AV1 encoder in this PyAV build ({codec}): the v3.0 test ran on H.264"
    files = lambda root, sub: sorted(os.listdir(os.path.join(root, sub)))
    assert files(v30, 'videos/observation.image/chunk-000') == [f'file-{i:03d}.mp4' for i in range(5)]
    assert files(v30, 'data/chunk-000') == ['file-000.parquet', 'file-001.parquet']
    assert files(v21, 'videos/chunk-000/observation.image') == [f'episode_{i:06d}.mp4' for i in range(9)]
    for root, version, want in ((v30, 'v3.0', 'av1'), (v21, 'v2.1', 'h264')):
        video = os.path.join(root, json.load(open(os.path.join(root, 'meta/info.json')))['video_path'].format(
            video_key='observation.image', chunk_index=0, file_index=0, episode_chunk=0, episode_index=0))
        with av.open(video) as c:
            assert c.streams.video[0].codec_context.name in ((want,) if want == 'h264' else ('av1', 'libdav1d'))
        src = lerobot.Source(root)
        assert src.version == version
        assert src.camera == 'observation.image' and src.names == [f'episode_{i:06d}' for i in range(9)]
        frames = []
        for k, ref in enumerate(eps):
            ep = src.load(k)
            frames.append(ep['frames'])
            assert np.array_equal(ep['actions'], ref['actions']) and np.array_equal(ep['states'], ref['states'])
            assert ep['frames'].shape == ref['frames'].shape and ep['frames'].dtype == np.uint8
            # every frame, the first and last of each episode included, is its own (yuv420p: chroma at half size)
            worst = min(_psnr(f, g) for f, g in zip(ep['frames'], ref['frames']))
            assert worst > 25, (root, k, worst)
        again = lerobot.Source(root)  # out of order: v3.0 seeks into a file (episode 3 starts at 1.2 s) and back
        assert all(np.array_equal(again.load(k)['frames'], frames[k]) for k in (3, 2, 8, 0))
        # a stride keeps every 2nd frame and state; an action is the mean of the two it spans
        ep, ref = lerobot.Source(root, stride=2).load(2), eps[2]  # 12 frames -> 6
        assert ep['frames'].shape[0] == 6 and np.array_equal(ep['states'], ref['states'][::2])
        assert np.allclose(ep['actions'], ref['actions'][:10].reshape(5, 2, 2).mean(1))


def test_lerobot_tasks_come_back_from_the_index(lerobot_sets):
    """LeRobot v3.0 reads meta/tasks.parquet with pandas and takes each task's string from the table's index."""
    pd = pytest.importorskip('pandas')
    tasks = pd.read_parquet(os.path.join(lerobot_sets[1], 'meta', 'tasks.parquet'))
    assert tasks.index.tolist() == ['push the blocks'] and tasks.columns.tolist() == ['task_index']
    assert tasks.iloc[0].name == 'push the blocks' and tasks.loc['push the blocks', 'task_index'] == 0


@pytest.mark.slow
def test_lerobot_images_in_parquet_read_back_and_train(tmp_path):
    """LeRobot's use_videos=False: PNG frames in the data parquet (Hugging Face's Image struct), both layouts;
    read back exactly (PNG is lossless), strided, and trained on."""
    pytest.importorskip('pyarrow')
    import lerobot
    eps = [generate_episode(data.episode_seed(5, i), 8 + i, 16) for i in range(4)]
    for version in ('v3.0', 'v2.1'):
        root = str(tmp_path / version)
        assert lerobot.write_dataset(root, iter(eps), version=version, videos=False) == 'png'
        info = json.load(open(os.path.join(root, 'meta/info.json')))
        assert info['features']['observation.image']['dtype'] == 'image' and not os.path.exists(os.path.join(root, 'videos'))
        src = lerobot.Source(root)
        for k in (2, 0, 3):
            ep = src.load(k)
            assert np.array_equal(ep['frames'], eps[k]['frames']) and np.array_equal(ep['actions'], eps[k]['actions'])
        assert np.array_equal(lerobot.Source(root, stride=2).load(1)['frames'], eps[1]['frames'][::2])
    out = str(tmp_path / 'run')
    train(out, '--pretrain_steps=1', '--warmup_steps=1', '--joint_steps=1', '--eval_clips=0', data_dir=str(tmp_path / 'v3.0'))
    assert ckpt(out)['step'] == 3


@pytest.mark.slow
def test_lerobot_train_and_eval(lerobot_sets, tmp_path):
    """train.py on each layout (CoLA on v3.0, real actions on v2.1), eval.py's probe against the parquet actions."""
    eps, v30, v21, _ = lerobot_sets
    out = str(tmp_path / 'cola')
    train(out, '--pretrain_steps=2', '--warmup_steps=2', '--joint_steps=1', '--eval_clips=0', data_dir=v30)
    prepared = os.path.join(v30, '.prepared_16_observation.image')
    assert ckpt(out)['config']['camera'] == '' and os.path.exists(os.path.join(prepared, 'index.json'))
    s = data.ClipSampler(prepared, 4)
    assert all(np.array_equal(s.get_episode(k)['actions'], eps[k]['actions']) for k in range(9))
    r = run('eval.py', f'--ckpt={out}/ckpt.pt', *FAST, '--adapter_steps=5', '--adapter_episodes=3', '--n_episodes=4')
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert math.isfinite(res['probe_r2']) and len(res['probe_r2_per_dim']) == 2 and 'linear probe' in r.stdout
    train(str(tmp_path / 'act'), '--mode=actions', '--actions_steps=2', '--eval_clips=0', data_dir=v21)
    assert ckpt(str(tmp_path / 'act'))['step'] == 2


@pytest.mark.slow
def test_lerobot_bad_input_one_line_errors(lerobot_sets, tmp_path, monkeypatch):
    import shutil
    import lerobot
    eps, v30, v21, _ = lerobot_sets
    copy = lambda src, name: shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns('.prepared*'))
    version = copy(v30, 'version')
    info = json.load(open(version / 'meta/info.json'))
    json.dump({**info, 'codebase_version': 'v9.9'}, open(version / 'meta/info.json', 'w'))
    missing = copy(v21, 'missing')
    os.remove(missing / 'videos/chunk-000/observation.image/episode_000003.mp4')
    mismatch = copy(v21, 'mismatch')  # episode 0 (10 rows) gets episode 2's video (12 frames)
    shutil.copy(mismatch / 'videos/chunk-000/observation.image/episode_000002.mp4',
                mismatch / 'videos/chunk-000/observation.image/episode_000000.mp4')
    cases = [([f'--data={version}'], "unknown codebase_version 'v9.9'"),
             ([f'--data={v30}', '--camera=wrist'], '--camera=wrist is not a camera of'),
             ([f'--data={missing}'], 'episode_000003.mp4: missing video'),
             ([f'--data={mismatch}'], 'episode 0 has 12 frames in the video but 10 rows in')]
    for flags, msg in cases:
        r = train(str(tmp_path / 'o'), *flags, check=False)
        last = r.stderr.strip().splitlines()[-1]  # after the progress bar of preparing, if it got that far
        assert r.returncode == 2 and last.startswith('train.py: error: ') and msg in last, (flags, r.stderr[-500:])
        assert 'Traceback' not in r.stderr, r.stderr
    # --skip_bad: a bad episode is skipped with a warning naming it; an unreadable video as well
    (mismatch / 'videos/chunk-000/observation.image/episode_000005.mp4').write_bytes(b'not a video')
    with pytest.warns(UserWarning) as rec:
        out = data.prepare(str(mismatch), str(tmp_path / 'p'), 16, skip_bad=True)
    msgs = [str(w.message) for w in rec]
    assert any('12 frames in the video' in m for m in msgs) and any('cannot read video' in m and 'episode_000005' in m for m in msgs)
    kept = [e['source'] for e in json.load(open(os.path.join(out, 'index.json')))['episodes']]
    assert kept == [f'episode_{i:06d}' for i in (1, 2, 3, 4, 6, 7, 8)]
    # without pyarrow or av, one line says what to install
    monkeypatch.setattr(lerobot.importlib, 'import_module', lambda name: (_ for _ in ()).throw(ImportError(name)))
    with pytest.raises(ValueError, match='requirements-lerobot.txt'):
        lerobot.Source(v30)


# ----------------------------------------------------------------------------------------------------
# sim.py

def test_simulator_is_deterministic():
    a, b, c = generate_episode(3, 12, 32), generate_episode(3, 12, 32), generate_episode(4, 12, 32)
    for k in ('frames', 'actions', 'states'):
        assert a[k].tobytes() == b[k].tobytes()
    assert a['frames'].shape == (12, 32, 32, 3) and a['actions'].shape == (11, 2) and a['states'].shape == (12, 8)
    assert not np.array_equal(a['frames'], c['frames'])
    # Appearance is drawn after the layout, so dynamics do not depend on the resolution.
    assert np.array_equal(a['states'], generate_episode(3, 12, 16)['states'])


def test_actions_align_with_frames_and_state_round_trips():
    ep = generate_episode(5, 16, 32, noise=0)
    sim = PushSim(32, 5)
    assert np.array_equal(sim.render(), ep['frames'][0])
    for t in range(15):
        sim.set_state(ep['states'][t])
        assert np.array_equal(sim.render(), ep['frames'][t])
        assert np.array_equal(sim.step(ep['actions'][t]), ep['frames'][t + 1])
        assert np.array_equal(sim.get_state(), ep['states'][t + 1])
    before = sim.get_state()
    sim.step([0.0, 0.0])
    assert np.array_equal(sim.get_state(), before)
    sim.step([5.0, 0.0])  # clipped to 1: at most the world's speed
    assert 0 < abs(sim.get_state()[0] - before[0]) <= sim.speed + 1e-6 or before[0] >= 1 - sim.r - 1e-6
    # absent blocks are zeros
    assert np.all(sim.get_state()[2 + 2 * sim.n_blocks:] == 0)


def test_recorded_frames_carry_sensor_noise_only():
    clean, noisy = generate_episode(5, 16, 32, noise=0), generate_episode(5, 16, 32)
    diff = noisy['frames'].astype(float) - clean['frames']
    assert abs(diff.std() - SENSOR_NOISE) < 0.2 and abs(diff.mean()) < 0.1
    assert np.array_equal(noisy['states'], clean['states']) and np.array_equal(noisy['actions'], clean['actions'])


def test_render_is_antialiased_and_subpixel_motion_shows():
    sim = PushSim(32, 0)
    s = sim.get_state()
    a = sim.render().astype(float)
    s[0] += 0.1 / 32  # a tenth of a pixel to the right
    sim.set_state(s)
    b = sim.render().astype(float)
    assert 0 < np.abs(b - a).sum() and np.abs(b - a).max() < 60  # visible, and only as a partial-coverage change
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 10  # edge pixels blend body and background


def test_random_policy_is_iid_over_the_nine_moves():
    acts = generate_episode(0, 400, 16, policy='random')['actions']
    moves, counts = np.unique(acts, axis=0, return_counts=True)
    assert len(moves) == 9 and set(np.unique(moves)) == {-1, 0, 1} and counts.min() > 20
    assert abs(np.corrcoef(acts[:-1, 0], acts[1:, 0])[0, 1]) < 0.15  # no memory from step to step
    with pytest.raises(ValueError, match='--policy'):
        generate_episode(0, 4, 16, policy='nope')


def test_pushing_moves_blocks_and_keeps_them_apart():
    moved = 0
    for seed in range(10):
        st = generate_episode(seed, 32, 16)['states']
        moved += np.abs(np.diff(st[:, 2:], axis=0)).max() > 0.02
        sim = PushSim(16, seed)
        for s in st:  # no two bodies overlap (bounding boxes), everything inside the walls
            pos, half = s.reshape(-1, 2)[:1 + sim.n_blocks], np.array(sim.half)
            assert np.all(pos - half[:, None] >= -1e-5) and np.all(pos + half[:, None] <= 1 + 1e-5)
            for i in range(len(pos)):
                for j in range(i + 1, len(pos)):
                    assert np.max(np.abs(pos[i] - pos[j]) - half[i] - half[j]) >= -1e-5
    assert moved >= 7


def test_blocked_block_stops_the_agent():
    sim = PushSim(32, 0)
    sim.n_blocks, sim.half = 1, [sim.r, sim.h[0]]
    wall = 1 - sim.h[0]
    sim.set_state([wall - sim.h[0] - sim.r - 0.01, 0.5, wall, 0.5])  # block against the right wall
    for _ in range(3):
        sim.step([1, 0])
    x, _, bx, _ = sim.get_state()[:4]
    assert bx == pytest.approx(wall) and x == pytest.approx(wall - sim.h[0] - sim.r, abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# pusht.py

@pytest.mark.slow
@needs_pusht
def test_pusht_recording_aligns_frames_and_actions(tmp_path):
    ep = pusht.generate_pusht_episode(3, T=12, noise=0)
    assert ep['frames'].shape == (12, 64, 64, 3) and ep['actions'].shape == (11, 2) and ep['states'].shape == (12, 10)
    # smooth exploration: the agent never jumps (<= ~3 px of 64 per step; uniform random targets move it ~30)
    assert np.abs(np.diff(ep['states'][:, :2], axis=0)).max() < 40 and np.abs(ep['actions']).max() <= 1
    sim = pusht.PushT(seed=3)
    assert np.array_equal(sim.render(), ep['frames'][0])
    for t, a in enumerate(ep['actions']):  # frame t+1 is the env's render after actions[t]
        assert np.array_equal(sim.step(a), ep['frames'][t + 1]), t
    # set_state(get_state()) resumes the trajectory (the oracle planner relies on it)
    s, after = sim.get_state(), [sim.step(a) for a in ep['actions'][:3]]
    sim.set_state(s)
    assert max(np.abs(sim.step(a).astype(int) - f).mean() for a, f in zip(ep['actions'][:3], after)) < 0.5
    # the CLI writes the same episodes; data.py itself does not import gym_pusht
    r = run('data.py', '--env=pusht', f'--out_dir={tmp_path}', '--episodes=2', '--T=6', '--seed=0')
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(tmp_path / 'ep_000001.npz') as z:
        assert np.array_equal(z['frames'], pusht.generate_pusht_episode(1, T=6)['frames'])
    loaded = subprocess.run([sys.executable, '-c', 'import sys, data; print(*sys.modules)'], cwd=HERE, capture_output=True,
                            text=True).stdout.split()
    assert 'data' in loaded and 'gym_pusht' not in loaded and 'pymunk' not in loaded


# ----------------------------------------------------------------------------------------------------
# state_probe.py

def test_state_probe_readout_finds_objects_in_any_order():
    states = torch.tensor([[0.5, 0.5, 0.2, 0.3, 0.8, 0.7, 0.0, 0.0]])  # agent, two blocks, an absent third
    heat = state_probe.object_maps(states, 8, 32)  # what a perfect probe draws
    d = state_probe.object_distances(heat, states)
    assert d['agent'].item() < 0.005 and d['blocks'].item() < 0.005  # sub-pixel: a pixel is 0.031 wide
    swapped = states[:, [0, 1, 4, 5, 2, 3, 6, 7]]
    assert state_probe.object_distances(heat, swapped)['blocks'].item() < 0.005  # the blocks' order does not matter
    moved = states.clone()
    moved[0, 0] += 0.1  # the agent drawn 0.1 to the right, and the second block gone from the frame
    moved[0, 4:6] = 0
    d = state_probe.object_distances(state_probe.object_maps(moved, 8, 32), states)
    assert d['agent'].item() == pytest.approx(0.1, abs=0.005) and d['blocks'].item() == pytest.approx(0.25, abs=0.005)
    assert state_probe.state_layout(8)[1] == [(2, 3), (4, 5), (6, 7)] and state_probe.state_layout(10)[1] == [(2, 3)]  # PushT: the T


@pytest.mark.slow
def test_state_probe_learns_positions_and_is_cached(tmp_path):
    """The probe fits object positions on its training frames (its held-out error on the built-in data is in
    the README) and is cached beside the data, so every checkpoint is measured by the same instrument."""
    d = data.prepare_from_sim(str(tmp_path / 'p'), episodes=12, T=12, res=16)
    sampler = data.ClipSampler(d, 4, 'val')
    probe = state_probe.load_state_probe(sampler, steps=400)
    assert os.path.isfile(os.path.join(d, 'state_probe.pt'))
    eps = [sampler.get_episode(i) for i in sampler.episodes('train')]
    frames = data.to_model(torch.from_numpy(np.stack([e['frames'] for e in eps])))
    states = torch.from_numpy(np.stack([e['states'] for e in eps]))
    err = state_probe.state_errors(probe, frames, states)
    mean_pos = states[..., :2].flatten(0, 1).mean(0)  # always guessing the mean position
    assert err['agent'].mean() < 0.5 * (states[..., :2] - mean_pos).norm(dim=-1).mean()
    again = state_probe.state_errors(state_probe.load_state_probe(sampler), frames, states)  # loaded from the cache
    assert torch.equal(again['agent'], err['agent'])


# ----------------------------------------------------------------------------------------------------
# experiments.py: the whole runner at toy size, then its resume

@pytest.mark.slow
def test_experiments_runner_writes_results_and_resumes(tmp_path):
    res_dir, runs_dir = tmp_path / 'results', tmp_path / 'runs'
    cmd = [sys.executable, os.path.join(HERE, 'experiments.py'), '--envs=sim', '--seeds=0,1',
           '--schedules=init,cola,two_stage', '--budget=7', '--warmup=2', '--pretrain_steps=2', '--res=16',
           '--train_args=' + ' '.join(TINY_TRAIN[1:14]), '--eval_args=' + ' '.join(FAST + ['--adapter_steps=5',
           '--n_episodes=4']), '--plan_args=--n_tasks=1 --max_steps=2 --horizon=2 --exec_steps=1 --n_samples=4',
           '--workers=2', f'--runs_dir={runs_dir}', f'--out_dir={res_dir}']
    env = {**os.environ, 'COLA_DATA': str(tmp_path / 'cache')}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / 'cache').glob('sim_*/state_probe.pt'))) == 1  # train.py fitted the built-in data's
    runs = {f: json.load(open(res_dir / 'sim' / f)) for f in ('cola_s0.json', 'cola_s1.json', 'two_stage_s0.json')}
    cola_run = runs['cola_s0.json']
    assert [c['phase'] for c in cola_run['curves']] == ['warmup'] * 2 + ['joint'] * 5
    assert sorted(cola_run['eval_at']) == ['2', '4'] and runs['two_stage_s0.json']['eval_at'] == {}
    assert cola_run['eval_at']['2']['psnr'] != cola_run['eval']['psnr']  # measured at the end of the warm-up
    assert len(cola_run['eval']['probe_r2_per_dim']) == 2 and cola_run['plan']['reach_ours_success'] in (0.0, 1.0)
    assert runs['cola_s0.json']['curves'] != runs['cola_s1.json']['curves']  # seeds differ
    table = open(res_dir / 'results.md').read()
    assert '| cola | warm-up 2 + joint 5 | 2 |' in table and '| two_stage | LAM 3 + WM 4 | 2 |' in table
    assert '- **joint training beats two-stage**:' in table and '  - probe_r2: cola ' in table  # the verdicts
    assert 'cola at step 4' in table and 'minutes from scratch' in table  # the 2/3 point; the time of the whole
    assert '| init | none: the pretrained WM, a random IDM | 2 |' in table
    init = json.load(open(res_dir / 'sim' / 'init_s1.json'))
    assert init['curves'] == [] and math.isfinite(init['eval']['psnr_gain_over_null'])  # measured, never trained
    assert torch.equal(torch.load(runs_dir / 'sim' / 'init_s1' / 'ckpt.pt', weights_only=False)['wm']['pos_time'],
                       torch.load(runs_dir / 'sim' / 'pretrain' / 'ckpt.pt', weights_only=False)['wm']['pos_time'])
    if importlib.util.find_spec('matplotlib'):
        assert (res_dir / 'sim_codebook.png').stat().st_size > 0 and (res_dir / 'sim_grads.png').exists()
    # resume: finished runs are skipped; a run whose JSON is gone is redone from its checkpoint, same figures
    os.remove(res_dir / 'sim' / 'cola_s1.json')
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(': skipped') == 5 and 'sim cola seed 1: done' in r.stdout
    again = json.load(open(res_dir / 'sim' / 'cola_s1.json'))
    figures = lambda e: {k: v for k, v in e.items() if k != 'wall_s'}
    assert figures(again['eval']) == figures(runs['cola_s1.json']['eval']) and again['curves'] == runs['cola_s1.json']['curves']


# ----------------------------------------------------------------------------------------------------
# configurator.py

def test_tuple_settings_take_comma_lists():
    from configurator import parse_value
    assert parse_value('presets', 'base', ('cpu', 'base')) == ('base',)
    assert parse_value('presets', 'cpu, base', ('cpu', 'base')) == ('cpu', 'base')
    assert parse_value('fsq_levels', '8,4', (8, 4)) == (8, 4) and parse_value('fsq_levels', '5', (8, 4)) == (5,)


def test_renamed_settings_keep_their_old_flags(tmp_path):
    """A program's RENAMED maps old names to new ones, on the command line and in config files; the settings
    returned (what a checkpoint saves) carry the new names only; a constant (CAPITALISED) is no setting."""
    from configurator import configure
    (tmp_path / 'old.py').write_text('lr_warmup = 7\n')
    settings = dict(euler_steps=2, lr_ramp=50, TOL=0.05, RENAMED={'sample_steps': 'euler_steps', 'lr_warmup': 'lr_ramp'})
    config = configure(settings, [str(tmp_path / 'old.py'), '--sample_steps=3'])
    assert config == dict(euler_steps=3, lr_ramp=7)


@pytest.mark.slow
@pytest.mark.parametrize('program', ['train.py', 'eval.py', 'sample.py', 'plan.py', 'play.py', 'bench.py', 'experiments.py'])
def test_help_lists_every_setting_with_its_default_and_comment(program):
    """--help and -h print the docstring and the settings block as the file writes it, and exit 0: every flag
    that the program accepts is there, with its default."""
    helped = run(program, '--help')
    assert helped.returncode == 0 and helped.stderr == '', helped.stderr[-500:]
    src = open(os.path.join(HERE, program)).read()
    if program == 'train.py':  # the flags it accepts, as its error lists them (one run: each costs seconds)
        valid = [f[2:] for f in run(program, '--no_such_flag=1').stderr.split('valid flags: ')[1].split()]
        assert run(program, '-h').stdout == helped.stdout
        assert "lr = 1e-3               # peak learning rate" in helped.stdout
    else:  # the lower-case names the file gives a plain value at module level
        valid = [t.id for n in ast.parse(src).body if isinstance(n, ast.Assign) and isinstance(n.value, (ast.Constant, ast.Tuple))
                 for t in n.targets if isinstance(t, ast.Name) and t.id.islower() and not t.id.startswith('_')]
    for flag in valid:
        line = next(l for l in helped.stdout.splitlines() if l.startswith(f'{flag} = '))
        assert line in src.splitlines()  # the file's own line: default and comment
    assert src.split('"""')[1].strip().splitlines()[0] in helped.stdout  # the docstring's first line
