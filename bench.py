"""
Throughput: the built-in simulator and the clip sampler, then the CoLA joint step (IDM -> quantizer ->
action encoder -> video DiT, flow loss, backward, Muon + AdamW, or `--optimizer=adamw`) at the CPU default and the GPU
"base" preset.

  python bench.py                      # everything on the default device
  python bench.py --presets=cpu --steps=20
  python bench.py --presets=           # the simulator and the sampler only

The simulator: frames/s of step + render at 64 px, of whole episodes under the exploration policy (and the
fraction of steps in which a block moved), and ClipSampler clips/s (B=16, T=6) from shards on disk.

Prints ms/step and tokens/s (tokens = clips x frames x patches per frame). On CUDA it also prints model
FLOPs utilisation against `peak_tflops` (bf16 dense). On CPU it also times a bare transformer with the
same parameter count on the same tokens, so the cost of everything around the matrix products (the
factorised attention, adaLN, quantizer, patchify) shows as a ratio.
"""
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from cola import CoLAWorld
from configurator import configure
from data import ClipSampler, prepare_from_sim
from model import Block
from sim import PushSim, generate_episode

presets = ('cpu', 'base')
batch_size = 16           # clips per step at the cpu preset
base_batch_size = 0       # clips per step at the base preset; 0 = 1 on CPU, 16 on CUDA
steps = 10                # timed steps (after 2 warm-up steps)
optimizer = 'muon'        # 'muon' (on the hidden matrices, AdamW on the rest) | 'adamw': train.py's --optimizer
device = ''
peak_tflops = 989.0       # H100/H200 SXM bf16 dense
seed = 0
configure(globals(), sys.argv[1:])
device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
cuda = device.startswith('cuda')
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else torch.autocast('cpu', enabled=False)


def timed(step_fn, n):
    """Mean seconds per call of step_fn over n calls, after 2 untimed warm-up calls."""
    for _ in range(2):
        step_fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def cola_step(model, x):
    """One joint-phase step of the model's own loss and optimizer (CoLAWorld.forward, configure_optimizers),
    as train.py runs it, soft-to-hard quantization on."""
    model.set_phase('joint')
    opts, params = model.configure_optimizers('joint', lr=1e-4, fused=cuda, muon=optimizer == 'muon')

    def step():
        with autocast:
            loss = model(x, 'joint', p_relax=0.5)['loss']
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def bare_step(blocks, opt, h):
    """Forward/backward/AdamW of a plain transformer stack on (B*T, N, D) tokens: the matmul floor."""
    def step():
        y = h
        for blk in blocks:
            y = blk(y)
        F.mse_loss(y, h).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def data_throughput(res=64, n=5000):
    """Print simulator frames/s, the fraction of steps in which a block moved, and ClipSampler clips/s."""
    sim, acts = PushSim(res, 0), np.random.default_rng(0).uniform(-1, 1, (n, 2))
    t0 = time.perf_counter()
    for a in acts:
        sim.step(a)
    print(f"simulator step+render: {n / (time.perf_counter() - t0):,.0f} frames/s at {res}x{res}")
    t0, moved = time.perf_counter(), []
    for s in range(n // 50):
        st = generate_episode(s, 50, res)['states']
        moved.append(np.abs(np.diff(st[:, 2:], axis=0)).max(1) > 1e-6)
    print(f"generate_episode: {n / (time.perf_counter() - t0):,.0f} frames/s; steps where a block moved: {np.mean(moved):.1%}")
    with tempfile.TemporaryDirectory() as d:
        sampler = ClipSampler(prepare_from_sim(d, 40, 32, res), clip_len=6)
        t0 = time.perf_counter()
        for _ in range(1000):
            sampler.sample(16)
        print(f"ClipSampler: {1000 * 16 / (time.perf_counter() - t0):,.0f} clips/s (B=16, T=6)")


data_throughput()
torch.manual_seed(seed)
print(f"device {device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} threads'}), "
      f"torch {torch.__version__}")
for name in presets:
    s = dict(preset=name)  # the other settings: the dataclasses' defaults, those of `python train.py`
    model = CoLAWorld(s).to(device)
    wm_cfg = model.wm.cfg
    n_params = sum(p.numel() for p in model.parameters())
    B = batch_size if name == 'cpu' else (base_batch_size or (16 if cuda else 1))
    T, N, D = wm_cfg.n_frames, (wm_cfg.res // wm_cfg.patch) ** 2, wm_cfg.width
    x = torch.rand(B, T, 3, wm_cfg.res, wm_cfg.res, device=device) * 2 - 1
    sec = timed(cola_step(model, x), steps if name == 'cpu' or cuda else max(1, steps // 5))
    tokens = B * T * N
    line = f"{name:5s} {n_params / 1e6:7.1f}M params, {B} x {T} frames x {N} tokens: {1000 * sec:9.1f} ms/step, " \
           f"{tokens / sec:10.0f} tokens/s"
    if cuda:
        # matmul FLOPs: 6 per parameter per token for the IDM and the DiT (the action encoder sees T tokens
        # per clip, negligible), plus attention scores/values: 12 * L * D per token per attention layer
        depth = wm_cfg.depth
        flops = 6 * (n_params - sum(p.numel() for p in model.action.parameters())) * tokens \
            + 2 * depth * 12 * (N + T) * D * tokens
        line += f", MFU {flops / sec / (peak_tflops * 1e12):.1%}"
    else:
        # a bare transformer of the same parameter count: Blocks of width D have ~12 D^2 parameters
        blocks = torch.nn.ModuleList(Block(D, wm_cfg.n_heads) for _ in range(max(1, round(n_params / (12 * D * D)))))
        h = torch.randn(B * T, N, D)
        bopt = torch.optim.AdamW(blocks.parameters(), lr=1e-4)
        bare = timed(bare_step(blocks, bopt, h), steps if name == 'cpu' else max(1, steps // 5))
        n_bare = sum(p.numel() for p in blocks.parameters())
        line += f"; bare transformer {n_bare / 1e6:.1f}M params: {1000 * bare:.1f} ms/step, overhead x{sec / bare:.2f}"
    print(line, flush=True)
    del model
