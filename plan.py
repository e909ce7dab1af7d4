"""
Visual planning with a CoLA-World checkpoint: model-predictive control towards a goal image, the VP2
protocol the paper uses, on the built-in simulator (tasks `reach`, `push`) and on PushT (gym-pusht).

  python plan.py --ckpt=out/ckpt.pt                              # reach + push: ours, random, oracle
  python plan.py --ckpt=out-pusht/ckpt.pt --tasks=pusht          # needs requirements-pusht.txt
  python plan.py --ckpt=out/ckpt.pt --method=cem --n_samples=200 --planners=ours

Every planning step samples n_samples real-action sequences of `horizon` steps (MPPI or CEM), maps them
through the real-action adapter (fit on labelled training episodes exactly as eval.py fits it) and the
LAM's own quantizer to latent actions, rolls the world model out for all of them in one batched call from
the last n_context observed frames, scores each by the pixel MSE of its predicted frames to the goal
image, executes the first exec_steps actions of the plan in the environment and replans. Two references
run the same loop: `random` (uniform random actions) and `oracle` (the same planner with the environment
itself as the model: its state is saved, every sequence is stepped and rendered, the state restored),
the ceiling for this planner. Success is the environment's own test on the final state (task_success;
PushT: the env's coverage > 0.95). GIFs: out_dir/FAMILY_K.gif, observed | predicted | goal, for `ours`.
The last line of stdout is one JSON object: the settings, and per family and planner FAMILY_PLANNER_success
(fraction of tasks solved), FAMILY_PLANNER_dist (mean final distance to the goal state), and
FAMILY_PLANNER_s_per_plan.
"""
import itertools
import json
import os
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch

import measure
from configurator import configure, fail
from data import to_model, to_uint8, write_gif
from pusht import PushT
from sim import ACTION_DIM, ExplorePolicy, PushSim

# ----------------------------------------------------------------------------------------------------
# settings (applied by configure() at the bottom, so that the tests can import the planner)
ckpt = 'out/ckpt.pt'
data = ''               # labelled episodes the adapter learns from (train split); '' = the checkpoint's data
camera = ''             # LeRobot --data: the camera (video or image feature); '' = the checkpoint's, else the first
frame_stride = 0        # LeRobot --data: keep every Nth frame; 0 = the checkpoint's
tasks = 'reach,push'    # comma-separated task families: reach, push (built-in simulator), pusht
planners = 'ours,random,oracle'
n_tasks = 10            # tasks per family
n_seeds = 1             # planner seeds per task
task_horizon = 12       # reach, push: the goal is this many exploration steps away from the start
max_steps = 24          # environment steps per task
method = 'mppi'         # 'mppi' | 'cem'
n_samples = 50          # action sequences per optimisation iteration (the paper's MPPI: 50)
horizon = 8             # actions per sequence (8 = four world-model windows of the CPU preset's 4-frame clips)
n_iters = 2             # optimisation iterations per planning step (the plan is warm-started across steps)
exec_steps = 2          # actions executed before replanning
noise_std = 0.5         # std of the sampled action perturbations (actions live in [-1, 1])
smoothing = 0.8         # correlation of consecutive perturbations (0 = white noise)
temperature = 0.1       # MPPI: softmax temperature, in units of the samples' cost std
elite_frac = 0.1        # CEM: fraction of samples the Gaussian is refit to
euler_steps = 1         # Euler steps per world-model window; eval.py's 2 would double the time of a plan
cfg_scale = 1.0         # classifier-free guidance (!= 1 doubles the batch)
adapter_episodes = 32   # labelled training episodes the adapter learns from
adapter_steps = 500     # full-batch Adam steps of the adapter
n_gifs = 2              # GIFs per family (ours, seed 0)
out_dir = 'plans'
device = ''             # 'cpu', 'cuda', 'cuda:N'; '' = cuda if available
seed = 0
RENAMED = {'sample_steps': 'euler_steps'}  # old flags that still work


# ----------------------------------------------------------------------------------------------------
# the planner

class Planner:
    """Sampling-based optimisation of an action sequence (horizon, A) in [-1, 1]^A.

    MPPI (Williams et al. 2017): the new mean is the softmax(-cost / temperature)-weighted mean of Gaussian
    perturbations of the old one (costs in units of their std, so the temperature does not depend on the
    cost's scale). CEM: refit the Gaussian's mean and std to the elite_frac cheapest samples. The
    perturbations are correlated in time (AR(1) with coefficient `smoothing`, as in PDDM, Nagabandi et al.
    2019): white noise barely moves the agent in expectation, and pixel MSE is flat until the predicted
    agent overlaps its goal (oracle on 12 tasks at 32 px: reach 58% white, 75% smoothed; push 42%, 92%).
    The current mean is always sample 0. After k actions are executed, `shift(k)` drops them and pads
    with zeros, so the next planning step starts from the rest of this plan (warm start).
    """

    def __init__(self, method, horizon, action_dim, n_samples=50, n_iters=2, std=0.5, smoothing=0.8,
                 temperature=0.1, elite_frac=0.1, seed=0):
        if method not in ('mppi', 'cem'):
            raise ValueError(f"--method must be mppi or cem, got {method!r}")
        self.method, self.n_samples, self.n_iters, self.std, self.smoothing = method, n_samples, n_iters, std, smoothing
        self.temperature, self.n_elite = temperature, max(2, round(elite_frac * n_samples))
        self.gen = torch.Generator().manual_seed(seed)
        self.mean = torch.zeros(horizon, action_dim)

    def plan(self, cost):
        """cost: action sequences (N, H, A) -> (costs (N,), predicted frames (N, H, ...)). Returns the new
        mean plan (H, A) and the predicted frames of the cheapest sample of the last iteration."""
        mean, std = self.mean, torch.full_like(self.mean, self.std)
        for _ in range(self.n_iters):
            eps = torch.randn((self.n_samples,) + mean.shape, generator=self.gen)  # (N, H, A)
            for t in range(1, len(mean)):  # AR(1) in time, unit variance at every step
                eps[:, t] = self.smoothing * eps[:, t - 1] + (1 - self.smoothing ** 2) ** 0.5 * eps[:, t]
            eps[0] = 0
            a = (mean + std * eps).clamp(-1, 1)  # (N, H, A)
            c, pred = cost(a)
            if self.method == 'mppi':
                w = torch.softmax(-(c - c.min()) / (self.temperature * c.std().clamp(min=1e-12)), 0)
                mean = (w[:, None, None] * a).sum(0)
            else:
                elite = a[c.argsort()[:self.n_elite]]
                mean, std = elite.mean(0), elite.std(0).clamp(min=0.02)  # a floor: a CEM that stops exploring stalls
        self.mean = mean
        return mean, pred[c.argmin()]

    def shift(self, k):
        self.mean = torch.cat([self.mean[k:], torch.zeros_like(self.mean[:k])])


# ----------------------------------------------------------------------------------------------------
# models: the world model (ours) and the environment itself (oracle), each a cost over action sequences

def world_model_cost(model, adapter, obs, done, goal, euler_steps=2, cfg_scale=1.0, gen=None):
    """The cost of action sequences under the world model, from the observed frames obs (list of (R, R, 3)
    uint8, last n_context used; done: the real actions between them, (len(obs) - 1, A)) to the goal frame
    (R, R, 3). With an adapter, the observed transitions keep the IDM's own latent actions and the planned
    ones go adapter -> the LAM's quantizer, as in eval.py; a world model trained on real actions takes them in
    its latent-action slot (CoLAWorld.drive, encode_actions)."""
    wm, lam = model.wm, model.lam
    nc, dev = wm.cfg.n_context, wm.pos_time.device
    ctx = to_model(torch.from_numpy(np.stack(obs[-nc:]))[None], dev)  # (1, nc, 3, R, R)
    encode = lambda a: model.encode_actions(a, adapter)  # (N, H, A) -> (N, H, n_tok, d)
    if nc == 1:
        z_ctx = ctx.new_zeros(1, 0, lam.cfg.n_action_tokens, lam.cfg.action_dim)
    else:  # the IDM's latent actions of the observed transitions, or their real actions
        z_ctx = model.drive(ctx, torch.from_numpy(np.asarray(done[len(done) - nc + 1:], np.float32))[None].to(dev))
    goal_x = to_model(torch.tensor(goal)[None, None], dev)  # (1, 1, 3, R, R)

    @torch.inference_mode()
    def cost(a):
        z_plan = encode(a.to(dev))  # (N, H, n_tok, d)
        z = torch.cat([z_ctx.expand(len(a), -1, -1, -1), z_plan], 1)  # (N, nc-1+H, n_tok, d)
        frames = model.simulate(ctx.expand(len(a), -1, -1, -1, -1), z, euler_steps, cfg_scale, generator=gen)[:, nc:]
        return (frames - goal_x).square().mean((1, 2, 3, 4)).cpu(), frames
    return cost


def simulator_cost(sim, goal):
    """The same cost with the environment as a perfect model: from sim's current state, step and render
    every sequence, then put the state back."""
    start, goal_x = sim.get_state(), to_model(torch.tensor(goal)[None, None])

    def cost(a):
        frames = []
        for seq in a.numpy():
            sim.set_state(start)
            frames.append(np.stack([sim.step(act) for act in seq]))
        sim.set_state(start)
        frames = to_model(torch.from_numpy(np.stack(frames)))  # (N, H, 3, R, R)
        return (frames - goal_x).square().mean((1, 2, 3, 4)), frames
    return cost


# ----------------------------------------------------------------------------------------------------
# tasks: sim (step(action) -> frame, render, get_state, set_state), the goal frame, and result(), the
# environment's own success test on the current state with a continuous score beside it

TOL = 0.05  # default success tolerance (world units, ~3 px at 64 px)


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


def make_task(family, seed, horizon=24, res=64, tol=TOL):
    """A planning task with a reachable goal: from the start, run the exploration policy (push: scripted
    pushes only) for `horizon` steps, retrying until the goal is > 2*tol from the start; a start where that
    fails (blocks jammed in corners) is replaced by the next one. `actions` is one plan that reaches the goal.
    Episode seeds start at 1e9, away from the training episodes' seeds."""
    for k in range(10):
        episode_seed = 10 ** 9 + 100 * seed + k
        sim = PushSim(res, episode_seed)
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
                return dict(family=family, seed=seed, episode_seed=episode_seed, res=res, horizon=horizon,
                            n_blocks=sim.n_blocks, tol=tol, start_state=start, goal_state=goal,
                            start_frame=start_frame, goal_frame=sim.render(), actions=actions)
    raise RuntimeError(f"no {family} task found for seed {seed} within horizon {horizon}")


def sim_task(family, k, res, task_horizon=12):
    """Task k of a built-in family (make_task, the goal task_horizon exploration steps away); its score
    is the final distance of the agent (reach) or the blocks' mean distance (push) to the goal."""
    t = make_task(family, k, task_horizon, res)
    sim = PushSim(res, t['episode_seed'])

    def result():
        s, g = sim.get_state(), t['goal_state']
        d = np.linalg.norm((s - g).reshape(-1, 2), axis=1)
        return dict(success=task_success(family, s, g, t['n_blocks'], t['tol']),
                    dist=float(d[0] if family == 'reach' else d[1:1 + t['n_blocks']].mean()))
    return SimpleNamespace(sim=sim, goal=t['goal_frame'], result=result)


def pusht_task(k, res):
    """PushT task k, both images set through the env's reset_to_state. Goal: the T at the env's goal pose
    (the green T, against which the env measures coverage) with the agent touching it from a random side
    u; start: the T and the agent moved back by L along u (coverage between 0.3 and 0.8). One straight push
    of L solves it, so the goal is reachable, as make_task's are; the planner must push accurately."""
    sim, rng = PushT(res), np.random.default_rng([k, 2])
    goal = np.array(sim.env.goal_pose, float)  # block x, y, angle
    for _ in range(1000):
        u, L = rng.normal(size=2), rng.uniform(20, 80)
        u /= np.linalg.norm(u)
        start_block = [*(goal[:2] - L * u), goal[2]]
        sim.reset(state=[20, 20, *start_block])  # the agent out of the way while we measure the T
        centre = np.array(sim.env.block.local_to_world(sim.env.block.center_of_gravity))
        gap = next(d for d in range(300) if min(p.point_query(tuple(centre - d * u)).distance
                                               for p in sim.env.block.shapes) > 18)  # agent radius 15
        agent = centre - gap * u
        if not np.all((agent > 30) & (agent < 482)):
            continue
        goal_frame = sim.reset(state=[*(agent + L * u), *goal])
        sim.reset(state=[*agent, *start_block])
        if 0.3 < sim.coverage() < 0.8:
            return SimpleNamespace(sim=sim, goal=goal_frame,
                                   result=lambda: dict(success=sim.success(), coverage=sim.coverage()))
    raise RuntimeError(f"no PushT task found for k={k}")


def make(family, k, res, task_horizon=12):
    return pusht_task(k, res) if family == 'pusht' else sim_task(family, k, res, task_horizon)


# ----------------------------------------------------------------------------------------------------
# the MPC loop

def run_episode(task, planner, make_cost, max_steps, exec_steps, n_context, rng=None):
    """Plan, execute the first exec_steps actions, replan, for max_steps environment steps. planner None
    means uniform random actions from rng. make_cost(observed frames, actions between them, goal) -> cost.
    Returns (result, observed frames, predicted frames aligned with them, seconds per planning step)."""
    obs = [task.sim.render()] * n_context  # the start frame stands in for the context before it
    done = [np.zeros(ACTION_DIM, np.float32)] * (n_context - 1)  # ... and standing still for its actions
    pred, times = [obs[0]], []
    while len(obs) - n_context < max_steps:
        n = min(exec_steps, max_steps - len(obs) + n_context)
        if planner is None:
            acts, frames = rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32), None
        else:
            t0 = time.perf_counter()
            acts, best = planner.plan(make_cost(obs, done, task.goal))
            times.append(time.perf_counter() - t0)
            acts, frames = acts[:n].numpy(), to_uint8(best[None, :n])[0]
            planner.shift(n)
        for i, a in enumerate(acts):
            obs.append(task.sim.step(a))
            done.append(a)
            pred.append(obs[-1] if frames is None else frames[i])
    return task.result(), obs[n_context - 1:], pred, times


def main():
    dev = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    families, names = tasks.split(','), planners.split(',')
    bad = set(families) - {'reach', 'push', 'pusht'} | set(names) - {'ours', 'random', 'oracle'}
    if bad:
        fail(f"unknown {sorted(bad)}: --tasks takes reach, push, pusht; --planners ours, random, oracle")
    try:
        model, settings, wm_cfg, sampler = measure.open_run(ckpt, data, dev, 'train', seed=seed, camera=camera, frame_stride=frame_stride)
        res, nc = wm_cfg.res, wm_cfg.n_context
        if 'pusht' in families:
            PushT(res)  # fails here, not after an hour of planning, when gym-pusht is absent
        adapter = None  # a world model trained on real actions plans with them directly
        if 'ours' in names and not model.real_actions:  # the real-action adapter, fit as eval.py fits it
            z_e, acts = measure.episode_latents(model, sampler, sampler.episodes('train')[:adapter_episodes], dev)
            if acts[0] is None:
                raise ValueError(f"{sampler.dir} has no actions: the adapter needs labelled episodes")
            adapter, losses = measure.train_adapter(torch.cat(acts), torch.cat(z_e), adapter_steps, seed=seed)
            print(f"adapter fit on {len(z_e)} labelled episodes: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    except (ValueError, OSError) as e:  # OSError: a full disk while preparing the data
        fail(str(e))
    except ImportError as e:
        fail(f"{e}: PushT needs `pip install -r requirements-pusht.txt`")
    os.makedirs(out_dir, exist_ok=True)
    print(f"{ckpt} ({settings['mode']}), {res}x{res}: {method}, {n_samples} samples x {n_iters} iterations, "
          f"horizon {horizon}, {exec_steps} actions per plan, {max_steps} steps per task, world model "
          f"{euler_steps} Euler steps, guidance {cfg_scale}")
    runs, gifs = defaultdict(list), []
    for family, k, s, name in itertools.product(families, range(n_tasks), range(n_seeds), names):
        task, run_seed = make(family, k, res, task_horizon), int(np.random.default_rng([seed, k, s]).integers(2 ** 31))
        planner = None if name == 'random' else Planner(method, horizon, ACTION_DIM, n_samples, n_iters, noise_std,
                                                        smoothing, temperature, elite_frac, run_seed)
        gen = torch.Generator(dev).manual_seed(run_seed)
        make_cost = (lambda o, d, g: world_model_cost(model, adapter, o, d, g, euler_steps, cfg_scale, gen)) \
            if name == 'ours' else (lambda o, d, g: simulator_cost(task.sim, g))
        r, obs, pred, times = run_episode(task, planner, make_cost, max_steps, exec_steps, nc,
                                          np.random.default_rng(run_seed))
        runs[family, name].append(dict(r, times=times))
        print(f"{family} task {k} seed {s} {name:>6}: " + ', '.join(f"{key} {v:.3f}" for key, v in r.items())
              + (f", {np.mean(times):.2f} s/plan" if times else ''))
        if name == 'ours' and s == 0 and k < n_gifs:
            gifs.append(os.path.join(out_dir, f'{family}_{k}.gif'))
            obs = np.stack(obs)  # observed | predicted | goal, one GIF frame per environment step
            write_gif(gifs[-1], np.stack([obs, np.stack(pred), np.broadcast_to(task.goal, obs.shape)])[None], fps=3,
                      n_context=1)
    out = dict(ckpt=ckpt, method=method, n_samples=n_samples, horizon=horizon, n_iters=n_iters, exec_steps=exec_steps,
               max_steps=max_steps, n_tasks=n_tasks, n_seeds=n_seeds, euler_steps=euler_steps, cfg_scale=cfg_scale)
    print(f"over {n_tasks} tasks x {n_seeds} seeds (dist: to the goal at the end, world units; coverage: PushT's)")
    for (family, name), rs in runs.items():
        key, score = f'{family}_{name}', 'coverage' if family == 'pusht' else 'dist'
        times = [t for r in rs for t in r['times']]
        out[key + '_success'] = float(np.mean([r['success'] for r in rs]))
        out[f'{key}_{score}'] = float(np.mean([r[score] for r in rs]))
        line = f"{family:>6} {name:>7}: success {out[key + '_success']:.2f}, {score} {out[f'{key}_{score}']:.3f}"
        if times:
            out[key + '_s_per_plan'] = float(np.mean(times))
            line += f", {out[key + '_s_per_plan']:.2f} s per plan"
        print(line)
    out['gifs'] = gifs
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    main()
