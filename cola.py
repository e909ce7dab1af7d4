"""
The CoLA-World system as the programs see it: build the three modules (`wm`, `action`, `lam`) from a
flat settings dict, save and load checkpoints (CONTRACT.md), and the rollout measurement the programs
share. Used by train.py (its end-of-run summary), sample.py, eval.py, plan.py and bench.py.
"""
import os

import torch

from lam import LAM, LAMConfig, code_stats
from world_model import PRESETS, ActionEncoder, VideoDiT, WMConfig, rollout

# settings that fix the shapes of the weights: a checkpoint only loads into a model that agrees on them
SHAPE_KEYS = ('res', 'patch', 'n_frames', 'width', 'depth', 'n_heads', 'act_width', 'act_depth',
              'n_action_tokens', 'action_dim', 'quantizer', 'codebook_size', 'fsq_levels')


def model_configs(s):
    """Settings dict -> (WMConfig, LAMConfig). Size keys left None take the value of `s['preset']`."""
    if s['preset'] not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {s['preset']!r}")
    sizes = {k: (PRESETS[s['preset']][k] if s.get(k) is None else s[k]) for k in PRESETS[s['preset']]}
    pick = lambda cls: {k: v for k, v in {**s, **sizes}.items() if k in cls.__dataclass_fields__}
    wm_cfg = WMConfig(**pick(WMConfig))
    lam_cfg = LAMConfig(**pick(LAMConfig), max_frames=wm_cfg.n_frames)
    if not 1 <= wm_cfg.n_context < wm_cfg.n_frames:
        raise ValueError(f"--n_context={wm_cfg.n_context} must be at least 1 and below n_frames={wm_cfg.n_frames}")
    return wm_cfg, lam_cfg


def build(s, device='cpu'):
    """The three modules of CoLA-World, freshly initialised, as a dict name -> module."""
    wm_cfg, lam_cfg = model_configs(s)
    return dict(wm=VideoDiT(wm_cfg).to(device), action=ActionEncoder(wm_cfg).to(device), lam=LAM(lam_cfg).to(device))


def save_checkpoint(ckpt, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written ckpt.pt."""
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device='cpu'):
    """Load a checkpoint dict, with an error that names the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    missing = [k for k in ('wm', 'action', 'lam', 'config', 'step', 'phase') if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: not a CoLA-World checkpoint")
    return ckpt


def check_compatible(ckpt, s, path):
    """Raise if the checkpoint's model shape differs from the settings `s` (both resolved by preset)."""
    mine, theirs = (dict(zip(('wm', 'lam'), model_configs(c))) for c in (s, ckpt['config']))
    bad = [f"{k}: checkpoint {getattr(theirs[m], k)!r} vs now {getattr(mine[m], k)!r}"
           for m in ('wm', 'lam') for k in SHAPE_KEYS if k in mine[m].__dataclass_fields__
           and getattr(mine[m], k) != getattr(theirs[m], k)]
    if bad:
        raise ValueError(f"checkpoint {path} has an incompatible config ({'; '.join(sorted(set(bad)))})")


def load_models(path, device='cpu', use_ema=True):
    """Checkpoint -> (modules dict in eval mode, settings dict). The EMA world model is used when saved."""
    ckpt = load_checkpoint(path, device)
    models = build(ckpt['config'], device)
    for name, m in models.items():
        m.load_state_dict(ckpt[name])
        m.eval()
    if use_ema and ckpt.get('ema_wm'):
        models['wm'].load_state_dict(ckpt['ema_wm'])
    return models, ckpt['config']


# ----------------------------------------------------------------------------------------------------
# measurements

def to_model(frames, device='cpu'):
    """uint8 (B, T, H, W, 3) -> float (B, T, 3, H, W) in [-1, 1] on device."""
    return frames.to(device).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1)


def psnr(a, b):
    """Per-frame PSNR in dB of clips in [-1, 1], (B, T, C, H, W) -> (B, T); identical frames give 100 dB
    (a cap, so averages stay finite)."""
    mse = ((a - b) / 2).square().flatten(2).mean(-1)
    return (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).clamp(max=100.0)


@torch.inference_mode()
def rollout_psnr(models, clips, null=False, n_steps=10, cfg_scale=4.0, seed=0):
    """Roll the world model out from the first n_context frames of each clip, driven by the IDM's latent
    actions inferred from the ground truth (or by the null action when `null`), and score the frames.

    clips: (B, L, 3, H, W) in [-1, 1], L may exceed one window (sliding-window rollout). Returns per-step
    PSNR lists (length L - n_context) for the model and for copy-last-frame, the frames, and the codes.
    """
    wm, action, lam = models['wm'], models['action'], models['lam']
    nc, win, L = wm.cfg.n_context, wm.cfg.n_frames, clips.shape[1]
    z, codes = None, None
    if not null:  # the IDM sees windows of its own length: infer window by window, then concatenate
        outs = [lam(clips[:, s:s + win]) for s in range(0, L - 1, win - 1)]
        z = torch.cat([o['z'] for o in outs], 1)  # (B, L-1, n_tok, d)
        codes = None if outs[0]['codes'] is None else torch.cat([o['codes'] for o in outs], 1)
    gen = rollout(wm, action, clips[:, :nc], z, total=L, n_steps=n_steps, cfg_scale=cfg_scale,
                  generator=torch.Generator(clips.device).manual_seed(seed))
    copy = clips[:, nc - 1:nc].expand_as(clips[:, nc:])
    return dict(psnr=psnr(gen[:, nc:], clips[:, nc:]).mean(0).tolist(),
                psnr_copy=psnr(copy, clips[:, nc:]).mean(0).tolist(), frames=gen, codes=codes)


def codebook_health(codes, size):
    """code_stats with a readable one-line form for summaries; codes may be None (continuous actions)."""
    if codes is None:
        return {}, 'continuous latent actions (no codebook)'
    st = code_stats(codes, size)
    return st, (f"codebook: {st['code_util']:.0%} of {size} entries used, max entry {st['code_max']:.0%}, "
                f"entropy {st['code_entropy']:.2f}, perplexity {st['code_perplexity']:.1f}")
