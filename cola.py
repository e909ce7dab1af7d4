"""
CoLA-World, the model: the world model (`wm`), its action conditioning (`action`) and the latent action model
(`lam`) in one module that owns the training loss of every phase and its optimizers (as nanoGPT's GPT owns
forward/configure_optimizers), what drives its world model, its rollouts, and its checkpoints (names: README,
"Files a run writes"). train.py trains it; sample.py, eval.py, plan.py and play.py load it (measure.open_run).
Imports the model's parts only: lam.py, world_model.py.
"""
import math
import os
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from lam import LAM, LAMConfig
from world_model import PRESETS, ActionEncoder, VideoDiT, WMConfig, flow_loss, rollout

# settings that fix the shapes of the weights: a checkpoint only loads into a model that agrees on them
SHAPE_KEYS = ('res', 'patch', 'n_frames', 'width', 'depth', 'idm_depth', 'idm_keypoints', 'n_heads', 'act_width', 'act_depth',
              'n_action_tokens', 'action_dim', 'quantizer', 'codebook_size', 'fsq_levels')


def model_configs(s):
    """Settings dict -> (WMConfig, LAMConfig). Size keys left None take the value of `s['preset']`."""
    if s.get('preset') not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {s.get('preset')!r}")
    sizes = {k: (PRESETS[s['preset']][k] if s.get(k) is None else s[k]) for k in PRESETS[s['preset']]}
    # settings left None take the dataclass's default (checkpoints of older versions say t_shift=None)
    pick = lambda cls: {k: v for k, v in {**s, **sizes}.items() if k in cls.__dataclass_fields__ and v is not None}
    wm_cfg = WMConfig(**pick(WMConfig))
    # the pixel decoder exists where the LAM trains on pixels (the two-stage baseline, --lam_init_steps); the IDM
    # takes clips of the world model's length
    decoder = s.get('mode') == 'two_stage' or (s.get('mode') == 'cola' and s.get('lam_init_steps', 0) > 0)
    fixed = dict(dec_depth=s['dec_depth'] if decoder else 0, max_frames=wm_cfg.n_frames,
                 patch=s.get('idm_patch') or wm_cfg.patch)  # the IDM's own patch, finer for small agents
    lam_cfg = LAMConfig(**{**pick(LAMConfig), **fixed})
    flags = {**{k: getattr(wm_cfg, k) for k in ('res', 'patch', 'n_frames', 'width', 'depth', 'n_heads', 'act_width',
                                                'n_action_tokens', 'action_dim')},
             'idm_patch': lam_cfg.patch, 'dec_patch': lam_cfg.dec_patch, 'idm_depth': lam_cfg.idm_depth,
             'codebook_size': lam_cfg.codebook_size}
    for flag, v in flags.items():
        if not v > 0:
            raise ValueError(f"--{flag} must be positive, got {v}")
    for flag in ('patch', 'idm_patch', 'dec_patch'):
        if wm_cfg.res % flags[flag]:
            raise ValueError(f"--res={wm_cfg.res} must be divisible by --{flag}={flags[flag]}")
    if wm_cfg.width % wm_cfg.n_heads:
        raise ValueError(f"--width={wm_cfg.width} must be divisible by --n_heads={wm_cfg.n_heads}")
    if lam_cfg.quantizer not in ('vq', 'fsq', 'none'):
        raise ValueError(f"--quantizer must be one of vq, fsq, none; got {lam_cfg.quantizer!r}")
    if not 1 <= wm_cfg.n_context < wm_cfg.n_frames:
        raise ValueError(f"--n_context={wm_cfg.n_context} must be at least 1 and below n_frames={wm_cfg.n_frames}")
    return wm_cfg, lam_cfg


def real_latents(actions, lam_cfg):
    """Real actions (B, L, A) -> the latent-action slot (B, L, n_tok, d): the action's A numbers in the first
    channels of token 0, zeros elsewhere. The world model then takes real actions through the very path
    latent actions take (ActionEncoder's input layer is linear, so this is a learned linear embedding of
    the real action), with the same weight shapes: --mode=actions checkpoints load wherever CoLA's do."""
    slot = lam_cfg.n_action_tokens * lam_cfg.action_dim
    if actions is None or actions.shape[-1] == 0:
        raise ValueError("--mode=actions needs data with actions (.npz episodes with an 'actions' array)")
    if actions.shape[-1] > slot:
        raise ValueError(f"actions have {actions.shape[-1]} dims, more than the latent-action slot's "
                         f"n_action_tokens x action_dim = {slot}")
    z = actions.new_zeros(*actions.shape[:-1], slot)
    z[..., :actions.shape[-1]] = actions
    return z.view(*actions.shape[:-1], lam_cfg.n_action_tokens, lam_cfg.action_dim)


def orthogonalise(G, steps=5, coefficients=(3.4445, -4.775, 2.0315)):
    """Newton-Schulz iteration (Jordan et al. 2024): matrices G (..., m, n) -> about U V^T of their SVDs (the
    singular values land in ~[0.7, 1.2], which trains as well as exactly 1). Batched over the leading dims."""
    a, b, c = coefficients
    wide = G.shape[-2] <= G.shape[-1]
    X = G if wide else G.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, then the update orthogonalised (orthogonalise) and scaled by
    0.2 sqrt(max(m, n)) to the RMS of an AdamW update, so that one learning rate serves both optimizers.
    This is torch.optim.Muon's update with adjust_lr_fn='match_rms_adamw', computed in fp32 and one batched
    product per weight shape: torch's runs Newton-Schulz in bf16 one matrix at a time, which on a CPU without
    bf16 units took 425 ms a step where AdamW takes 10 (NOTES.md, "More world model per CPU minute")."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}  # weights of one shape are orthogonalised in one batched product
            for p in group['params']:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group['momentum'])
                by_shape.setdefault(p.shape, []).append((p, p.grad.lerp(buf, group['momentum'])))  # Nesterov
            for shape, items in by_shape.items():
                lr = group['lr'] * 0.2 * math.sqrt(max(shape))
                for (p, _), u in zip(items, orthogonalise(torch.stack([g for _, g in items]))):
                    p.mul_(1 - group['lr'] * group['weight_decay']).add_(u, alpha=-lr)


def is_hidden_matrix(name, p):
    """Muon's share of the weights: the 2-D matrices inside the transformer blocks, the timestep MLP and the
    action encoder's output MLP. Embeddings, heads, positions, the codebook, norms and biases stay with AdamW
    (Muon orthogonalises a matrix's update, which suits maps between hidden features only)."""
    return p.ndim == 2 and name.endswith('.weight') and any(k in name for k in ('blocks.', 't_embed.', 'action.out.'))


class CoLAWorld(nn.Module):
    """The three modules of CoLA-World and the loss of each training phase.

    wm      VideoDiT: the video world model, pretrained action-free, frozen during the warm-up
    action  ActionEncoder: the new modules that condition the world model on latent actions
    lam     LAM: the IDM and its quantizer (and, in the two-stage baseline, the pixel decoder)

    What drives the world model is decided once, from the settings: the IDM's latent actions, or for a model
    made with mode 'actions' (`real_actions`) the dataset's own actions in the latent-action slot (real_latents).
    `drive` and `encode_actions` give a program what it needs either way, so no program asks which it is.
    `cond_drop` (the null action's probability, for classifier-free guidance) and `motion_weight` are settings.
    motion_weight (flow_loss) weighs the moved pixels only where the world model is driven by actions: it makes
    the action matter to the loss; pretraining has no action, and on the pixel decoder it cost the LAM a third
    of the move (NOTES.md, "PushT"). recon_weight > 0 keeps the pixel decoder's loss beside the flow loss in the
    warm-up and joint phases: through the frozen world model alone a small agent's codes trade its direction for
    its speed (NOTES.md, "The warm-up wipes a small agent's direction").
    """
    MODULES = ('wm', 'action', 'lam')
    # phase      trains (PHASES)       frozen by set_phase         what drives the world model
    # pretrain   wm                    action, lam                 nothing: action-free video prediction
    # warmup     lam, action           wm (still in the graph)     the IDM's latent actions
    # joint      lam, action, wm       -                           the IDM's latent actions
    # lam        lam (+ its decoder)   wm, action                  - (the pixel decoder reads the latents)
    # wm         action, wm            lam                         the frozen IDM's latents, or the real actions
    PHASES = {'pretrain': ('wm',), 'warmup': ('lam', 'action'), 'joint': ('lam', 'action', 'wm'),
              'lam': ('lam',), 'wm': ('action', 'wm')}

    def __init__(self, settings):
        super().__init__()
        wm_cfg, lam_cfg = model_configs(settings)
        self.wm, self.action, self.lam = VideoDiT(wm_cfg), ActionEncoder(wm_cfg), LAM(lam_cfg)
        self.cond_drop = settings.get('cond_drop', 0.1)
        self.motion_weight = settings.get('motion_weight', 0.0)
        self.recon_weight = settings.get('recon_weight', 0.0)
        self.real_actions = settings.get('mode') == 'actions'

    def forward(self, x, phase, actions=None, p_relax=0.0):
        """The loss of one training step. x: (B, T, 3, H, W) in [-1, 1]; actions (B, T-1, A): the dataset's actions,
        which drive the world model in place of latent ones when the model is made for them (real_actions), or
        None; p_relax: the probability of a transition's continuous latent in place of its quantized one
        (lam.LAM.forward) -> dict(loss, flow and recon (None where the phase has no such loss), codes (None
        where the LAM does not run or is continuous) and restarts, the codebook entries the step re-initialised)."""
        out = dict(flow=None, recon=None, codes=None, restarts=0)
        if phase == 'pretrain':  # action-free: nothing to read a move from, so no pixel weighs more
            out['flow'] = flow_loss(self.wm, None, x)
            return dict(out, loss=out['flow'])
        if self.real_actions:  # the dataset's actions in the latent-action slot
            z = real_latents(actions, self.lam.cfg)
        else:
            with torch.no_grad() if phase == 'wm' else nullcontext():  # the two-stage WM phase: the LAM is frozen
                lam = self.lam(x, p_relax)
            z, out['codes'], out['restarts'] = lam['z'], lam['codes'], lam['restarts']
        if phase == 'lam' or (self.recon_weight > 0 and phase in ('warmup', 'joint')):
            out['recon'] = F.mse_loss(self.lam.decoder(x[:, :-1], z), x[:, 1:])  # frame t+1 from frame t and z_t
        if phase == 'lam':  # two-stage, stage 1: the pixel decoder alone
            return dict(out, loss=out['recon'])
        # warm-up and joint: the flow loss is the IDM's only signal (unless recon_weight keeps the pixel decoder's)
        out['flow'] = flow_loss(self.wm, self.action, x, z, self.cond_drop, motion_weight=self.motion_weight)
        return dict(out, loss=out['flow'] if out['recon'] is None else out['flow'] + self.recon_weight * out['recon'])

    def set_phase(self, phase):
        """Train the modules of `phase`; freeze the others (requires_grad off, eval mode). Returns the
        parameters that train, in a fixed order."""
        for name in self.MODULES:
            getattr(self, name).requires_grad_(name in self.PHASES[phase]).train(name in self.PHASES[phase])
        return [p for name in self.PHASES[phase] for p in getattr(self, name).parameters()]

    def configure_optimizers(self, phase, lr, weight_decay=0.0, fused=False, old=None, muon=False):
        """The optimizers of what `phase` trains (freezing the rest is set_phase's job): AdamW, or with `muon` Muon
        on the hidden weight matrices (is_hidden_matrix) and AdamW on the rest. Returns (list of optimizers,
        parameters that train). The state of parameters that `old` (the previous phase's optimizers) already
        trained is carried over, so warm-up -> joint does not reset the LAM's."""
        named = [(f'{m}.{n}', p) for m in self.PHASES[phase] for n, p in getattr(self, m).named_parameters()]
        params, hidden, rest = [p for _, p in named], [], []
        for n, p in named:
            (hidden if muon and is_hidden_matrix(n, p) else rest).append(p)
        opts = [torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay, fused=fused)]
        if hidden:  # Muon's update is scaled to AdamW's RMS, so one learning rate serves both
            opts.append(Muon(hidden, lr=lr, weight_decay=weight_decay))
        for new in opts:  # a parameter keeps its state where the same kind of optimizer trained it before
            for prev in (o for o in old or [] if type(o) is type(new)):
                new.state.update({p: prev.state[p] for p in new.param_groups[0]['params'] if p in prev.state})
        return opts, params

    @torch.inference_mode()
    def latent_actions(self, clips):
        """The IDM's latent actions for every transition of clips (B, L, 3, H, W), L of any length: the IDM sees
        windows of the length it was trained on (consecutive windows share a frame), then the quantizer.
        Returns dict(z_e (B, L-1, n_tok, d) before quantization, z the quantized latent actions, codes
        (B, L-1, n_tok) or None for continuous actions)."""
        win, L = self.lam.cfg.max_frames, clips.shape[1]
        z_e = torch.cat([self.lam.idm(clips[:, s:s + win]) for s in range(0, L - 1, win - 1)], 1)
        z, codes, _ = self.lam.quantizer(z_e)
        return dict(z_e=z_e, z=z, codes=codes)

    @torch.inference_mode()
    def drive(self, clips, actions=None):
        """What drives the world model through clips (B, L, 3, H, W): the IDM's latent actions, or for a model made
        for real actions the clips' own `actions` (B, L-1, A) in the latent slot. Returns (B, L-1, n_tok, d)."""
        if self.real_actions:
            if actions is None:
                raise ValueError("this world model was trained on real actions (--mode=actions); the data has none")
            return real_latents(actions, self.lam.cfg)
        return self.latent_actions(clips)['z']

    @torch.inference_mode()
    def encode_actions(self, actions, adapter=None):
        """Real actions (B, K, A) -> the latent actions (B, K, n_tok, d) the world model takes: through the real-action
        adapter (measure.Adapter) and the quantizer, or for a model made for real actions into the latent slot."""
        return real_latents(actions, self.lam.cfg) if self.real_actions else self.lam.quantizer(adapter(actions))[0]

    @torch.inference_mode()
    def simulate(self, clips, z, n_steps=2, cfg_scale=1.0, seed=0, generator=None):
        """The one way to roll the world model out: from the first n_context frames of clips (B, L, 3, H, W),
        driven by latent actions z (B, K, n_tok, d), one per transition from frame 0 (K + 1 frames), or by the
        null action when z is None (L frames). Returns every frame, context first. The noise comes from a
        generator seeded with `seed`, so a rollout is reproducible, or from `generator` (one stream over calls)."""
        if generator is None:
            generator = torch.Generator(clips.device).manual_seed(seed)
        return rollout(self.wm, self.action, clips[:, :self.wm.cfg.n_context], z, total=clips.shape[1],
                       n_steps=n_steps, cfg_scale=cfg_scale, generator=generator)


# ----------------------------------------------------------------------------------------------------
# checkpoints: a dict with one state dict per module (MODULES), `config` (every setting), `step`, `phase`

def load_checkpoint(path, device='cpu'):
    """Load a checkpoint dict, with an error that names the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    missing = [k for k in (*CoLAWorld.MODULES, 'config', 'step', 'phase') if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: not a CoLA-World checkpoint")
    return ckpt


def check_compatible(ckpt, s, path, modules=('wm', 'lam')):
    """Raise if the checkpoint's shapes for `modules` differ from the settings `s` (both resolved by
    preset). --init_from takes only the world model, so only its shape has to agree."""
    mine = dict(zip(('wm', 'lam'), model_configs(s)))
    try:
        theirs = dict(zip(('wm', 'lam'), model_configs(ckpt['config'])))
    except (ValueError, TypeError) as e:  # written by another version of the code
        raise ValueError(f"checkpoint {path} has a config this code cannot read ({e})") from None
    bad = [f"{k}: checkpoint {getattr(theirs[m], k)!r} vs now {getattr(mine[m], k)!r}"
           for m in modules for k in SHAPE_KEYS if k in mine[m].__dataclass_fields__
           and getattr(mine[m], k) != getattr(theirs[m], k)]
    if bad:
        raise ValueError(f"checkpoint {path} has an incompatible config ({'; '.join(sorted(set(bad)))})")


def load_model(path, device='cpu'):
    """Checkpoint -> (CoLAWorld in eval mode, the checkpoint dict; its settings are ckpt['config']). The EMA world
    model is used when saved. Weights saved in fp16 (measure.export) load into the fp32 model."""
    ckpt = load_checkpoint(path, device)
    model = CoLAWorld(ckpt['config']).to(device)
    try:
        for name in CoLAWorld.MODULES:
            getattr(model, name).load_state_dict(ckpt[name])
        if ckpt.get('ema_wm'):
            model.wm.load_state_dict(ckpt['ema_wm'])
    except RuntimeError as e:  # written by another version of the code
        raise ValueError(f"checkpoint {path} does not fit this code's modules: {str(e).splitlines()[0]}") from None
    return model.eval(), ckpt
