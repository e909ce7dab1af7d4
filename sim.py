"""
The built-in pushing simulator: a top-down world with a disk agent and square blocks, the two policies that
record its training episodes, and `record`, which films any simulator with a policy (PushT uses it too).
Datasets of it are written and prepared by data.py (`python data.py --out_dir=DIR`). Imports no sibling.
"""
import numpy as np

# Bodies are drawn from these ranges (world units: the arena is 1 wide). The agent is about 1/4 of the
# arena across and moves 40% of its radius a step at |action| = 1, so the action explains much of a frame's
# change (why a big agent: NOTES.md).
AGENT_R = (0.11, 0.13)
BLOCK_H = (0.07, 0.1)           # half-sizes
MAX_BLOCKS = 2                  # blocks per episode: 1 or 2
SPEED = 6 / 64                  # world units per step at |action| = 1
STATE_DIM = 8                   # agent xy, then three block slots xy (zeros for absent blocks)
ACTION_DIM = 2
# Recorded frames carry a camera's sensor noise (std in intensity levels of 255), or a still frame repeats its
# predecessor exactly and copy-last-frame scores PSNR's cap there, which no learned model can (NOTES.md).
SENSOR_NOISE = 2.0
EPS = 1e-6                      # contact slack: float32-rounded positions may overlap by ~1e-8
DIRS = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], float)  # scripted pushes are axis-aligned


def _f32(x):
    return float(np.float32(x))


# ----------------------------------------------------------------------------- simulator

class PushSim:
    """Top-down pushing world in [0,1]^2: a disk agent, 1-2 square blocks, kinematic contacts.

    Motion is resolved one axis at a time (x then y), like classic tile games: the agent moves, any block
    in its way is pushed along that axis as far as walls and other blocks allow (blocks never push
    blocks), and the agent stops at the block's face. Contacts use the agent's bounding box. This never
    creates overlaps and needs no tuning. Positions are rounded to float32 after every step, so
    set_state(get_state()) reproduces the simulator exactly.
    """

    def __init__(self, res=64, seed=0):
        self.res, self.speed = res, SPEED
        self.reset(seed)

    def reset(self, seed):
        """New episode: sizes, layout and appearance all drawn from `seed`."""
        rng = np.random.default_rng(seed)
        # Layout first, texture last: the texture draws res-dependent noise, and drawing it last keeps the
        # dynamics of an episode identical at every resolution.
        self.n_blocks = int(rng.integers(1, MAX_BLOCKS + 1))
        self.r = _f32(rng.uniform(*AGENT_R))                    # agent radius
        self.h = [_f32(v) for v in rng.uniform(*BLOCK_H, 3)]   # block half-sizes, one per state slot
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


def generate_episode(seed, T=48, res=64, policy='explore', noise=SENSOR_NOISE):
    """One episode of the built-in simulator under `policy` ('explore' or 'random', POLICIES): record()'s
    dict, states (T,8), plus n_blocks. noise=0 gives the simulator's exact renders."""
    if policy not in POLICIES:
        raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    sim = PushSim(res, seed)
    return dict(record(sim, POLICIES[policy](np.random.default_rng([seed, 1])), T, np.random.default_rng([seed, 2]), noise),
                n_blocks=sim.n_blocks)
