"""
Does CoLA-World reproduce? Every schedule the paper compares, trained from one shared pretrained world
model per environment at an equal step budget, over several seeds, then measured by eval.py and plan.py.

  python experiments.py                          # CPU: built-in simulator + PushT, 3 seeds, 2 workers
  python experiments.py config/experiments_gpu.py  # larger models and budgets, one job at a time on a GPU
  python experiments.py --envs=sim --seeds=0     # a subset
  python experiments.py --report_only            # rebuild results.md and the plots from the JSONs alone

Writes under out_dir (committed): ENV/SCHEDULE_sSEED.json per run (its train.py flags, eval.py's and
plan.py's figures, eval.py's figures at the end of the warm-up too, the training curves), ENV/references.json
(planning with random actions and with the simulator as the model), results.md (mean ± std over seeds)
and ENV_codebook.png, ENV_grads.png (needs matplotlib: `pip install matplotlib`). Checkpoints and logs go
under runs_dir. It resumes where it stopped: a run whose JSON exists is skipped, and an interrupted
training run continues from its checkpoint (train.py --resume), so the figures do not change.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from configurator import configure, fail

# ----------------------------------------------------------------------------------------------------
# settings: the CPU default's models and schedule length (about 9 hours on 2 CPU cores for everything,
# 8 minutes of training per run; config/experiments_gpu.py: one GPU)
envs = 'sim,pusht'      # built-in simulator (tasks reach, push) and gym-pusht (needs requirements-pusht.txt)
seeds = '0,1,2'
schedules = 'all'       # or a comma-separated subset of SCHEDULES' names
pretrain_steps = 2500   # the shared action-free world model, one per environment (seed 0), as train.py's default
budget = 3100           # steps after pretraining, the same for every schedule: N + M = W + J (as the default run)
warmup = 1000           # CoLA's warm-up W (the paper: 8K of 60K steps)
res = 32
train_args = ''         # extra train.py flags for every run (sizes: world_model.PRESETS['cpu'])
eval_args = '--n_clips=16'
plan_args = '--n_tasks=10'
episodes = 300          # PushT episodes recorded (the simulator's built-in dataset has 300)
workers = 2             # jobs at once
threads = 0             # torch threads per job; 0 = cpu_count // workers
device = ''             # passed to every job; '' = cuda if available
runs_dir = 'out-experiments'
out_dir = 'results'
report_only = False
configure(globals(), sys.argv[1:])
# ----------------------------------------------------------------------------------------------------

W = warmup
SCHEDULES = {  # name -> train.py flags; every one starts from the same pretrained world model
    'init': dict(mode='cola', warmup_steps=0, joint_steps=0),  # the start: no steps (a reference, not a rival)
    'two_stage': dict(mode='two_stage', lam_steps=budget // 2, wm_steps=budget - budget // 2),
    # the baseline with soft-to-hard over 60% of its LAM steps, the best two-stage setting found (NOTES.md)
    'two_stage_vq': dict(mode='two_stage', lam_steps=budget // 2, wm_steps=budget - budget // 2, quantizer='vq',
                         relax_anneal=0.6),
    'two_stage_under': dict(mode='two_stage', lam_steps=W, wm_steps=budget - W),  # LAM trained for W only
    'naive_joint': dict(mode='cola', warmup_steps=0, joint_steps=budget),
    'cola_warm_short': dict(mode='cola', warmup_steps=W // 3, joint_steps=budget - W // 3),
    'cola': dict(mode='cola', warmup_steps=W, joint_steps=budget - W),
    'cola_warm_long': dict(mode='cola', warmup_steps=3 * W, joint_steps=budget - 3 * W),
    'frozen_lam': dict(mode='frozen_lam', warmup_steps=W, joint_steps=budget - W),  # Fig. 4b: WM alone after
    'pure_warmup': dict(mode='cola', warmup_steps=budget, joint_steps=0),           # Fig. 4a: WM never trains
}
TASKS = {'sim': 'reach,push', 'pusht': 'pusht'}
CURVE_KEYS = ('step', 'phase', 'loss', 'flow', 'recon', 'code_util', 'code_max', 'code_entropy',
              'grad_lam', 'grad_action', 'grad_wm')
env_list, seed_list = envs.split(','), [int(s) for s in str(seeds).split(',')]
names = list(SCHEDULES) if schedules == 'all' else schedules.split(',')
if set(env_list) - set(TASKS) or set(names) - set(SCHEDULES):
    fail(f"--envs takes {', '.join(TASKS)}; --schedules takes all or {', '.join(SCHEDULES)}")
if not 0 < 3 * W < budget:
    fail(f"--warmup={W} must be positive and below budget/3 (the long warm-up is 3x it) = {budget / 3:.0f}")
threads = str(threads or max(1, (os.cpu_count() or 1) // workers))


def run(cmd, log_path, want_json=False):
    """Run one program (python file + flags) with its output in log_path; with want_json, return its last
    stdout line parsed as JSON (eval.py, plan.py). A failure raises with the log's tail."""
    cmd = [sys.executable] + cmd + ([f'--device={device}'] if device and cmd[0] != 'data.py' else [])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    with open(log_path, 'w') as log:
        log.write(shlex.join(cmd) + '\n')
        log.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        log.write(p.stdout)
    if p.returncode != 0:
        tail = open(log_path).read()[-2000:]
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {p.returncode}); log {log_path}:\n{tail}")
    if want_json:
        try:
            return json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise RuntimeError(f"{shlex.join(cmd)} did not end its output with a JSON line; log {log_path}") from None


def train(flags, out_dir_, log_path):
    """train.py with flags into out_dir_, continuing its checkpoint when there is one."""
    run([*flags, f'--out_dir={out_dir_}', *(['--resume'] if os.path.exists(os.path.join(out_dir_, 'ckpt.pt')) else [])],
        log_path)


def write_json(obj, path):
    """Write to a temporary file, then rename: a JSON that exists is a finished run."""
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


def prepare_env(env):
    """Data, the shared pretrained world model, and the planning references for one environment."""
    root = os.path.join(runs_dir, env)
    os.makedirs(root, exist_ok=True)
    data = []
    if env == 'pusht':
        data_dir = os.path.join(runs_dir, f'pusht_data_res{res}_ep{episodes}')
        if not os.path.exists(os.path.join(data_dir, 'done')):
            run(['data.py', '--env=pusht', f'--out_dir={data_dir}', f'--episodes={episodes}', f'--res={res}'],
                os.path.join(root, 'data.txt'))
            open(os.path.join(data_dir, 'done'), 'w').close()
        data = [f'--data={data_dir}']
    pre = os.path.join(root, 'pretrain')
    flags = ['train.py', *shlex.split(train_args), f'--res={res}', *data, '--eval_clips=0']
    train([*flags, '--seed=0', '--mode=pretrain', f'--pretrain_steps={pretrain_steps}'], pre,
          os.path.join(root, 'pretrain.txt'))
    ref_path = os.path.join(out_dir, env, 'references.json')
    if not os.path.exists(ref_path):
        refs = run(['plan.py', f'--ckpt={pre}/ckpt.pt', f'--tasks={TASKS[env]}', '--planners=random,oracle',
                    *shlex.split(plan_args), f'--out_dir={root}/plans_references'], os.path.join(root, 'references.txt'), True)
        write_json(refs, ref_path)
    return flags


def train_eval_plan(env, name, seed, flags):
    """One run: train (stopping once at the end of the warm-up to measure the alignment it produced),
    evaluate, plan; the JSON is written last."""
    path = os.path.join(out_dir, env, f'{name}_s{seed}.json')
    if os.path.exists(path):
        return 'skipped'
    d, sch = os.path.join(runs_dir, env, f'{name}_s{seed}'), SCHEDULES[name]
    os.makedirs(d, exist_ok=True)
    base = [*flags, f'--seed={seed}', f'--init_from={runs_dir}/{env}/pretrain/ckpt.pt',
            *(f'--{k}={v}' for k, v in sch.items())]
    result = dict(env=env, schedule=name, seed=seed, train_flags=[*base[1:], f'--out_dir={d}'])
    ckpt = os.path.join(d, 'ckpt.pt')
    evaluate = lambda log: run(['eval.py', f'--ckpt={ckpt}', *shlex.split(eval_args)], os.path.join(d, log), True)
    if sch.get('warmup_steps') and sch['joint_steps']:  # alignment at the end of the warm-up: the run, stopped there
        warm_json = os.path.join(d, 'eval_warmup.json')
        if not os.path.exists(warm_json):
            train([*base, '--joint_steps=0'], d, os.path.join(d, 'train_warmup.txt'))
            write_json(evaluate('eval_warmup.txt'), warm_json)
        result['eval_warmup'] = json.load(open(warm_json))
    train(base, d, os.path.join(d, 'train.txt'))
    result['eval'] = evaluate('eval.txt')
    result['plan'] = run(['plan.py', f'--ckpt={ckpt}', f'--tasks={TASKS[env]}', '--planners=ours',
                          *shlex.split(plan_args), f'--seed={seed}', f'--out_dir={d}/plans'], os.path.join(d, 'plan.txt'), True)
    by_step = {}  # a resumed run may have logged a step twice: keep the last record
    for line in open(os.path.join(d, 'log.jsonl')):
        rec = json.loads(line)
        by_step[rec['step']] = {k: rec[k] for k in CURVE_KEYS if k in rec}
    result['curves'] = [by_step[s] for s in sorted(by_step)]
    write_json(result, path)
    return 'done'


# ----------------------------------------------------------------------------------------------------
# the report: results.md and the plots, from the JSONs alone

def load_results():
    """env -> schedule -> [run JSONs], in SCHEDULES order, plus env -> references."""
    out, refs = {}, {}
    for env in TASKS:
        folder = os.path.join(out_dir, env)
        if not os.path.isdir(folder):
            continue
        runs = [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))
                if f.endswith('.json') and f != 'references.json']
        out[env] = {n: [r for r in runs if r['schedule'] == n] for n in SCHEDULES if any(r['schedule'] == n for r in runs)}
        if not out[env]:
            del out[env]
        if os.path.exists(os.path.join(folder, 'references.json')):
            refs[env] = json.load(open(os.path.join(folder, 'references.json')))
    return out, refs


def plan_mean(plan, planner, what='success'):
    """Mean of one planning figure (success, dist, coverage) over the task families in a plan.py JSON."""
    vals = [v for k, v in plan.items() if k.endswith(f'_{planner}_{what}')]
    return float(np.mean(vals)) if vals else float('nan')


COLUMNS = [  # (header, function of a run JSON, decimals)
    ('probe R²', lambda r: r['eval'].get('probe_r2'), 3),
    ('probe L1', lambda r: r['eval'].get('probe_l1'), 3),
    ('PSNR', lambda r: r['eval']['psnr'], 2),
    ('SSIM', lambda r: r['eval']['ssim'], 3),
    ('PSNR − null', lambda r: r['eval']['psnr_gain_over_null'], 2),
    ('adapter PSNR', lambda r: r['eval'].get('adapter_psnr'), 2),
    ('code util', lambda r: r['eval'].get('code_util'), 2),
    ('code max', lambda r: r['eval'].get('code_max'), 2),
    ('code entropy', lambda r: r['eval'].get('code_entropy'), 2),
    ('adapter util', lambda r: r['eval'].get('adapter_code_util'), 2),
    ('plan success', lambda r: plan_mean(r['plan'], 'ours'), 2),
    ('plan dist', lambda r: plan_mean(r['plan'], 'ours', 'dist'), 3),  # built-in tasks: to the goal at the end
    ('plan coverage', lambda r: plan_mean(r['plan'], 'ours', 'coverage'), 2),  # PushT
]


def cell(runs, fn, dec):
    """mean ± std over seeds (std with ddof=1, as error bars over seeds usually are)."""
    v = np.array([fn(r) for r in runs], float)
    if np.isnan(v).all():
        return '–'
    return f"{np.nanmean(v):.{dec}f} ± {np.nanstd(v, ddof=1):.{dec}f}" if len(v) > 1 else f"{v[0]:.{dec}f}"


def steps_of(flags):
    """A run's schedule in words, from its train.py flags."""
    sch = {k: v for k, v in (f.lstrip('-').split('=', 1) for f in flags if '=' in f)}
    if sch['mode'] == 'cola' and int(sch['warmup_steps']) + int(sch['joint_steps']) == 0:
        return 'none: the pretrained WM, a random IDM'
    if sch['mode'] == 'two_stage':
        return f"LAM {sch['lam_steps']} + WM {sch['wm_steps']}" + (f", {sch['quantizer'].upper()}" if 'quantizer' in sch else '')
    after = 'WM' if sch['mode'] == 'frozen_lam' else 'joint'
    return f"warm-up {sch['warmup_steps']} + {after} {sch['joint_steps']}"


def write_report(results, refs):
    """results.md: per environment, the table over schedules and the alignment before/after the warm-up."""
    lines = ['# Does it reproduce? (written by `python experiments.py`)', '',
             'Every run starts from the same action-free pretrained world model of its environment and trains for '
             'the same number of steps after it. Mean ± std over seeds (n runs); each run\'s flags are in its JSON. '
             'Probe: a linear map from latent actions to true actions, fit on training episodes, scored on held-out '
             'ones. PSNR, SSIM: held-out rollouts driven by the latent actions the IDM infers from the true clip; '
             'PSNR − null: their gain over the null action (> 0: the world model follows the latent actions); '
             'adapter: driven by real actions through the MLP adapter. Code util, max, entropy: the IDM\'s codes on '
             'held-out episodes; adapter util: the codes the adapter emits. Plan: MPPI through the world model; '
             'dist: distance to the goal at the end (world units, lower is better); coverage: PushT\'s.', '']
    for env, by_name in results.items():
        any_run = next(iter(by_name.values()))[0]
        lines += [f'## {env}', '', f"Copy-last-frame baseline: PSNR {any_run['eval']['copy_psnr']:.2f}, "
                  f"SSIM {any_run['eval']['copy_ssim']:.3f} (same held-out clips for every run)."
                  + (f" A probe that predicts the mean action: L1 {any_run['eval']['probe_l1_mean']:.3f}."
                     if 'probe_l1_mean' in any_run['eval'] else '')]
        if env in refs:
            ref = lambda p: ', '.join(f"{w} {plan_mean(refs[env], p, w):.3f}" for w in ('success', 'dist', 'coverage')
                                      if not np.isnan(plan_mean(refs[env], p, w)))
            lines.append(f"Planning references: random actions ({ref('random')}); the simulator as the model "
                         f"(oracle: {ref('oracle')}).")
        cols = [c for c in COLUMNS if any(cell(rs, c[1], c[2]) != '–' for rs in by_name.values())]  # e.g. PushT's
        lines += ['', '| schedule | steps | n | ' + ' | '.join(c[0] for c in cols) + ' |', '|' + '---|' * (3 + len(cols))]
        for name, runs in by_name.items():
            lines.append(f"| {name} | {steps_of(runs[0]['train_flags'])} | {len(runs)} | "
                         + ' | '.join(cell(runs, fn, dec) for _, fn, dec in cols) + ' |')
        warm = {n: rs for n, rs in by_name.items() if all('eval_warmup' in r for r in rs)}
        if warm:
            start = by_name.get('init')
            lines += ['', 'Alignment through training: the same runs measured '
                      + ('at the start (the `init` row), ' if start else '') + 'at the end of the warm-up and at the '
                      'end of training.', '',
                      '| schedule | probe R² | PSNR − null | code util | code entropy |', '|---|---|---|---|---|']
            for n, rs in warm.items():
                at = lambda k, d: ' -> '.join(([cell(start, lambda r: r['eval'].get(k), d)] if start else [])
                                              + [cell(rs, lambda r: r[e].get(k), d) for e in ('eval_warmup', 'eval')])
                lines.append(f"| {n} | {at('probe_r2', 3)} | {at('psnr_gain_over_null', 2)} | "
                             f"{at('code_util', 2)} | {at('code_entropy', 2)} |")
        lines.append('')
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(lines))
    print('\n'.join(lines))


def curve(runs, key):
    """(steps, mean, std) of a logged quantity over the seeds of one schedule, on the steps all have."""
    per_run = [{c['step']: c[key] for c in r['curves'] if key in c} for r in runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    v = np.array([[p[s] for s in steps] for p in per_run])  # (seeds, steps)
    return np.array(steps), v.mean(0), v.std(0)


def plot(results):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plots: matplotlib is not installed (pip install matplotlib)")
        return
    for env, by_name in results.items():
        for suffix, keys, log_y in (('codebook', ('code_util', 'code_max', 'code_entropy'), False),
                                    ('grads', ('grad_lam', 'grad_wm'), True)):
            fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
            for ax, key in zip(axes, keys):
                for name, runs in by_name.items():
                    s, m, sd = curve(runs, key)
                    if log_y:  # frozen phases log a zero norm: leave them out rather than plunge to -inf
                        m = np.where(m > 0, m, np.nan)
                    if not np.isnan(m).all():  # e.g. `init`: no curves
                        ax.plot(s, m, label=name, lw=1.3)
                        ax.fill_between(s, m - sd, m + sd, alpha=0.15)
                ax.set_title(f'{env}: {key} (mean ± std over seeds)', fontsize=9)
                ax.set_xlabel('step after pretraining')
                if log_y:
                    ax.set_yscale('log')
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            path = os.path.join(out_dir, f'{env}_{suffix}.png')
            fig.savefig(path, dpi=110)
            plt.close(fig)
            print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------
if not report_only:
    t0 = time.time()
    for env in env_list:
        os.makedirs(os.path.join(out_dir, env), exist_ok=True)
    jobs = [(env, n, s) for s in seed_list for env in env_list for n in names]
    print(f"{len(jobs)} runs ({', '.join(env_list)} x {len(names)} schedules x seeds {seed_list}), "
          f"{workers} at a time with {threads} threads each; logs under {runs_dir}")
    with ThreadPoolExecutor(workers) as pool:
        flags = dict(zip(env_list, pool.map(prepare_env, env_list)))
        print(f"pretrained world models and planning references ready ({time.time() - t0:.0f} s)")
        futures = {pool.submit(train_eval_plan, env, n, s, flags[env]): (env, n, s) for env, n, s in jobs}
        bar, failed = tqdm(total=len(jobs), desc='runs', dynamic_ncols=True), []
        for f in futures:  # a failed run is reported and the others go on: rerunning retries it alone
            env, n, s = futures[f]
            try:
                status = f.result()
            except Exception as e:  # noqa: BLE001 (any failure of one run: report it, keep the others)
                failed.append(f"{env} {n} seed {s}")
                status = f"FAILED: {e}"
            bar.update(1)
            bar.write(f"{env} {n} seed {s}: {status} ({time.time() - t0:.0f} s)")
        bar.close()
results, refs = load_results()
write_report(results, refs)
plot(results)
if not report_only and failed:
    fail(f"{len(failed)} runs failed ({'; '.join(failed)}): their logs are under {runs_dir}; rerun to retry them")
