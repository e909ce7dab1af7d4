"""Data for CoLA-World: episodes from any source packed into memory-mapped shards, and the clip sampler.

    python data.py --out_dir=DIR --episodes=N [--seed=S] [--T=48] [--res=64]   # simulator (sim.py) -> .npz files
    python data.py --env=pusht --out_dir=DIR --episodes=N                       # PushT (pusht.py) -> .npz
    python data.py prepare --src=DIR --out_dir=DIR --res=R [--skip_bad]         # any folder -> shards
    python data.py --format=lerobot --out_dir=DIR --episodes=N                  # a LeRobot v3.0 dataset (lerobot.py)
    python data.py --format=lerobot-images --out_dir=DIR --episodes=N           # the same, PNG frames in parquet

Every source (simulator, .npz folders, videos, LeRobot datasets) ends up "prepared" the nanoGPT way: raw
uint8 frames in a few shard files read with np.memmap, plus index.json saying where each episode lives.
A folder is a dataset iff it has index.json, which is written last, so a crash never leaves a half one.
"""
import argparse, fcntl, json, os, shutil, time, warnings
from contextlib import suppress

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pusht import generate_pusht_episode
from sim import POLICIES, SENSOR_NOISE, generate_episode

INDEX = 'index.json'
VIDEO_EXTS = ('.mp4', '.webm', '.gif')
SPLIT_SEED = 1234               # the held-out split is a property of the data, not of the run's seed


def episode_seed(seed, i):
    """The simulator seed of episode i of a dataset with `seed`: the CLI writer and prepare_from_sim agree."""
    return seed * 1_000_000 + i


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

def atomic_save(path, write):
    """write(file) to a temporary name of this process's own, then rename: readers see the whole file or
    none, and two processes writing one path at once (two evaluations caching a state probe) never collide.
    A failed write removes its temporary file (a full disk stays as full as it was) and, where the system
    said why (no space left, permission denied), raises OSError('cannot write PATH: why') instead of the
    writer's own error (torch.save's says only "unexpected pos", the OSError sits in its context)."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)
        cause = e
        while cause is not None and not (isinstance(cause, OSError) and cause.strerror):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, f"cannot write {path}: {cause.strerror}") from None


def prepare_once(path, ready, build):
    """Make `path` with build() unless ready() says it is made, safe for any number of runs at once: they queue
    on an flock of `path`.lock, the first builds, the others find it made when their turn comes. The kernel
    drops an flock when its holder exits, killed or not, so a crashed run never blocks the next one."""
    if ready():
        return
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    lock = path + '.lock'
    with open(lock, 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if not ready():  # else another run made it while this one waited
            build()
        # made: later runs find it before they look for the lock. After a failure the file stays, so that a
        # run waiting on it and one arriving later cannot hold two different locks.
        with suppress(FileNotFoundError):
            os.remove(lock)


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
                atomic_save(os.path.join(out_dir, f'{key}s.npy'), lambda f: np.save(f, np.concatenate(xs)))
        meta = dict(res=res, source=str(src), src_files=src_files, shards=shards, episodes=index,
                    action_dim=dims['action'], state_dim=dims['state'])
        atomic_save(os.path.join(out_dir, INDEX), lambda f: f.write(json.dumps(meta).encode()))
    except BaseException as e:  # Ctrl-C included: leave no shards that no index describes
        if fh is not None:
            with suppress(OSError):  # closing flushes, and on a full disk that fails too
                fh.close()
        for f in filter(stale, os.listdir(out_dir)):
            os.remove(os.path.join(out_dir, f))
        if isinstance(e, OSError) and e.strerror:  # a full disk: the folder and the cause, in one line
            err = OSError(f"cannot prepare {out_dir}: {e.strerror}")
            err.errno = e.errno
            raise err from None
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
                for key in ('actions', 'states'):  # a NaN here would poison a run hours later, far from its file
                    if ep[key] is not None and not np.isfinite(ep[key]).all():
                        raise ValueError(f"{path}: its {key} hold NaN or inf (use --skip_bad to leave it out)")
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


def prepare_from_sim(out_dir, episodes, T=48, res=64, seed=0, policy='explore', shard_frames=20_000):
    """Simulator episodes straight into shards (same episodes as `python data.py --seed=seed`)."""
    eps = ((f'sim_{i:06d}', generate_episode(episode_seed(seed, i), T, res, policy))
           for i in tqdm(range(episodes), desc='simulating'))
    return _pack(out_dir, res, eps, shard_frames, f'PushSim(seed={seed}, policy={policy})')


def default_dataset(res=64, episodes=1000, T=48, seed=0, root=None, policy='explore'):
    """The built-in dataset, simulated once and cached under $COLA_DATA or ./data_cache; returns its dir.
    One run builds it (prepare_once); runs started beside it wait for it."""
    root = root or os.environ.get('COLA_DATA') or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data_cache')
    out = os.path.join(root, f'sim_{policy}_noise{SENSOR_NOISE:g}_res{res}_ep{episodes}_T{T}_seed{seed}')

    def build():  # in a temp dir, renamed into place: a half-built dataset never has the final name
        tmp = f'{out}.tmp'
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        prepare_from_sim(tmp, episodes, T, res, seed, policy)
        shutil.rmtree(out, ignore_errors=True)  # not a dataset: no index
        os.replace(tmp, out)
    prepare_once(out, lambda: os.path.exists(os.path.join(out, INDEX)), build)
    return out


def resolve_data(data_dir, res, clip_len=None, skip_bad=False, policy='explore', camera='', stride=1):
    """The prepared dir for --data: None -> the built-in dataset of that policy; a prepared folder
    -> itself; a folder of episodes -> prepared once into <data_dir>/.prepared_<res> (redone when its file
    list changes); a LeRobot dataset likewise, into .prepared_<res>_<camera>[_stride<stride>]."""
    if data_dir is None:
        return default_dataset(res, policy=policy)
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

    def ready():  # index.json is written last: present means whole
        if not os.path.exists(os.path.join(cache, INDEX)):
            return False
        with open(os.path.join(cache, INDEX)) as f:
            return json.load(f)['src_files'] == files
    prepare_once(cache, ready, lambda: prepare(data_dir, cache, res, clip_len, skip_bad, camera=camera, stride=stride))
    return cache


# ----------------------------------------------------------------------------- sampling clips

def to_model(frames, device='cpu'):
    """uint8 (..., T, H, W, 3) -> float (..., T, 3, H, W) in [-1, 1] on device: what the model takes."""
    return frames.to(device).movedim(-1, -3).float().div(127.5).sub(1)


def to_uint8(x):
    """float (B, T, 3, H, W) in [-1, 1] -> uint8 numpy (B, T, H, W, 3), for GIFs."""
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


def write_gif(path, cells, fps=5, scale=2, n_context=0):
    """cells: uint8 (rows, cols, T, H, W, 3) videos -> a GIF at path, tiled with 1-pixel white gaps, a time bar
    underneath (green over the first n_context frames, red after), `scale` times larger. The one GIF writer."""
    import imageio.v3 as iio  # imported here: only the programs that write GIFs need it
    R, C, T, H, W, _ = cells.shape
    padded = np.pad(cells, ((0, 0), (0, 0), (0, 0), (0, 1), (0, 1), (0, 0)), constant_values=255)
    tiles = padded.transpose(2, 0, 3, 1, 4, 5).reshape(T, R * (H + 1), C * (W + 1), 3)[:, :-1, :-1]
    bar = np.zeros((T, 3, tiles.shape[2], 3), np.uint8)
    for t in range(T):  # the bar also makes consecutive frames differ, so the GIF writer merges none
        bar[t, :, :(t + 1) * tiles.shape[2] // T] = (0, 190, 0) if t < n_context else (220, 30, 30)
    frames = np.concatenate([tiles, bar], 1).repeat(scale, 1).repeat(scale, 2)
    iio.imwrite(path, frames, duration=1000 / fps, loop=0)


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

    def sample(self, batch_size, device='cpu'):
        """dict(frames (B, T, 3, H, W) in [-1, 1] as the model takes them, actions (B, T-1, A) float32 or None,
        states (B, T, S) float32 or None, all on device; episode (B,), start (B,)) as torch tensors."""
        T, R = self.clip_len, self.res
        eps = self.rng.choice(self.ids, size=batch_size, p=self.p)
        starts = np.array([self.rng.integers(0, self.index[i]['length'] - T + 1) for i in eps])
        frames = np.empty((batch_size, T, R, R, 3), np.uint8)
        for b, (i, s) in enumerate(zip(eps, starts)):
            e = self.index[i]
            frames[b] = self.shards[e['shard']][e['offset'] + s:e['offset'] + s + T]
        rows = lambda x, n: None if x is None else torch.from_numpy(
            np.stack([x[self.index[i]['start'] + s:self.index[i]['start'] + s + n] for i, s in zip(eps, starts)])).to(device)
        return dict(frames=to_model(torch.from_numpy(frames), device), actions=rows(self.actions, T - 1),
                    states=rows(self.states, T), episode=torch.from_numpy(eps), start=torch.from_numpy(starts))

    def state_dict(self):
        return dict(rng=self.rng.bit_generator.state)

    def load_state_dict(self, sd):
        self.rng.bit_generator.state = sd['rng']


# ----------------------------------------------------------------------------- command line

def write_episodes(out_dir, episodes, seed=0, T=48, res=64, env='sim', policy='explore', format='npz'):
    """Episodes of the built-in simulator (env='sim', under `policy`) or of PushT ('pusht') as
    ep_XXXXXX.npz files (frames, actions, states; n_blocks for sim), each written atomically, or (format=
    'lerobot') as a LeRobot v3.0 dataset at 10 fps (lerobot.write_dataset); 'lerobot-images' keeps the frames as
    PNG images in the parquet instead of a video (LeRobot's use_videos=False)."""
    if env == 'pusht':
        generate = lambda s: generate_pusht_episode(s, T, res)
    else:
        generate = lambda s: generate_episode(s, T, res, policy)
    if format.startswith('lerobot'):
        import lerobot  # here, not at the top: it needs pyarrow and av
        eps = (generate(episode_seed(seed, i)) for i in tqdm(range(episodes), desc=f'writing {out_dir}'))
        codec = lerobot.write_dataset(out_dir, eps, videos=format == 'lerobot')
        print(f"wrote a LeRobot v3.0 dataset, {'video' if format == 'lerobot' else 'images'} {codec}"
              + ('' if codec == 'png' or 'av1' in codec else " (this PyAV build has no AV1 encoder)") + f": {out_dir}")
        return
    os.makedirs(out_dir, exist_ok=True)
    for i in tqdm(range(episodes), desc=f'writing {out_dir}'):
        ep = generate(episode_seed(seed, i))
        atomic_save(os.path.join(out_dir, f'ep_{i:06d}.npz'), lambda f: np.savez(f, **ep))


def main(argv=None):
    flag = lambda s: str(s).lower() in ('1', 'true', 'yes')
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('command', nargs='?', choices=['generate', 'prepare'], default='generate')
    p.add_argument('--out_dir')
    p.add_argument('--episodes', type=int, default=300)
    p.add_argument('--env', choices=['sim', 'pusht'], default='sim', help='generate: built-in simulator or PushT')
    p.add_argument('--policy', choices=list(POLICIES), default='explore',
                   help='generate: exploration (smooth motion and pushes) or random (i.i.d. moves each step)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--T', type=int, default=48)
    p.add_argument('--res', type=int, default=64)
    p.add_argument('--format', choices=['npz', 'lerobot', 'lerobot-images'], default='npz',
                   help='generate: .npz files, a LeRobot v3.0 dataset (video), or one with PNG images in parquet')
    p.add_argument('--src', help='prepare: folder of .npz/.mp4/.webm/.gif episodes, or a LeRobot dataset')
    p.add_argument('--camera', default='', help="prepare, LeRobot: the camera, a video or image feature ('' = the first)")
    p.add_argument('--frame_stride', type=int, default=1, help='prepare, LeRobot: keep every Nth frame')
    p.add_argument('--clip_len', type=int, default=None, help='prepare: refuse shorter episodes')
    p.add_argument('--skip_bad', type=flag, nargs='?', const=True, default=False)
    args = p.parse_args(argv)
    if not args.out_dir or (args.command == 'prepare' and not args.src):
        p.error('--out_dir is required (and --src for prepare)')
    if args.command == 'prepare':
        prepare(args.src, args.out_dir, args.res, args.clip_len, args.skip_bad, camera=args.camera,
                stride=args.frame_stride)
    else:
        write_episodes(args.out_dir, args.episodes, args.seed, args.T, args.res, args.env, args.policy,
                       args.format)


if __name__ == '__main__':
    main()
