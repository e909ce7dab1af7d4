"""Tests of the measurements (cola.py), sample.py and eval.py; to be merged into test_all.py. Tiny shapes."""
import json
import math
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import cola
import data
from lam import LAM, VQ, LAMConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_TRAIN = ['--res=16', '--patch=4', '--width=32', '--depth=1', '--n_heads=2', '--act_width=32', '--act_depth=1',
              '--n_frames=4', '--action_dim=8', '--codebook_size=8', '--batch_size=2', '--eval_clips=0']
FAST = ['--horizon=6', '--n_clips=2', '--sample_steps=2']  # 2 context + 6 generated frames, 2 Euler steps


def run(program, *flags):
    """Run a program as users do; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(HERE, program), *flags], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    """A tiny CoLA checkpoint (pretrain -> warm-up -> joint, a few steps) trained on 8 simulator episodes."""
    d = data.prepare_from_sim(str(tmp_path_factory.mktemp('d') / 'p'), episodes=8, T=12, res=16)
    out = str(tmp_path_factory.mktemp('ck'))
    r = run('train.py', f'--out_dir={out}', f'--data={d}', *TINY_TRAIN, '--pretrain_steps=3', '--warmup_steps=3',
            '--joint_steps=2')
    assert r.returncode == 0, r.stderr[-3000:]
    return os.path.join(out, 'ckpt.pt')


def test_probe_recovers_linear_map_and_not_noise():
    g = torch.Generator().manual_seed(0)
    actions = torch.rand(3000, 2, generator=g) * 2 - 1
    latents = (actions @ torch.randn(2, 16, generator=g) + 0.5).view(-1, 2, 8)  # a known linear map, (N, n_tok, d)
    fit = cola.ridge_probe(latents[:2000], actions[:2000], latents[2000:], actions[2000:])
    assert fit['r2'] > 0.999 and fit['l1'] < 0.01 < fit['l1_mean']
    noise = torch.randn(3000, 2, 8, generator=g)
    fit = cola.ridge_probe(noise[:2000], actions[:2000], noise[2000:], actions[2000:])
    assert abs(fit['r2']) < 0.05 and fit['l1'] == pytest.approx(fit['l1_mean'], rel=0.05)
    constant = torch.ones(3000, 2, 8)  # a collapsed codebook: the probe predicts the mean, no blow-up
    fit = cola.ridge_probe(constant[:2000], actions[:2000], constant[2000:] + 1, actions[2000:])
    assert fit['l1'] == pytest.approx(fit['l1_mean'], abs=1e-6)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 2, 3, 24, 20, generator=g) * 2 - 1
    b = (a + 0.4 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    b[0, 0] = a[0, 0] * 0.5 + 0.2  # a contrast/brightness change as well as noise
    ours = cola.ssim(a, b)
    for i in range(2):
        for t in range(2):
            ref = structural_similarity(a[i, t].permute(1, 2, 0).double().numpy(), b[i, t].permute(1, 2, 0).double().numpy(),
                                        data_range=2.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, channel_axis=2)
            assert abs(ours[i, t].item() - ref) < 1e-3


def test_identical_clips_score_finite():
    a = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    assert torch.equal(cola.psnr(a, a), torch.full((2, 3), 100.0))  # the cap, not inf
    assert torch.allclose(cola.ssim(a, a), torch.ones(2, 3))
    p, s = cola.scores(a, a, 1)
    assert all(math.isfinite(x) for x in p + s) and len(p) == 2


def test_latent_actions_window_like_the_idm():
    lam = LAM(LAMConfig(res=16, patch=4, width=32, depth=1, n_heads=2, action_dim=8, codebook_size=8, max_frames=4)).eval()
    clips = torch.rand(2, 9, 3, 16, 16) * 2 - 1
    out = cola.latent_actions(lam, clips)
    assert out['z'].shape == (2, 8, 2, 8) and out['codes'].shape == (2, 8, 2)
    with torch.no_grad():  # windows of 4 frames sharing a frame: transitions 0-2, 3-5, 6-7
        want = torch.cat([lam(clips[:, s:s + 4])['z'] for s in (0, 3, 6)], 1)
    assert torch.allclose(out['z'], want, atol=1e-6)


def test_adapter_training_lowers_loss_and_feeds_the_quantizer():
    g = torch.Generator().manual_seed(0)
    actions = torch.rand(500, 2, generator=g) * 2 - 1
    z_e = torch.tanh(actions @ torch.randn(2, 16, generator=g)).view(-1, 2, 8)  # (N, n_tok, d)
    adapter, losses = cola.train_adapter(actions, z_e, steps=200)
    assert losses[-1] < 0.1 * losses[0]
    with torch.inference_mode():
        z, codes, _, _ = VQ(8, 8)(adapter(actions))
    assert z.shape == (500, 2, 8) and codes.min() >= 0 and codes.max() < 8


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


def test_eval_json_and_determinism(tiny_ckpt):
    flags = [f'--ckpt={tiny_ckpt}', *FAST, '--adapter_steps=30', '--adapter_episodes=3']
    runs = [run('eval.py', *flags) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:]
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    for prefix in ('', 'null_', 'copy_', 'adapter_'):
        for k in ('psnr', 'ssim'):
            assert math.isfinite(a[prefix + k]) and len(a[f'{prefix}{k}_per_step']) == 6
    for k in ('psnr_gain_over_null', 'probe_l1', 'probe_r2', 'probe_l1_mean', 'code_util', 'code_max',
              'code_entropy', 'code_perplexity', 'adapter_code_util', 'adapter_code_max', 'adapter_loss'):
        assert math.isfinite(a[k]), k
    assert not any('lpips' in k or 'fvd' in k for k in a)
    a.pop('wall_s'), b.pop('wall_s')
    assert a == b  # the same --seed gives the same figures


@pytest.mark.parametrize('program', ['sample.py', 'eval.py'])
def test_bad_checkpoint_is_one_line_error(program, tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    for path in (tmp_path / 'missing.pt', bad):
        r = run(program, f'--ckpt={path}')
        assert r.returncode == 2 and str(path) in r.stderr and len(r.stderr.strip().splitlines()) == 1
