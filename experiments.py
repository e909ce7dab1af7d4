"""
Does CoLA-World reproduce? The schedules that carry the paper's claims, trained from one shared pretrained
world model per environment at an equal step budget, over seeds, measured by eval.py and plan.py, and a
verdict per claim: does the difference exceed the spread over seeds?

  python experiments.py                          # CPU: simulator + PushT, seeds 0-2, 2 jobs (1 thread each on 2 cores)
  python experiments.py config/experiments_gpu.py  # the same on one GPU, 1000 PushT episodes, 4 jobs at once
  python experiments.py --envs=sim --seeds=0     # a subset
  python experiments.py --schedules=all          # every schedule in SCHEDULES on the simulator (PushT: pusht_schedules)
  python experiments.py --report_only            # rebuild results.md and the plots from the JSONs alone

Writes under out_dir (committed): ENV/SCHEDULE_sSEED.json per run (its train.py flags, eval.py's and
plan.py's figures, eval.py's figures at the intermediate steps of `evals_at`, the training curves),
ENV/references.json for the planned environments (planning with random actions and with the simulator as
the model), results.md (mean ± std over seeds, the verdicts), ENV_codebook.png, ENV_grads.png (needs
matplotlib) and timing.json (the wall time of a run from scratch with no failures). Checkpoints and
logs go under runs_dir. It resumes where it stopped: a run whose JSON exists is skipped, and an interrupted
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
from data import atomic_save

# ----------------------------------------------------------------------------------------------------
# settings: train.py's default models and quantizer; the step budget is cut to fit 2 CPU cores in 150
# minutes (the default run trains 1000 + 2100 steps after pretraining; here 400 + 800)
envs = 'sim,pusht'      # built-in simulator (tasks reach, push) and gym-pusht (needs requirements-pusht.txt)
seeds = '0,1,2'
schedules = 'two_stage,naive_joint,cola,pure_warmup'  # the claims' schedules; 'all' or any of SCHEDULES' names
pusht_schedules = 'two_stage,cola'  # PushT runs only these of them (a run there costs as much as in the simulator)
pretrain_steps = 2000   # the shared action-free world model, one per environment (seed 0)
budget = 1200           # steps after pretraining, the same for every schedule: N + M = W + J
warmup = 400            # CoLA's warm-up W (the paper: 8K of 60K steps)
res = 32
train_args = '--optimizer=adamw --lr_schedule=cosine'  # extra train.py flags for every run (sizes: world_model.PRESETS['cpu']);
                        # results/ were measured with AdamW + cosine, train.py's recipe before Muon + WSD
eval_args = '--n_clips=16'
plan_args = '--n_tasks=4'  # tasks per family (reach, push) and run
plan_envs = 'sim'       # environments whose runs are planned (PushT is left out to fit 150 minutes)
episodes = 300          # PushT episodes recorded (the built-in simulator's dataset has 1000)
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
    'two_stage': dict(mode='two_stage', lam_steps=budget // 2, wm_steps=budget - budget // 2),  # the baseline
    'naive_joint': dict(mode='cola', warmup_steps=0, joint_steps=budget),            # no warm-up: collapses?
    'cola': dict(mode='cola', warmup_steps=W, joint_steps=budget - W),
    'pure_warmup': dict(mode='cola', warmup_steps=budget, joint_steps=0),           # Fig. 4a: WM never trains
    # ablations (--schedules=all)
    'init': dict(mode='cola', warmup_steps=0, joint_steps=0),  # the start: no steps (a reference, not a rival)
    'two_stage_under': dict(mode='two_stage', lam_steps=W, wm_steps=budget - W),  # LAM trained for W only
    'cola_warm_short': dict(mode='cola', warmup_steps=W // 3, joint_steps=budget - W // 3),
    'cola_warm_long': dict(mode='cola', warmup_steps=2 * W, joint_steps=budget - 2 * W),
    'frozen_lam': dict(mode='frozen_lam', warmup_steps=W, joint_steps=budget - W),  # Fig. 4b: WM alone after
}
# intermediate evaluations (steps after pretraining): CoLA at the end of its warm-up (the alignment it made) and
# halfway between it and the end of the budget, (budget + W) / 2 (the paper: warm-up 8K + joint 30K roughly
# matched two-stage 30K + 30K)
EVALS_AT = {'cola': (W, W + (budget - W) // 2)}
TASKS = {'sim': 'reach,push', 'pusht': 'pusht'}
CURVE_KEYS = ('step', 'phase', 'loss', 'flow', 'recon', 'code_util', 'code_max', 'code_entropy',
              'grad_lam', 'grad_action', 'grad_wm')
env_list, seed_list = envs.split(','), [int(s) for s in str(seeds).split(',')]
names = list(SCHEDULES) if schedules == 'all' else schedules.split(',')
if set(env_list) - set(TASKS) or set(names) - set(SCHEDULES):
    fail(f"--envs takes {', '.join(TASKS)}; --schedules takes all or {', '.join(SCHEDULES)}")
if not 0 < 2 * W < budget:
    fail(f"--warmup={W} must be positive and below budget/2 (the long warm-up is 2x it) = {budget / 2:.0f}")
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
    """Write through data.atomic_save: a JSON that exists is a finished run."""
    atomic_save(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


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
    if env in plan_envs.split(',') and not os.path.exists(ref_path):
        refs = run(['plan.py', f'--ckpt={pre}/ckpt.pt', f'--tasks={TASKS[env]}', '--planners=random,oracle',
                    *shlex.split(plan_args), f'--out_dir={root}/plans_references'], os.path.join(root, 'references.txt'), True)
        write_json(refs, ref_path)
    return flags


def train_eval_plan(env, name, seed, flags):
    """One run: train (stopping at the steps of EVALS_AT to measure it there; --resume continues exactly),
    evaluate, plan; the JSON is written last."""
    path = os.path.join(out_dir, env, f'{name}_s{seed}.json')
    if os.path.exists(path):
        return 'skipped'
    d, sch = os.path.join(runs_dir, env, f'{name}_s{seed}'), SCHEDULES[name]
    os.makedirs(d, exist_ok=True)
    base = [*flags, f'--seed={seed}', f'--init_from={runs_dir}/{env}/pretrain/ckpt.pt',
            *(f'--{k}={v}' for k, v in sch.items())]
    result = dict(env=env, schedule=name, seed=seed, train_flags=[*base[1:], f'--out_dir={d}'], eval_at={})
    ckpt = os.path.join(d, 'ckpt.pt')
    evaluate = lambda log: run(['eval.py', f'--ckpt={ckpt}', *shlex.split(eval_args)], os.path.join(d, log), True)
    for at in EVALS_AT.get(name, ()):
        at_json = os.path.join(d, f'eval_at{at}.json')
        if not os.path.exists(at_json):
            train([*base, f'--stop_at={at}'], d, os.path.join(d, f'train_to{at}.txt'))
            write_json(evaluate(f'eval_at{at}.txt'), at_json)
        result['eval_at'][str(at)] = json.load(open(at_json))
    train(base, d, os.path.join(d, 'train.txt'))
    result['eval'] = evaluate('eval.txt')
    if env in plan_envs.split(','):
        result['plan'] = run(['plan.py', f'--ckpt={ckpt}', f'--tasks={TASKS[env]}', '--planners=ours',
                              *shlex.split(plan_args), f'--seed={seed}', f'--out_dir={d}/plans'],
                             os.path.join(d, 'plan.txt'), True)
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


def metric(key):
    """A function of a run JSON: eval.py's figure `key` at the end, or a planning figure ('reach_success',
    'push_success', 'plan_success' over both families); None where the run lacks it."""
    if key == 'plan_success':
        return lambda r: plan_mean(r['plan'], 'ours') if 'plan' in r else None
    if key.endswith('_success'):
        return lambda r: r.get('plan', {}).get(key.replace('_success', '_ours_success'))
    return lambda r: r['eval'].get(key)


COLUMNS = [  # (header, eval.py or planning key, decimals)
    ('probe R²', 'probe_r2', 3), ('one-hot R²', 'probe_onehot_r2', 3), ('pre-quant R²', 'probe_pre_r2', 3),
    ('speed R²', 'probe_speed_r2', 3), ('displacement R²', 'probe_disp_r2', 3),
    ('PSNR', 'psnr', 2), ('SSIM', 'ssim', 3), ('PSNR − null', 'psnr_gain_over_null', 2),
    ('PSNR − shuffled', 'psnr_gain_over_shuffled', 2), ('adapter PSNR', 'adapter_psnr', 2),
    ('agent err', 'state_err_agent', 3), ('blocks err', 'state_err_blocks', 3),
    ('code util', 'code_util', 2), ('code entropy', 'code_entropy', 2), ('adapter util', 'adapter_code_util', 2),
    ('reach', 'reach_success', 2), ('push', 'push_success', 2),
]


def values(runs, fn):
    """The figure fn over a schedule's runs, NaN where missing: (n_seeds,) floats."""
    return np.array([np.nan if fn(r) is None else fn(r) for r in runs], float)


def cell(runs, fn, dec):
    """mean ± std over seeds (std with ddof=1, as error bars over seeds usually are)."""
    v = values(runs, fn)
    if np.isnan(v).all():
        return '–'
    return f"{np.nanmean(v):.{dec}f} ± {np.nanstd(v, ddof=1):.{dec}f}" if len(v) > 1 else f"{v[0]:.{dec}f}"


def steps_of(flags):
    """A run's schedule in words, from its train.py flags."""
    sch = {k: v for k, v in (f.lstrip('-').split('=', 1) for f in flags if '=' in f)}
    if sch['mode'] == 'cola' and int(sch['warmup_steps']) + int(sch['joint_steps']) == 0:
        return 'none: the pretrained WM, a random IDM'
    if sch['mode'] == 'two_stage':
        return f"LAM {sch['lam_steps']} + WM {sch['wm_steps']}"
    after = 'WM' if sch['mode'] == 'frozen_lam' else 'joint'
    return f"warm-up {sch['warmup_steps']} + {after} {sch['joint_steps']}"


# The paper's claims as comparisons of two schedules on one figure: (claim, (schedule, step or None = the end),
# the other, figures, 'beats' (the first must be higher by more than the spread) or 'reaches' (not lower by more
# than the spread)). The spread: the sum of the two standard deviations over seeds.
CLAIMS = [
    ('naive joint training collapses (the warm-up prevents it)', ('cola', None), ('naive_joint', None),
     ('probe_r2', 'psnr_gain_over_shuffled', 'code_entropy'), 'beats'),
    ('the warm-up alone aligns the IDM (W steps, the WM frozen) beyond naive joint training at the whole budget',
     ('cola', 'W'), ('naive_joint', None), ('probe_r2', 'psnr_gain_over_shuffled'), 'beats'),
    ('joint training beats two-stage', ('cola', None), ('two_stage', None),
     ('probe_r2', 'psnr', 'adapter_psnr', 'plan_success'), 'beats'),
    ('co-evolution: training the WM after the warm-up beats a warm-up that never ends', ('cola', None),
     ('pure_warmup', None), ('psnr', 'probe_r2', 'plan_success'), 'beats'),
    ('warm-up + joint reaches two-stage at fewer steps ((budget + W) / 2)', ('cola', 'mid'), ('two_stage', None),
     ('probe_r2', 'psnr'), 'reaches'),
]


def claim_runs(by_name, schedule, at):
    """(runs as JSONs whose 'eval' is the one measured at `at`, words for it) or (None, '') when missing."""
    runs = by_name.get(schedule)
    if not runs:
        return None, ''
    if at is None:
        return runs, schedule
    steps = sorted(int(k) for k in runs[0].get('eval_at', {}))
    if len(steps) < 2:
        return None, ''
    step = steps[0] if at == 'W' else steps[-1]
    return [dict(r, eval=r['eval_at'][str(step)]) for r in runs], f"{schedule} at step {step}"


def verdicts(by_name):
    """Markdown lines: one per claim and figure, with both means ± std and the verdict."""
    lines = []
    for claim, (a, at_a), (b, at_b), keys, kind in CLAIMS:
        ra, wa = claim_runs(by_name, a, at_a)
        rb, wb = claim_runs(by_name, b, at_b)
        if ra is None or rb is None:
            continue
        lines.append(f"- **{claim}**:")
        for key in keys:
            va, vb = values(ra, metric(key)), values(rb, metric(key))
            if np.isnan(va).all() or np.isnan(vb).all():
                continue
            diff = np.nanmean(va) - np.nanmean(vb)
            spread = (np.nanstd(va, ddof=1) + np.nanstd(vb, ddof=1)) if min(len(va), len(vb)) > 1 else 0.0
            if kind == 'beats':
                verdict = 'HOLDS' if diff > spread else ('REVERSED' if -diff > spread else 'not shown (within the spread)')
            else:
                verdict = 'HOLDS' if diff >= -spread else 'DOES NOT HOLD'
            lines.append(f"  - {key}: {wa} {np.nanmean(va):.3f} ± {np.nanstd(va, ddof=1) if len(va) > 1 else 0:.3f} vs "
                         f"{wb} {np.nanmean(vb):.3f} ± {np.nanstd(vb, ddof=1) if len(vb) > 1 else 0:.3f}: difference "
                         f"{diff:+.3f}, spread {spread:.3f} -> {verdict}")
    return lines


def write_report(results, refs):
    """results.md: per environment, the verdicts, the table over schedules and the alignment through training."""
    lines = ['# Does it reproduce? (written by `python experiments.py`)', '',
             'Every run starts from the same action-free pretrained world model of its environment and trains for '
             'the same number of steps after it. Mean ± std over seeds (n runs); each run\'s flags are in its JSON. '
             'A claim holds when the difference of the means exceeds the spread (the sum of the two standard '
             'deviations over seeds). Probes: linear maps from latent actions (quantized, one-hot codes, before '
             'quantization) to the true action, its speed and the agent\'s displacement, fit on training episodes, '
             'R² on held-out ones. PSNR, SSIM: held-out rollouts driven by the latent actions the IDM infers from the '
             'true clip; − null, − shuffled: their gain over the null action and over the same latents shuffled in '
             'time; adapter: driven by real actions through the MLP adapter; agent, blocks err: object positions in '
             'the rollouts (eval.py\'s state probe). Reach, push: planning success (MPPI through the world model).', '']
    timing_path = os.path.join(out_dir, 'timing.json')
    if os.path.exists(timing_path):
        t = json.load(open(timing_path))
        lines += [f"`python experiments.py` took {t['wall_s'] / 60:.0f} minutes from scratch on {t['cpus']} CPU cores "
                  f"({t['workers']} jobs at a time, {t['threads']} threads each; {t['runs']} runs).", '']
    for env, by_name in results.items():
        any_run = next(iter(by_name.values()))[0]
        lines += [f'## {env}', '', 'Verdicts:', ''] + verdicts(by_name) + [
            '', f"Copy-last-frame baseline: PSNR {any_run['eval']['copy_psnr']:.2f}, "
            f"SSIM {any_run['eval']['copy_ssim']:.3f} (same held-out clips for every run)."]
        if env in refs:
            ref = lambda p: ', '.join(f"{w} {plan_mean(refs[env], p, w):.3f}" for w in ('success', 'dist', 'coverage')
                                      if not np.isnan(plan_mean(refs[env], p, w)))
            lines.append(f"Planning references: random actions ({ref('random')}); the simulator as the model "
                         f"(oracle: {ref('oracle')}).")
        cols = [c for c in COLUMNS if any(cell(rs, metric(c[1]), c[2]) != '–' for rs in by_name.values())]
        lines += ['', '| schedule | steps | n | ' + ' | '.join(c[0] for c in cols) + ' |', '|' + '---|' * (3 + len(cols))]
        for name, runs in by_name.items():
            lines.append(f"| {name} | {steps_of(runs[0]['train_flags'])} | {len(runs)} | "
                         + ' | '.join(cell(runs, metric(k), dec) for _, k, dec in cols) + ' |')
        steps = sorted({int(k) for rs in by_name.values() for r in rs for k in r.get('eval_at', {})})
        if steps:
            lines += ['', 'Through training: the runs measured at steps ' + ', '.join(map(str, steps))
                      + ' and at the end.', '',
                      '| schedule | probe R² | PSNR | PSNR − shuffled | code entropy |', '|---|---|---|---|---|']
            for n, rs in by_name.items():
                if not all(r.get('eval_at') for r in rs):
                    continue
                at = lambda k, d: ' -> '.join([cell(rs, lambda r, s=s: r['eval_at'][str(s)].get(k), d) for s in steps]
                                              + [cell(rs, metric(k), d)])
                lines.append(f"| {n} | {at('probe_r2', 3)} | {at('psnr', 2)} | {at('psnr_gain_over_shuffled', 2)} | "
                             f"{at('code_entropy', 2)} |")
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
    # the simulator's runs first, seed by seed: a budget cut short leaves whole seeds of the main comparison
    jobs = [(env, n, s) for env in env_list for s in seed_list for n in names
            if env != 'pusht' or n in pusht_schedules.split(',')]
    print(f"{len(jobs)} runs ({', '.join(env_list)}, seeds {seed_list}), "
          f"{workers} at a time with {threads} threads each; logs under {runs_dir}")
    with ThreadPoolExecutor(workers) as pool:
        flags = dict(zip(env_list, pool.map(prepare_env, env_list)))
        print(f"pretrained world models and planning references ready ({time.time() - t0:.0f} s)")
        futures = {pool.submit(train_eval_plan, env, n, s, flags[env]): (env, n, s) for env, n, s in jobs}
        bar, failed, n_skipped = tqdm(total=len(jobs), desc='runs', dynamic_ncols=True), [], 0
        for f in futures:  # a failed run is reported and the others go on: rerunning retries it alone
            env, n, s = futures[f]
            try:
                status = f.result()
                n_skipped += status == 'skipped'
            except Exception as e:  # noqa: BLE001 (any failure of one run: report it, keep the others)
                failed.append(f"{env} {n} seed {s}")
                status = f"FAILED: {e}"
            bar.update(1)
            bar.write(f"{env} {n} seed {s}: {status} ({time.time() - t0:.0f} s)")
        bar.close()
results, refs = load_results()
if not report_only and not failed and n_skipped == 0:  # a whole run from scratch: its time is the one to quote
    write_json(dict(wall_s=time.time() - t0, cpus=os.cpu_count(), workers=workers, threads=threads, runs=len(jobs),
                    envs=env_list, seeds=seed_list), os.path.join(out_dir, 'timing.json'))
write_report(results, refs)
plot(results)
if not report_only and failed:
    fail(f"{len(failed)} runs failed ({'; '.join(failed)}): their logs are under {runs_dir}; rerun to retry them")
