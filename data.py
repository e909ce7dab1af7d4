"""Data for CoLA-World: a built-in 2-D pushing simulator, episode loaders and a clip sampler.

    python data.py --out_dir=DIR --episodes=N [--seed=S] [--T=48] [--res=64]   # simulator -> .npz files
    python data.py --env=pusht --out_dir=DIR --episodes=N                       # PushT (pusht.py) -> .npz
    python data.py prepare --src=DIR --out_dir=DIR --res=R [--skip_bad]         # any folder -> shards
    python data.py --format=lerobot --out_dir=DIR --episodes=N                  # a LeRobot v3.0 dataset (lerobot.py)
    python data.py --bench                                                      # frames/s and clips/s

Every source (simulator, .npz folders, videos, LeRobot datasets) ends up "prepared" the nanoGPT way: raw
uint8 frames in a few shard files read with np.memmap, plus index.json saying where each episode lives.
A folder is a dataset iff it has index.json, which is written last, so a crash never leaves a half one.
"""
import argparse, json, os, shutil, tempfile, time, warnings

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

MAX_BLOCKS = 3
STATE_DIM = 2 + 2 * MAX_BLOCKS  # agent xy, then block xy (zeros for absent blocks)
ACTION_DIM = 2
# Worlds: the ranges bodies are drawn from and the agent's speed (world units per step at |action| = 1; the
# arena is 1 wide). In 'big', the default, the agent is about 1/4 of the arena across and moves 40% of its
# radius a step, so the action explains much of a frame's change: at CPU scale nothing learned latent
# actions in 'small' (README, "The latent action model"). 'small' is the original, harder setting: an agent
# of ~1% of the frame moving ~3 px a step at 64 px.
# Recorded frames carry a camera's sensor noise (std in intensity levels of 255). Without it a still frame
# repeats its predecessor exactly, and copy-last-frame scores the PSNR cap (100 dB) there, which no learned
# model can: at 7% still transitions that alone put copy-last 5 dB ahead (README, "The world model").
SENSOR_NOISE = 2.0
WORLDS = {'big': dict(agent_r=(0.11, 0.13), block_h=(0.07, 0.1), max_blocks=2, speed=6 / 64),
          'small': dict(agent_r=(0.05, 0.075), block_h=(0.06, 0.1), max_blocks=3, speed=3 / 64)}
TOL = 0.05                      # default success tolerance (world units, ~3 px at 64 px)
EPS = 1e-6                      # contact slack: float32-rounded positions may overlap by ~1e-8
INDEX = 'index.json'
VIDEO_EXTS = ('.mp4', '.webm', '.gif')
SPLIT_SEED = 1234               # the held-out split is a property of the data, not of the run's seed
DIRS = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], float)  # scripted pushes are axis-aligned


def _f32(x):
    return float(np.float32(x))


# ----------------------------------------------------------------------------- simulator

class PushSim:
    """Top-down pushing world in [0,1]^2: a disk agent, 1-3 square blocks, kinematic contacts.

    Motion is resolved one axis at a time (x then y), like classic tile games: the agent moves, any block
    in its way is pushed along that axis as far as walls and other blocks allow (blocks never push
    blocks), and the agent stops at the block's face. Contacts use the agent's bounding box. This never
    creates overlaps and needs no tuning. Positions are rounded to float32 after every step, so
    set_state(get_state()) reproduces the simulator exactly.
    """

    def __init__(self, res=64, seed=0, world='big'):
        if world not in WORLDS:
            raise ValueError(f"--world must be one of {', '.join(WORLDS)}, got {world!r}")
        self.res, self.world = res, WORLDS[world]
        self.speed = self.world['speed']
        self.reset(seed)

    def reset(self, seed):
        """New episode: sizes, layout and appearance all drawn from `seed`."""
        rng, w = np.random.default_rng(seed), self.world
        # Layout first, texture last: the texture draws res-dependent noise, and drawing it last keeps the
        # dynamics of an episode identical at every resolution.
        self.n_blocks = int(rng.integers(1, w['max_blocks'] + 1))
        self.r = _f32(rng.uniform(*w['agent_r']))                           # agent radius
        self.h = [_f32(v) for v in rng.uniform(*w['block_h'], MAX_BLOCKS)]  # block half-sizes
        self.half = [self.r] + self.h[:self.n_blocks]                   # bounding-box half-size per body
        self.pos = []                                                   # [[x, y]] agent, then blocks
        for i, s in enumerate(self.half):
            for _ in range(1000):  # rejection sampling; the unit square is far from full
                p = rng.uniform(s, 1 - s, 2)
                if all(max(abs(p - q)) > s + t + 0.02 for q, t in zip(self.pos, self.half)):
                    break
            self.pos.append([_f32(p[0]), _f32(p[1])])
        bg = rng.uniform(40, 215, 3)
        colors = []
        for _ in range(1 + self.n_blocks):  # colours well away from the background and each other
            for _ in range(50):
                c = rng.uniform(0, 255, 3)
                if all(np.abs(c - o).sum() > 150 for o in [bg] + colors):
                    break
            colors.append(c)
        self.colors = [c.astype(np.float32) for c in colors]
        self._bg = self._texture(rng, bg)
        return self.render()

    def _texture(self, rng, bg):
        """Background colour plus a low-contrast pattern (stripes, checker, noise or plain)."""
        R = self.res
        yy, xx = np.mgrid[0:R, 0:R] / R
        kind, period, angle = rng.integers(4), rng.uniform(0.08, 0.25), rng.uniform(0, np.pi)
        if kind == 0:
            tex = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        elif kind == 1:
            tex = ((xx // period + yy // period) % 2) * 2 - 1
        elif kind == 2:
            tex = np.clip(rng.standard_normal((R, R)), -2, 2) / 2
        else:
            tex = np.zeros((R, R))
        return np.clip(bg + rng.uniform(6, 20) * tex[..., None], 0, 255).astype(np.uint8)

    def get_state(self):
        s = np.zeros(STATE_DIM, np.float32)  # (8,)
        s[:2 + 2 * self.n_blocks] = np.ravel(self.pos)
        return s

    def set_state(self, state):
        s = np.asarray(state, np.float32)
        self.pos = [[float(s[2 * i]), float(s[2 * i + 1])] for i in range(1 + self.n_blocks)]

    def step(self, action):
        """Apply a velocity action in [-1,1]^2 (clipped) and return the new frame (H, W, 3) uint8."""
        a = np.clip(np.asarray(action, np.float64), -1, 1) * self.speed
        for k in (0, 1):
            self._move_agent(k, float(a[k]))
        self.pos = [[_f32(x), _f32(y)] for x, y in self.pos]
        return self.render()

    def _move_agent(self, k, d):
        """Move the agent by d along axis k, pushing the blocks in its way."""
        j, s, r, a = 1 - k, (1.0 if d > 0 else -1.0), self.r, self.pos[0]
        target = min(max(a[k] + d, r), 1 - r)
        for i in range(1, 1 + self.n_blocks):
            b, h = self.pos[i], self.half[i]
            if abs(b[j] - a[j]) >= r + h - EPS or s * (b[k] - a[k]) <= 0:
                continue  # not in this lane, or behind us
            overlap = s * (target - b[k]) + r + h
            if overlap > 0:
                b[k] += s * self._room(i, k, s, overlap)
                target = s * min(s * target, s * b[k] - h - r)  # stop at the block's face
        a[k] = target

    def _room(self, i, k, s, want):
        """How far block i can move (<= want) along axis k in direction s before a wall or another block."""
        j, b, h = 1 - k, self.pos[i], self.half[i]
        room = (1 - h - b[k]) if s > 0 else (b[k] - h)
        for m in range(1, 1 + self.n_blocks):
            c = self.pos[m]
            if m != i and abs(c[j] - b[j]) < h + self.half[m] - EPS and s * (c[k] - b[k]) > 0:
                room = min(room, s * (c[k] - b[k]) - h - self.half[m])
        return max(0.0, min(want, room))

    def render(self):
        """The current frame, (res, res, 3) uint8: the pre-rendered background, then each body blended in by
        the fraction of every pixel it covers (analytic anti-aliasing), so that a motion of a fraction of a
        pixel still changes the frame, in proportion."""
        img, R = self._bg.astype(np.float32), self.res
        for i in list(range(1, 1 + self.n_blocks)) + [0]:  # agent drawn on top
            c, s = np.array(self.pos[i]) * R, self.half[i] * R  # centre and half-size in pixels
            x0, y0 = (max(0, int(v - s - 1)) for v in c)
            x1, y1 = (min(R, int(v + s + 2)) for v in c)
            dx, dy = np.arange(x0, x1) + 0.5 - c[0], np.arange(y0, y1) + 0.5 - c[1]  # pixel centres
            if i == 0:  # disk: coverage ~ how far inside the rim, over one pixel
                cover = np.clip(s + 0.5 - np.sqrt(dy[:, None] ** 2 + dx[None] ** 2), 0, 1)
            else:  # square: the product of the two axes' coverages
                cover = np.clip(s + 0.5 - np.abs(dy), 0, 1)[:, None] * np.clip(s + 0.5 - np.abs(dx), 0, 1)[None]
            patch = img[y0:y1, x0:x1]
            patch += cover[..., None] * (self.colors[i] - patch)
        return img.round().astype(np.uint8)


class RandomPolicy:
    """i.i.d. moves: each step one of the 9 moves {-1, 0, 1}^2, uniformly. Nothing about an action can be
    guessed from earlier frames, so this is the clean test of a latent action model: the probe's ceiling
    is 1 (less the moves a wall or a jammed block swallows)."""

    def __init__(self, rng):
        self.rng = rng

    def act(self, sim):
        return self.rng.integers(-1, 2, 2).astype(np.float32)


class ExplorePolicy:
    """Exploration: segments of smooth random motion (OU-like velocity, some pauses) mixed with scripted
    pushes, where the agent walks around a chosen block to stand behind it, then pushes it through.
    Random wandering alone rarely moves a block, and a latent action model must see contacts."""

    def __init__(self, rng, p_push=0.8):
        self.rng, self.p_push = rng, p_push
        self.v, self.left, self.push = np.zeros(2), 0, None

    def act(self, sim):
        """The next action (2,) float32 in [-1, 1]."""
        if self.left <= 0:
            self._new_segment(sim)
        self.left -= 1
        rng, a = self.rng, np.array(sim.pos[0])
        if self.push is None:
            self.v = 0.8 * self.v + 0.5 * rng.standard_normal(2)
            self.v = np.where((a < 0.15) & (self.v < 0) | (a > 0.85) & (self.v > 0), -self.v, self.v)  # walls
            act = self.v * self.still
        else:
            act = self._push_action(sim, a) + 0.15 * rng.standard_normal(2)
        return np.clip(act, -1, 1).astype(np.float32)

    def _new_segment(self, sim):
        rng, self.push = self.rng, None
        if rng.random() < self.p_push:
            # (block, direction) pairs we can stand behind (inside the walls) that leave the block room to
            # move; those with a nearby standing point are preferred: less time goes into walking around.
            cands = []
            for i in range(1, 1 + sim.n_blocks):
                b, gap = np.array(sim.pos[i]), sim.half[i] + sim.r + 0.03
                cands += [(i, u, np.linalg.norm(b - u * gap - sim.pos[0])) for u in DIRS
                          if np.all(np.abs(b - u * gap - 0.5) < 0.5 - sim.r) and sim._room(i, int(u[1] != 0), u.sum(), 1) > 0.15]
            if cands:
                p = np.exp(-np.array([c[2] for c in cands]) / 0.1)
                i, u, _ = cands[rng.choice(len(cands), p=p / p.sum())]
                self.push, self.phase, self.left = (i, u), 'approach', int(rng.integers(30, 60))
                return
        self.left, self.still = int(rng.integers(5, 20)), float(rng.random() > 0.1)  # 10% of segments: stand still

    def _push_action(self, sim, a):
        i, u = self.push
        w, b, contact = u[::-1].copy(), np.array(sim.pos[i]), sim.half[i] + sim.r
        along, across, gap = (a - b) @ u, (a - b) @ w, contact + 0.03  # agent relative to the block
        if self.phase == 'push':
            if sim._room(i, int(u[1] != 0), u.sum(), 1) < 0.01:
                self.left = 0  # the block is stuck: start a new segment
            return u - 0.5 * across / sim.speed * w  # push, re-centring on the block
        if along > -contact - 0.005:  # not behind: step out of the lane sideways, then walk back along it
            t = (along, np.copysign(1.5 * gap, across)) if abs(across) < gap else (-gap, across)
        else:
            t = (-gap, 0.0)
            if abs(across) < 0.01 and abs(along + gap) < 0.015:
                self.phase = 'push'
        return (b + t[0] * u + t[1] * w - a) / sim.speed


def record(sim, policy, T, rng, noise=SENSOR_NOISE):
    """Run `policy` in `sim` (PushSim or PushT) for T frames, as a camera sees them: each frame gets sensor
    noise (Gaussian, `noise` intensity levels of 255, drawn from rng). frames[t+1] is the render after
    applying actions[t] to states[t]. Returns dict(frames (T,H,W,3) uint8, actions (T-1,2), states (T,S))."""
    frames, states, actions = [sim.render()], [sim.get_state()], []
    for _ in range(T - 1):
        actions.append(policy.act(sim))
        frames.append(sim.step(actions[-1]))
        states.append(sim.get_state())
    frames = np.stack(frames)
    frames = np.clip(frames + rng.normal(0, noise, frames.shape).round(), 0, 255).astype(np.uint8)
    return dict(frames=frames, actions=np.stack(actions).astype(np.float32), states=np.stack(states).astype(np.float32))


POLICIES = {'explore': ExplorePolicy, 'random': RandomPolicy}


def generate_episode(seed, T=48, res=64, world='big', policy='explore', noise=SENSOR_NOISE):
    """One episode of the built-in simulator under `policy` ('explore' or 'random', POLICIES): record()'s
    dict, states (T,8), plus n_blocks. noise=0 gives the simulator's exact renders."""
    if policy not in POLICIES:
        raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    sim = PushSim(res, seed, world)
    return dict(record(sim, POLICIES[policy](np.random.default_rng([seed, 1])), T, np.random.default_rng([seed, 2]), noise),
                n_blocks=sim.n_blocks)


def _episode_seed(seed, i):
    return seed * 1_000_000 + i  # the CLI writer and prepare_from_sim produce the same episodes


# ----------------------------------------------------------------------------- planning tasks

def task_success(family, state, goal_state, n_blocks, tol=TOL):
    """reach: the agent is within tol of the goal. push: every block is within tol of its goal; the agent
    is ignored, since after a push it may stand anywhere. Works on (..., 8) arrays."""
    d = np.linalg.norm((np.asarray(state) - np.asarray(goal_state)).reshape(*np.shape(state)[:-1], -1, 2), axis=-1)
    if family == 'reach':
        ok = d[..., 0] <= tol
    elif family == 'push':
        ok = np.all(d[..., 1:1 + n_blocks] <= tol, axis=-1)
    else:
        raise ValueError(f"unknown task family {family!r} (reach, push)")
    return ok if ok.ndim else bool(ok)


def make_task(family, seed, horizon=24, res=64, tol=TOL, world='big'):
    """A planning task with a reachable goal: from the start, run the exploration policy (push: scripted
    pushes only) for `horizon` steps, retrying until the goal is > 2*tol from the start; a start where that
    fails (blocks jammed in corners) is replaced by the next one. `actions` is one plan that reaches the goal.
    Episode seeds start at 1e9, away from the training episodes' seeds."""
    for k in range(10):
        episode_seed = 10 ** 9 + 100 * seed + k
        sim = PushSim(res, episode_seed, world)
        start, start_frame = sim.get_state(), sim.render()
        for attempt in range(20):
            sim.set_state(start)
            policy = ExplorePolicy(np.random.default_rng([seed, k, attempt]), p_push=float(family == 'push'))
            actions = np.empty((horizon, ACTION_DIM), np.float32)
            for t in range(horizon):
                actions[t] = policy.act(sim)
                sim.step(actions[t])
            goal = sim.get_state()
            if not task_success(family, start, goal, sim.n_blocks, 2 * tol):
                return dict(family=family, seed=seed, episode_seed=episode_seed, res=res, world=world, horizon=horizon,
                            n_blocks=sim.n_blocks, tol=tol, start_state=start, goal_state=goal,
                            start_frame=start_frame, goal_frame=sim.render(), actions=actions)
    raise RuntimeError(f"no {family} task found for seed {seed} within horizon {horizon}")


# ----------------------------------------------------------------------------- loading episodes

def _to_rgb(frames, path):
    """(T,H,W[,C]) -> (T,H,W,3) uint8: grey is repeated, alpha dropped."""
    if frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8, got {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{path}: frames must be (T,H,W[,C]) with C in 1,3,4, got {frames.shape}")
    return np.repeat(frames, 3, -1) if frames.shape[-1] == 1 else frames[..., :3]


def resize(frames, res):
    """Centre-crop to a square (keeps the aspect ratio of objects), then resize to res x res."""
    T, H, W, _ = frames.shape
    s = min(H, W)
    frames = frames[:, (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
    if s == res:
        return np.ascontiguousarray(frames)
    # Pillow's bilinear filter widens its support when shrinking, so downscaling is anti-aliased.
    return np.stack([np.asarray(Image.fromarray(f).resize((res, res), Image.BILINEAR)) for f in frames])


def load_episode(path, res):
    """Load an .npz (frames, optional actions/states) or a video (.mp4/.webm/.gif) at res x res.
    Returns dict(frames (T,res,res,3) uint8, actions (T-1,A) float32 or None, states (T,S) float32 or None).
    Raises ValueError naming the file if it is unreadable or malformed."""
    actions = states = None
    try:
        if path.endswith('.npz'):
            with np.load(path, allow_pickle=False) as z:
                frames = z['frames']
                actions = z['actions'].astype(np.float32) if 'actions' in z else None
                states = z['states'].astype(np.float32) if 'states' in z else None
        else:
            import imageio.v3 as iio  # imported here: only video sources need it
            frames = np.asarray(iio.imread(path, index=None) if path.endswith('.gif') else
                                iio.imread(path, plugin='FFMPEG'))
    except Exception as e:  # zip, codec and container errors come in many types; all mean "bad file"
        raise ValueError(f"cannot read episode {path}: {type(e).__name__}: {e}") from e
    frames = _to_rgb(frames, path)
    T = len(frames)
    if T < 2:
        raise ValueError(f"{path}: an episode needs at least 2 frames, got {T}")
    frames = resize(frames, res)
    if actions is not None and (actions.ndim != 2 or len(actions) != T - 1):
        raise ValueError(f"{path}: actions must be (T-1, A) = ({T - 1}, A), got {actions.shape}")
    if states is not None and (states.ndim != 2 or len(states) != T):
        raise ValueError(f"{path}: states must be (T, S) = ({T}, S), got {states.shape}")
    return dict(frames=frames, actions=actions, states=states)


def _episode_files(src):
    return [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(('.npz',) + VIDEO_EXTS)]


# ----------------------------------------------------------------------------- preparing shards

def _atomic_save(path, write):
    """write(file) to a temp name, then rename: readers see the whole file or none."""
    with open(path + '.tmp', 'wb') as f:
        write(f)
    os.replace(path + '.tmp', path)


def _pad(x, rows):
    """Zero-pad (L, D) to (rows, D) so actions share the frames' row numbering."""
    return None if x is None else np.concatenate([x, np.zeros((rows - len(x), x.shape[1]), np.float32)])


def _pack(out_dir, res, episodes, shard_frames, src, src_files=None):
    """Stream (name, episode) pairs into shard_XXXX.bin files (raw uint8 frames), actions.npy/states.npy
    (one row per frame, the last action of each episode zero-padded) and index.json, written last."""
    os.makedirs(out_dir, exist_ok=True)
    stale = lambda f: f in (INDEX, 'actions.npy', 'states.npy') or f.startswith('shard_') or f.endswith('.tmp')
    for f in filter(stale, os.listdir(out_dir)):  # the old index goes first: it would describe the new shards
        os.remove(os.path.join(out_dir, f))
    shards, index, acts, sts, fh, n, total = [], [], [], [], None, 0, 0

    def close_shard():
        fh.close()
        os.replace(fh.name, fh.name[:-4])  # drop .tmp
        shards.append(dict(file=os.path.basename(fh.name[:-4]), frames=n))
    try:
        for name, ep in episodes:
            L = len(ep['frames'])
            if fh is None or (n and n + L > shard_frames):  # a shard holds whole episodes
                if fh is not None:
                    close_shard()
                fh, n = open(os.path.join(out_dir, f'shard_{len(shards):04d}.bin.tmp'), 'wb'), 0
            fh.write(np.ascontiguousarray(ep['frames']).tobytes())
            index.append(dict(source=name, shard=len(shards), offset=n, start=total, length=L))
            n, total = n + L, total + L
            acts.append(_pad(ep['actions'], L))
            sts.append(_pad(ep['states'], L))
        if not index:
            raise ValueError(f"empty dataset: no usable episodes in {src}")
        close_shard()
        fh = None
        dims = {}
        for key, xs in (('action', acts), ('state', sts)):
            dims[key] = xs[0].shape[1] if all(x is not None for x in xs) and len({x.shape[1] for x in xs}) == 1 else None
            if dims[key] is None and any(x is not None for x in xs):
                warnings.warn(f"{src}: {key}s missing or of different sizes in some episodes; dropping all {key}s")
            if dims[key] is not None:
                _atomic_save(os.path.join(out_dir, f'{key}s.npy'), lambda f: np.save(f, np.concatenate(xs)))
        meta = dict(res=res, source=str(src), src_files=src_files, shards=shards, episodes=index,
                    action_dim=dims['action'], state_dim=dims['state'])
        _atomic_save(os.path.join(out_dir, INDEX), lambda f: f.write(json.dumps(meta).encode()))
    except BaseException:  # Ctrl-C included: leave no shards that no index describes
        if fh is not None:
            fh.close()
        for f in filter(stale, os.listdir(out_dir)):
            os.remove(os.path.join(out_dir, f))
        raise
    return out_dir


def _lerobot(src, camera='', stride=1):
    """A LeRobot dataset root (meta/info.json) as a lerobot.Source (one camera, every stride-th frame), else None."""
    import lerobot  # here, not at the top: one concept per file, and pyarrow/av load only for a LeRobot root
    return lerobot.Source(src, camera, stride) if lerobot.is_lerobot(src) else None


def prepare(src, out_dir, res, clip_len=None, skip_bad=False, shard_frames=20_000, camera='', stride=1):
    """Pack a folder of .npz/video episodes, or a LeRobot dataset (its `camera`, every `stride`-th frame), into
    shards at res x res (20k frames = 245 MB at 64 px). Bad files, and episodes shorter than clip_len, raise
    ValueError naming the file, or are skipped with a warning when skip_bad. Prints frames/s."""
    source = _lerobot(src, camera, stride)
    if source is not None:
        names, src_files = source.names, source.files
        load = lambda k: source.load(k, lambda f: resize(f[None], res)[0])
    else:
        names = src_files = [os.path.basename(f) for f in _episode_files(src)]
        load = lambda k: load_episode(os.path.join(src, names[k]), res)
    t0, n = time.perf_counter(), [0]

    def episodes():
        for k, name in enumerate(tqdm(names, desc=f'prepare {src}')):
            path = os.path.join(src, name)
            try:
                ep = load(k)
                if clip_len and len(ep['frames']) < clip_len:
                    raise ValueError(f"{path}: {len(ep['frames'])} frames, shorter than clip_len={clip_len}")
            except ValueError as e:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping bad episode: {e}")
                continue
            n[0] += len(ep['frames'])
            yield name, ep
    out = _pack(out_dir, res, episodes(), shard_frames, src, src_files)
    dt = time.perf_counter() - t0
    print(f"prepared {src}: {n[0]} frames at {res}x{res} in {dt:.1f} s ({n[0] / dt:,.0f} frames/s)")
    return out


def prepare_from_sim(out_dir, episodes, T=48, res=64, seed=0, world='big', policy='explore', shard_frames=20_000):
    """Simulator episodes straight into shards (same episodes as `python data.py --seed=seed`)."""
    eps = ((f'sim_{i:06d}', generate_episode(_episode_seed(seed, i), T, res, world, policy))
           for i in tqdm(range(episodes), desc='simulating'))
    return _pack(out_dir, res, eps, shard_frames, f'PushSim(seed={seed}, world={world}, policy={policy})')


def default_dataset(res=64, episodes=1000, T=48, seed=0, root=None, world='big', policy='explore'):
    """The built-in dataset, simulated once and cached under $COLA_DATA or ./data_cache; returns its dir.
    It is built in a private temp dir and renamed into place, so concurrent callers (DDP ranks) are safe."""
    root = root or os.environ.get('COLA_DATA') or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data_cache')
    out = os.path.join(root, f'sim_{world}_{policy}_noise{SENSOR_NOISE:g}_res{res}_ep{episodes}_T{T}_seed{seed}')
    if os.path.exists(os.path.join(out, INDEX)):
        return out
    tmp = f'{out}.tmp{os.getpid()}'
    prepare_from_sim(tmp, episodes, T, res, seed, world, policy)
    if os.path.isdir(out) and not os.path.exists(os.path.join(out, INDEX)):
        shutil.rmtree(out)  # not a dataset: no index
    try:
        os.replace(tmp, out)
    except OSError:  # another process got there first
        shutil.rmtree(tmp)
    return out


def resolve_data(data_dir, res, clip_len=None, skip_bad=False, world='big', policy='explore', camera='', stride=1):
    """The prepared dir for --data: None -> the built-in dataset of that world and policy; a prepared folder
    -> itself; a folder of episodes -> prepared once into <data_dir>/.prepared_<res> (redone when its file
    list changes); a LeRobot dataset likewise, into .prepared_<res>_<camera>[_stride<stride>]."""
    if data_dir is None:
        return default_dataset(res, world=world, policy=policy)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data={data_dir}: no such folder")
    if os.path.exists(os.path.join(data_dir, INDEX)):
        with open(os.path.join(data_dir, INDEX)) as f:
            have = json.load(f)['res']
        if have != res:
            raise ValueError(f"--data={data_dir} was prepared at res={have}, not res={res}; prepare it again")
        return data_dir
    source = _lerobot(data_dir, camera, stride)
    files = source.files if source else [os.path.basename(f) for f in _episode_files(data_dir)]
    if not files or source and not source.names:
        raise ValueError(f"empty dataset: no .npz/{'/'.join(VIDEO_EXTS)} episodes in --data={data_dir}")
    cache = os.path.join(data_dir, f'.prepared_{res}' + (source.tag if source else ''))
    if os.path.exists(os.path.join(cache, INDEX)):
        with open(os.path.join(cache, INDEX)) as f:
            if json.load(f)['src_files'] == files:
                return cache
    return prepare(data_dir, cache, res, clip_len, skip_bad, camera=camera, stride=stride)


# ----------------------------------------------------------------------------- sampling clips

class ClipSampler:
    """Random clips of clip_len frames from a prepared dir, read through np.memmap.

    Episodes are split into train/val by a fixed permutation (independent of `seed`: every run holds out
    the same episodes). Clips are drawn by choosing an episode weighted by its number of valid starts, then
    a uniform start. The RNG is seeded from (seed, rank), so DDP ranks draw different clips.
    """

    def __init__(self, prepared_dir, clip_len, split='train', val_frac=0.1, seed=0, rank=0, world_size=1):
        assert 0 <= rank < world_size, (rank, world_size)
        with open(os.path.join(prepared_dir, INDEX)) as f:
            meta = json.load(f)
        self.dir, self.res, self.clip_len, self.index = prepared_dir, meta['res'], clip_len, meta['episodes']
        R = self.res
        self.shards = [np.memmap(os.path.join(prepared_dir, s['file']), np.uint8, 'r', shape=(s['frames'], R, R, 3))
                       for s in meta['shards']]
        load = lambda key: np.load(os.path.join(prepared_dir, f'{key}s.npy'), mmap_mode='r') if meta[f'{key}_dim'] else None
        self.actions, self.states = load('action'), load('state')  # (N_frames, A), (N_frames, S)
        self.action_dim = meta['action_dim']
        n = len(self.index)
        n_val = min(n - 1, max(1, round(val_frac * n))) if n >= 2 and val_frac > 0 else 0
        perm = np.random.default_rng(SPLIT_SEED).permutation(n)
        self.splits = {'train': sorted(perm[:n - n_val].tolist()), 'val': sorted(perm[n - n_val:].tolist())}
        self.ids = np.array(self.splits[split])
        starts = np.array([max(0, self.index[i]['length'] - clip_len + 1) for i in self.ids], float)
        if starts.sum() == 0:
            raise ValueError(f"{prepared_dir}: no {split} episode has {clip_len} frames")
        self.p = starts / starts.sum()
        self.rng = np.random.default_rng([seed, rank])

    def episodes(self, split='train'):
        """Episode indices of a split ('train' or 'val')."""
        return list(self.splits[split])

    def get_episode(self, i):
        """Full episode i: dict(frames (T,H,W,3) uint8, actions (T-1,A) or None, states (T,S) or None, source)."""
        e = self.index[i]
        s = slice(e['start'], e['start'] + e['length'])
        return dict(frames=np.array(self.shards[e['shard']][e['offset']:e['offset'] + e['length']]),
                    actions=None if self.actions is None else np.array(self.actions[s][:-1]),
                    states=None if self.states is None else np.array(self.states[s]), source=e['source'])

    def sample(self, batch_size):
        """dict(frames (B,T,H,W,3) uint8, actions (B,T-1,A) float32 or None, states (B,T,S) float32 or None,
        episode (B,), start (B,)) as torch tensors."""
        T, R = self.clip_len, self.res
        eps = self.rng.choice(self.ids, size=batch_size, p=self.p)
        starts = np.array([self.rng.integers(0, self.index[i]['length'] - T + 1) for i in eps])
        frames = np.empty((batch_size, T, R, R, 3), np.uint8)
        for b, (i, s) in enumerate(zip(eps, starts)):
            e = self.index[i]
            frames[b] = self.shards[e['shard']][e['offset'] + s:e['offset'] + s + T]
        rows = lambda x, n: None if x is None else torch.from_numpy(
            np.stack([x[self.index[i]['start'] + s:self.index[i]['start'] + s + n] for i, s in zip(eps, starts)]))
        return dict(frames=torch.from_numpy(frames), actions=rows(self.actions, T - 1), states=rows(self.states, T),
                    episode=torch.from_numpy(eps), start=torch.from_numpy(starts))

    def state_dict(self):
        return dict(rng=self.rng.bit_generator.state)

    def load_state_dict(self, sd):
        self.rng.bit_generator.state = sd['rng']


# ----------------------------------------------------------------------------- command line

def write_episodes(out_dir, episodes, seed=0, T=48, res=64, env='sim', world='big', policy='explore', format='npz'):
    """Episodes of the built-in simulator (env='sim', in `world` under `policy`) or of PushT ('pusht') as
    ep_XXXXXX.npz files (frames, actions, states; n_blocks for sim), each written atomically, or (format=
    'lerobot') as a LeRobot v3.0 dataset at 10 fps (lerobot.write_dataset)."""
    if env == 'pusht':
        from pusht import generate_pusht_episode  # here, not at the top: pusht.py imports data.py
        generate = lambda s: generate_pusht_episode(s, T, res)
    else:
        generate = lambda s: generate_episode(s, T, res, world, policy)
    if format == 'lerobot':
        import lerobot  # here, not at the top: it needs pyarrow and av
        eps = (generate(_episode_seed(seed, i)) for i in tqdm(range(episodes), desc=f'writing {out_dir}'))
        codec = lerobot.write_dataset(out_dir, eps)
        print(f"wrote a LeRobot v3.0 dataset, video {codec}" + ('' if 'av1' in codec else
              " (this PyAV build has no AV1 encoder)") + f": {out_dir}")
        return
    os.makedirs(out_dir, exist_ok=True)
    for i in tqdm(range(episodes), desc=f'writing {out_dir}'):
        ep = generate(_episode_seed(seed, i))
        _atomic_save(os.path.join(out_dir, f'ep_{i:06d}.npz'), lambda f: np.savez(f, **ep))


def bench(res=64, n=5000):
    """Print simulator frames/s (step+render; and with the exploration policy), block-contact fraction
    and ClipSampler clips/s (B=16, T=6)."""
    sim, acts = PushSim(res, 0), np.random.default_rng(0).uniform(-1, 1, (n, 2))
    t0 = time.perf_counter()
    for a in acts:
        sim.step(a)
    print(f"step+render: {n / (time.perf_counter() - t0):,.0f} frames/s at {res}x{res}")
    t0, moved = time.perf_counter(), []
    for seed in range(n // 50):
        st = generate_episode(seed, 50, res)['states']
        moved.append(np.abs(np.diff(st[:, 2:], axis=0)).max(1) > 1e-6)
    print(f"generate_episode: {n / (time.perf_counter() - t0):,.0f} frames/s; "
          f"steps where a block moved: {np.mean(moved):.1%}")
    with tempfile.TemporaryDirectory() as d:
        sampler = ClipSampler(prepare_from_sim(d, 40, 32, res), clip_len=6)
        t0 = time.perf_counter()
        for _ in range(1000):
            sampler.sample(16)
        print(f"ClipSampler: {1000 * 16 / (time.perf_counter() - t0):,.0f} clips/s (B=16, T=6)")


def main(argv=None):
    flag = lambda s: str(s).lower() in ('1', 'true', 'yes')
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('command', nargs='?', choices=['generate', 'prepare'], default='generate')
    p.add_argument('--out_dir')
    p.add_argument('--episodes', type=int, default=300)
    p.add_argument('--env', choices=['sim', 'pusht'], default='sim', help='generate: built-in simulator or PushT')
    p.add_argument('--world', choices=list(WORLDS), default='big', help='generate: the simulator world (WORLDS)')
    p.add_argument('--policy', choices=list(POLICIES), default='explore',
                   help='generate: exploration (smooth motion and pushes) or random (i.i.d. moves each step)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--T', type=int, default=48)
    p.add_argument('--res', type=int, default=64)
    p.add_argument('--format', choices=['npz', 'lerobot'], default='npz',
                   help='generate: .npz files or a LeRobot v3.0 dataset')
    p.add_argument('--src', help='prepare: folder of .npz/.mp4/.webm/.gif episodes, or a LeRobot dataset')
    p.add_argument('--camera', default='', help="prepare, LeRobot: the video feature ('' = the first)")
    p.add_argument('--frame_stride', type=int, default=1, help='prepare, LeRobot: keep every Nth frame')
    p.add_argument('--clip_len', type=int, default=None, help='prepare: refuse shorter episodes')
    p.add_argument('--skip_bad', type=flag, nargs='?', const=True, default=False)
    p.add_argument('--bench', type=flag, nargs='?', const=True, default=False)
    args = p.parse_args(argv)
    if args.bench:
        return bench(args.res)
    if not args.out_dir or (args.command == 'prepare' and not args.src):
        p.error('--out_dir is required (and --src for prepare)')
    if args.command == 'prepare':
        prepare(args.src, args.out_dir, args.res, args.clip_len, args.skip_bad, camera=args.camera,
                stride=args.frame_stride)
    else:
        write_episodes(args.out_dir, args.episodes, args.seed, args.T, args.res, args.env, args.world, args.policy,
                       args.format)


if __name__ == '__main__':
    main()
