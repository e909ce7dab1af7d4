"""
Train CoLA-World: the latent action model (LAM) learns through the world model (WM) that uses it.

  python train.py                                  # CPU default: pretrain -> warm-up -> joint, built-in data
  python train.py --mode=two_stage                 # the baseline: LAM + decoder, then WM on frozen latents
  python train.py --warmup_steps=0                 # naive joint training (the paper: it collapses)
  python train.py --mode=frozen_lam                # control: warm-up, then the WM alone on the frozen LAM
  python train.py --mode=actions                   # the ceiling: the WM driven by the dataset's real actions
  torchrun --nproc_per_node=8 train.py config/base.py --data=/path/to/videos

Phases, in the order the paper runs them (cola.CoLAWorld.PHASES says what each one trains):
  pretrain  the WM learns action-free video prediction; it stands in for a pretrained video generator
  warmup    WM weights frozen, but its activations stay in the graph: the flow loss trains IDM, quantizer
            and the new action-conditioning modules through it
  joint     everything trains together ("co-evolution")
  lam, wm   two-stage baseline: IDM + quantizer + pixel decoder, then the WM on the frozen LAM's latents;
            in --mode=actions the wm phase takes the real actions instead (cola.real_latents)
Settings are plain values below; override them with config/NAME.py and --key=value (configurator.py).
"""
import fcntl
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cola
import measure
from cola import CoLAWorld
from configurator import check, configure, fail
from data import ClipSampler, atomic_save, resolve_data
from lam import code_stats

# ----------------------------------------------------------------------------------------------------
# settings
out_dir = 'out'
data = ''               # folder of .npz episodes, videos, or prepared shards; '' = built-in simulator
policy = 'explore'      # built-in simulator: 'explore' (smooth motion and pushes) or 'random' (i.i.d. moves)
skip_bad = False        # skip unreadable data files with a warning instead of stopping
camera = ''             # LeRobot --data: the camera (video or image feature in meta/info.json); '' = the first
frame_stride = 1        # LeRobot --data: keep every Nth frame (for high-fps recordings)
init_from = ''          # start from this checkpoint's world model (then pretraining is skipped)
resume = False          # continue out_dir/ckpt.pt exactly where it stopped
stop_at = 0             # > 0: save and exit after this global step; --resume continues as if never stopped
log_interval = 10       # steps between log.jsonl records
ckpt_interval = 250     # steps between checkpoints
mode = 'cola'           # 'cola' | 'two_stage' | 'pretrain' | 'frozen_lam' | 'actions'
pretrain_steps = 2500   # action-free world-model steps: the paper's pretrained video generator, trained here
warmup_steps = 1000     # the paper's warm-up: the world model frozen, the IDM learns through it
joint_steps = 2100      # everything together (frozen_lam: the world model alone, on the frozen LAM)
lam_steps = 3000        # two-stage, stage 1: the LAM with its pixel decoder
lam_init_steps = 0      # > 0 (cola): the LAM first trains this many steps with the two-stage pixel decoder, before
                        # the warm-up (not in the paper; for small agents, NOTES.md "PushT")
wm_steps = 250          # two-stage, stage 2: the world model on the frozen LAM's latents
actions_steps = 5000    # --mode=actions: world-model steps on the real actions
# model: sizes left None take the preset's value (world_model.PRESETS)
preset = 'cpu'
res = None
patch = None
n_frames = None         # clip length T
width = None
depth = None
n_heads = None
act_width = None
act_depth = None
n_context = 2           # clean context frames of each clip
n_action_tokens = 2
action_dim = 32
quantizer = 'vq'        # 'vq' (noise substitution) | 'fsq' | 'none' (continuous latent actions)
codebook_size = 32
fsq_levels = (8, 4)
relax_anneal = 0.9      # soft-to-hard quantization: p_relax falls 1 -> 0 over this fraction of the LAM's steps (lam.LAM.forward)
idm_keypoints = 16      # the IDM reads the move from K keypoints' displacements (0 = the difference pooling alone)
idm_patch = None        # the IDM's patch; None = the world model's
dec_patch = None        # the two-stage decoder's patch; None = the IDM's
idm_depth = 2           # the IDM's spatial blocks
dec_depth = 2           # blocks of the two-stage decoder (built in --mode=two_stage only: cola.model_configs)
cond_drop = 0.1         # probability of the null action in training (classifier-free guidance)
motion_weight = 0.0     # > 0: pixels that changed since the frame before weigh 1 + motion_weight in the flow loss
                        # wherever actions drive the world model (warm-up, joint, wm; not pretraining)
recon_weight = 0.0      # > 0 (cola with --lam_init_steps): the pixel decoder's loss stays in the warm-up and joint
                        # phases beside the flow loss, weighted this much
# optimisation: one learning rate for every part, as in the paper
batch_size = 16         # clips per micro-batch per process
grad_accum = 1
optimizer = 'muon'      # 'muon': Muon on the hidden weight matrices, AdamW on the rest (cola.is_hidden_matrix) | 'adamw'
lr = 1e-3               # peak learning rate
actions_lr = 2e-3       # peak learning rate of --mode=actions
lr_ramp = 50            # steps of the linear LR ramp at the start of every phase (the paper's warm-up: warmup_steps)
lr_schedule = 'wsd'     # 'wsd' (warmup-stable-decay: constant, then linear to 0) | 'cosine' (to min_lr)
cooldown = 0.2          # wsd: the fraction of each phase that cools down
min_lr = 1e-4           # cosine: the rate it ends at
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.0         # > 0 keeps an EMA of the world model (saved as ema_wm)
# end-of-run summary on held-out episodes
eval_clips = 16
eval_len = 12
euler_steps = 2         # Euler steps per window of the summary's rollouts (as eval.py)
cfg_scale = 1.0
# system
device = ''             # 'cpu', 'cuda', 'cuda:N'; '' = cuda if available
seed = 0
compile = False
RENAMED = {'lr_warmup': 'lr_ramp', 'sample_steps': 'euler_steps'}  # old flags that still work
config = configure(globals(), sys.argv[1:])
# ----------------------------------------------------------------------------------------------------

# a mode is the list of phases it runs, in order (what each phase trains and what drives it: CoLAWorld.PHASES)
MODES = {'pretrain': [('pretrain', pretrain_steps)],
         'cola': [('pretrain', pretrain_steps), *([('lam', lam_init_steps)] if lam_init_steps > 0 else []),
                  ('warmup', warmup_steps), ('joint', joint_steps)],
         'two_stage': [('pretrain', pretrain_steps), ('lam', lam_steps), ('wm', wm_steps)],
         # the paper's Fig. 4b control: after the warm-up only the WM (and action modules) train on the frozen
         # LAM's latents, for joint_steps steps
         'frozen_lam': [('pretrain', pretrain_steps), ('warmup', warmup_steps), ('wm', joint_steps)],
         # the ceiling of every latent-action result: the WM and action modules trained on the dataset's real
         # actions, put in the latent-action slot (cola.real_latents); no pretraining, no LAM
         'actions': [('wm', actions_steps)]}
# bad settings stop here, in one line, before any data is prepared (the model's sizes: cola.model_configs)
check(config, positive=('batch_size', 'grad_accum', 'lr', 'actions_lr', 'log_interval', 'ckpt_interval', 'eval_len',
                        'euler_steps', 'grad_clip'),
      non_negative=('pretrain_steps', 'warmup_steps', 'joint_steps', 'lam_steps', 'lam_init_steps', 'wm_steps',
                    'actions_steps', 'stop_at', 'lr_ramp', 'min_lr', 'weight_decay', 'eval_clips', 'motion_weight',
                    'recon_weight', 'frame_stride'),
      fraction=('cond_drop', 'cooldown'),
      choices=dict(mode=tuple(MODES), optimizer=('adamw', 'muon'), lr_schedule=('cosine', 'wsd')))
if not 0 <= relax_anneal < 1 or not 0 <= ema_decay < 1:
    fail(f"--relax_anneal and --ema_decay must be in [0, 1), got {relax_anneal} and {ema_decay}")
if recon_weight > 0 and not (mode == 'cola' and lam_init_steps > 0):
    fail(f"--recon_weight={recon_weight} needs the pixel decoder: --mode=cola with --lam_init_steps > 0")
schedule = [(p, n) for p, n in MODES[mode] if not (p == 'pretrain' and init_from and mode != 'pretrain')]
ckpt_path = os.path.join(out_dir, 'ckpt.pt')


# ----------------------------------------------------------------------------------------------------
# run management: devices, where the model starts, the out_dir lock, checkpoints, the summary

def setup_device():
    """torchrun sets RANK: one process per device, gradients averaged by DDP. -> (ddp, rank, local_rank,
    n_procs, device)"""
    ddp = 'RANK' in os.environ
    rank, local_rank, n_procs = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('LOCAL_RANK', 0), ('WORLD_SIZE', 1)))
    dev = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if ddp:
        if dev.startswith('cuda'):
            dev = f'cuda:{local_rank}'
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.startswith('cuda') else 'gloo')
    if dev.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, local_rank, n_procs, dev


def start():
    """The model, where it starts (a checkpoint to resume, a world model to start from), and the data; any
    mismatch stops the run in one line before it trains. -> (model, resumed checkpoint or None, sampler)"""
    try:
        model = CoLAWorld(config).to(device)
        resumed = cola.load_checkpoint(ckpt_path, device) if resume else None
        init_ckpt = cola.load_checkpoint(init_from, device) if init_from and not resume else None
        if resumed is not None:
            cola.check_compatible(resumed, config, ckpt_path)
            for k in sorted(config):  # allowed, as in nanoGPT, but said out loud: the run is no longer one recipe
                if master and k not in ('resume', 'stop_at') and resumed['config'].get(k, config[k]) != config[k]:
                    print(f"--resume: --{k} changed from the checkpoint's {resumed['config'][k]!r} to {config[k]!r}")
            began = resumed['config'].get('init_from', '')
            if bool(began) != bool(init_from):  # it decides whether pretraining comes first: the steps would shift
                raise ValueError(f"{ckpt_path} began {f'with --init_from={began}' if began else 'without --init_from'}"
                                 f", which decides whether the run pretrains; resume it the same way")
        if init_ckpt is not None:
            cola.check_compatible(init_ckpt, config, init_from, modules=('wm',))
        if ddp and not master:
            dist.barrier()  # rank 0 simulates or prepares the data first; the others then find it cached
        data_dir = resolve_data(data or None, model.wm.cfg.res, model.wm.cfg.n_frames, skip_bad, policy, camera,
                                frame_stride)
        if ddp and master:
            dist.barrier()
        sampler = ClipSampler(data_dir, model.wm.cfg.n_frames, 'train', seed=seed, rank=rank, world_size=n_procs)
        if model.real_actions:
            cola.real_latents(torch.zeros(1, 1, sampler.action_dim or 0), model.lam.cfg)  # checks the sizes
    except (ValueError, OSError) as e:  # OSError: a full disk while preparing the data
        fail(str(e))
    if init_ckpt is not None:
        model.wm.load_state_dict(init_ckpt.get('ema_wm') or init_ckpt['wm'])
    return model, resumed, sampler


def restore(resumed):
    """Weights, EMA, step, and (at the same world size) every rank's sampler and RNG state, as saved. -> (step, ema)"""
    for name in CoLAWorld.MODULES:
        getattr(model, name).load_state_dict(resumed[name])
    mine = resumed['ranks'][rank] if len(resumed['ranks']) == n_procs else None  # same world size: exact resume
    if mine is not None:
        sampler.load_state_dict(mine['sampler'])
        torch.set_rng_state(mine['torch'].cpu())
        if cuda:
            torch.cuda.set_rng_state(mine['cuda'].cpu())
    else:  # another world size: fresh, rank-distinct streams
        torch.manual_seed(seed + rank + 1000 * resumed['step'])
    return resumed['step'], resumed.get('ema_wm') or ema


def hold_out_dir():
    """The run holds out_dir until it exits: a second run on it would interleave log.jsonl and overwrite ckpt.pt.
    An flock, so the kernel frees it when the holder dies, killed or not, and --resume after a crash goes on.
    Returns the open lock file (it must stay open)."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, 'train.lock'), 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        fail(f"--out_dir={out_dir} is in use by another run (pid {lock.read().strip() or '?'}); wait for it "
             f"or pick another --out_dir")
    lock.truncate(0)
    lock.write(f'{os.getpid()}\n')
    lock.flush()
    return lock


def saved_optimizers(resumed):
    """The optimizers as the checkpoint saved them, handed on to the loop like those at the end of a phase."""
    opts = start_phase(resumed['phase'])[0]
    if not isinstance(resumed['optimizer'], list) or len(resumed['optimizer']) != len(opts):
        fail(f"{ckpt_path} was written with another --optimizer than {optimizer!r}; resume with that one")
    for o, state in zip(opts, resumed['optimizer']):
        o.load_state_dict(state)
    return opts


def start_phase(phase, old_opts=None):
    """Freeze what the phase does not train (CoLAWorld.set_phase), build its optimizers, and wrap the model the
    loop calls: DDP over what trains, optionally compiled."""
    model.set_phase(phase)
    opts, params = model.configure_optimizers(phase, lr, weight_decay, fused=cuda, old=old_opts, muon=optimizer == 'muon')
    wrapped = DDP(model, device_ids=[local_rank] if cuda else None) if ddp else model
    return opts, params, torch.compile(wrapped) if compile else wrapped


def lr_at(i, n):
    """Learning rate at step i of an n-step phase: linear warm-up, then cosine to min_lr, or (wsd) constant and a
    linear cool-down to 0 over the last `cooldown` of the phase."""
    peak = actions_lr if model.real_actions else lr
    if i < lr_ramp:
        return peak * (i + 1) / lr_ramp
    if lr_schedule == 'wsd':
        return peak * min(1.0, (n - i) / max(1.0, cooldown * n))
    return min_lr + 0.5 * (1 + math.cos(math.pi * (i - lr_ramp) / max(1, n - lr_ramp))) * (peak - min_lr)


def p_relax_at(i):
    """Probability that a transition passes its continuous latent instead of the quantized one at global step i:
    1 -> 0 linearly over the first relax_anneal of the LAM's training steps, then 0 (fully quantized). The count
    starts at the first step that trains the LAM (two_stage: lam; cola: warmup)."""
    lam_phases = [k for k, (p, _) in enumerate(schedule) if 'lam' in CoLAWorld.PHASES[p]]
    anneal_steps = relax_anneal * sum(schedule[k][1] for k in lam_phases)
    lam_start = sum(n for _, n in schedule[:lam_phases[0]]) if lam_phases else None
    if lam_start is None or anneal_steps <= 0 or i < lam_start:
        return 0.0
    return max(0.0, 1 - (i - lam_start) / anneal_steps)


@torch.no_grad()
def update_ema():
    """The EMA of the world model's weights (ema_wm; sample.py and eval.py use it when saved)."""
    for k, v in model.wm.state_dict().items():
        ema[k].lerp_(v, 1 - ema_decay) if v.is_floating_point() else ema[k].copy_(v)


def agree_to_stop(stopping):
    """Every rank must stop at the same step, or the checkpoint's gather would hang: any rank's stop is all's."""
    if ddp:
        flag = torch.tensor(float(stopping), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = bool(flag.item())
    return stopping


def grad_norm(module):
    """L2 norm of the gradients on a module's parameters (0 when it is frozen)."""
    gs = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])).item() if gs else 0.0


def save(phase, opts):
    """Every rank's RNG streams go in, so that --resume continues each rank exactly, and a fingerprint
    of every rank's weights, to show that DDP kept them identical; rank 0 writes, atomically."""
    fingerprint = sum(p.detach().double().square().sum().item() + p.detach().double().sum().item()
                      for p in model.parameters())
    mine = dict(sampler=sampler.state_dict(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if cuda else None, fingerprint=fingerprint)
    ranks = [mine]
    if ddp:
        ranks = [None] * n_procs
        dist.all_gather_object(ranks, mine)
    if master:
        if len({r['fingerprint'] for r in ranks}) > 1:
            print(f"warning: the ranks' weights differ at step {step}: {[r['fingerprint'] for r in ranks]}")
        ckpt = dict(**{k: getattr(model, k).state_dict() for k in CoLAWorld.MODULES}, ema_wm=ema, config=config,
                    step=step, phase=phase, optimizer=[o.state_dict() for o in opts], ranks=ranks)
        try:
            atomic_save(ckpt_path, lambda f: torch.save(ckpt, f))
        except OSError as e:  # a full disk, a folder made read-only: the last good checkpoint stays as it was
            kept = f"the last good checkpoint {ckpt_path} is left as it was" if os.path.isfile(ckpt_path) else \
                "no checkpoint was written"
            print(f"\nerror: {e.strerror} at step {step}; stopping, {kept}", file=sys.stderr)
            sys.exit(1)


def summary():
    """Held-out episodes: does the rollout, driven as the model is driven, beat copying the last frame?
    Writes out_dir/summary.json and prints it."""
    model.eval()
    try:
        clips = ClipSampler(sampler.dir, eval_len, 'val', seed=seed).sample(eval_clips, device)
    except ValueError as e:
        print(f"no summary: {e}")
        return
    r = measure.rollout_psnr(model, clips['frames'], null=(mode == 'pretrain'), n_steps=euler_steps,
                             cfg_scale=cfg_scale, seed=seed, actions=clips['actions'])
    stats, health = measure.codebook_health(r['codes'], model.lam.quantizer.size)
    mean = lambda xs: sum(xs) / len(xs)
    out = dict(step=step, mode=mode, psnr=mean(r['psnr']), psnr_copy_last=mean(r['psnr_copy']),
               psnr_per_step=r['psnr'], **stats)
    with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
        json.dump(out, f, indent=1)
    print(f"summary over {eval_clips} held-out clips, {eval_len - model.wm.cfg.n_context} predicted frames each:\n"
          f"  rollout PSNR {out['psnr']:.2f} dB vs copy-last-frame {out['psnr_copy_last']:.2f} dB"
          + {'pretrain': " (null action: pretraining has no latent actions)",
             'actions': " (driven by the real actions)"}.get(mode, f"\n  {health}"))


# ----------------------------------------------------------------------------------------------------
# setup
ddp, rank, local_rank, n_procs, device = setup_device()
master, cuda = rank == 0, device.startswith('cuda')
autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()  # CPU: fp32 (bf16 ~37x slower)
torch.manual_seed(seed + rank)
model, resumed, sampler = start()
ema = {k: v.detach().clone() for k, v in model.wm.state_dict().items()} if ema_decay > 0 else None
step = 0
if resumed is not None:
    step, ema = restore(resumed)
stop_signal = []  # SIGTERM/SIGINT: finish the step, save, exit
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
if master:
    out_lock, log = hold_out_dir(), open(os.path.join(out_dir, 'log.jsonl'), 'a' if resume else 'w')
    n_params = {k: sum(p.numel() for p in getattr(model, k).parameters()) for k in CoLAWorld.MODULES}
    print(f"{mode} on {device} x{n_procs}: {' -> '.join(f'{p} {n}' for p, n in schedule)} steps; "
          f"params {n_params}; data {sampler.dir}")

# ----------------------------------------------------------------------------------------------------
# the training loop: one phase after another
if 0 < stop_at <= step:  # resumed at or past the stop: nothing to train (a rerun after the stop's checkpoint)
    print(f"step {step} is at or past --stop_at={stop_at}: nothing to train; {ckpt_path} is left as it was")
    sys.exit(0)
end, opts = 0, None if resumed is None else saved_optimizers(resumed)
for phase, n_steps in schedule:
    begin, end = end, end + n_steps
    if step >= end:  # finished before a resume
        continue
    opts, params, step_model = start_phase(phase, opts)
    t_phase, t_log, steps_in_window, codes_window, restarts_window = time.time(), time.time(), 0, [], 0
    bar = tqdm(total=n_steps, initial=step - begin, desc=phase, disable=not master, dynamic_ncols=True)
    while step < end:
        for g in (g for o in opts for g in o.param_groups):
            g['lr'] = lr_at(step - begin, n_steps)
        for micro in range(grad_accum):
            batch = sampler.sample(batch_size, device)  # frames (B, T, 3, H, W), actions (B, T-1, A) or None
            if ddp:
                step_model.require_backward_grad_sync = micro == grad_accum - 1
            with autocast:
                out = step_model(batch['frames'], phase, batch['actions'], p_relax_at(step))
            (out['loss'] / grad_accum).backward()
            if out['codes'] is not None:
                codes_window.append(out['codes'].detach())
            restarts_window += out['restarts']
        logging = (step + 1) % log_interval == 0 or step + 1 == end
        norms = {f'grad_{k}': grad_norm(getattr(model, k)) for k in CoLAWorld.MODULES} if logging else {}
        total_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
        loss = out['loss'].item()
        if not (math.isfinite(loss) and math.isfinite(total_norm)):
            print(f"error: non-finite loss {loss} (grad norm {total_norm}) at step {step + 1} in phase {phase}; "
                  f"stopping, the last good checkpoint {ckpt_path} is left as it was", file=sys.stderr)
            sys.exit(1)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        if ema is not None and 'wm' in CoLAWorld.PHASES[phase]:
            update_ema()
        step += 1
        steps_in_window += 1
        bar.update(1)
        if logging and master:
            rec = dict(step=step, phase=phase, loss=loss, lr=opts[0].param_groups[0]['lr'],
                       ms_per_step=1000 * (time.time() - t_log) / steps_in_window,
                       **{k: out[k].item() for k in ('flow', 'recon') if out[k] is not None}, **norms,
                       grad_total=total_norm, phase_wall_s=time.time() - t_phase)
            if codes_window and model.lam.quantizer.size:
                rec.update(code_stats(torch.cat([c.flatten() for c in codes_window]), model.lam.quantizer.size),
                           p_relax=p_relax_at(step - 1), code_restarts=restarts_window)
            log.write(json.dumps(rec) + '\n')
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", **({'code_util': f"{rec['code_util']:.2f}"} if 'code_util' in rec else {}))
        if logging:
            t_log, steps_in_window, codes_window, restarts_window = time.time(), 0, [], 0
        stopping = agree_to_stop(bool(stop_signal) or step == stop_at)
        if step % ckpt_interval == 0 or step == end or stopping:
            save(phase, opts)
        if stopping:
            if master:
                print(f"\nstopped {'by signal' if stop_signal else '(--stop_at)'} at step {step}; checkpoint saved "
                      f"to {ckpt_path}; --resume continues")
            sys.exit(0)
    bar.close()
    if master:
        print(f"{phase}: {n_steps} steps in {time.time() - t_phase:.0f} s, final loss {loss:.4f}")
if end == 0 and resumed is None:  # no steps at all (e.g. --init_from with 0 warm-up and joint steps): save the
    save(schedule[0][0], start_phase(schedule[0][0])[0])  # starting point, so that eval.py can measure it

if master and eval_clips > 0:
    summary()
if ddp:
    dist.barrier()  # the other ranks wait for rank 0's summary before the process group goes
    dist.destroy_process_group()
