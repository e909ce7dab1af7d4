"""LeRobot datasets (codebase v2.0/v2.1 and v3.0) as CoLA-World episodes: the reader behind --data=DIR, and
the writer behind `python data.py --format=lerobot`.

A LeRobot dataset root is recognised by meta/info.json, whose `codebase_version`, `fps`, `features` and path
templates (`data_path`, `video_path`) say where everything is:
  v2.1  data/chunk-000/episode_000000.parquet            one parquet and one mp4 per episode and camera;
        videos/chunk-000/CAMERA/episode_000000.mp4       episodes listed in meta/episodes.jsonl
  v3.0  data/chunk-000/file-000.parquet                  many episodes per file; meta/episodes/chunk-000/
        videos/CAMERA/chunk-000/file-000.mp4             file-000.parquet says which files hold each one,
                                                         and where it starts and ends in the video (seconds)
One camera becomes the frames: a `video` feature, or an `image` feature, whose frames are PNG/JPEG bytes in a
column of the data parquet (LeRobot's use_videos=False). The `action` and `observation.state` columns, one row
per frame, become the actions (the last row dropped: CoLA-World has T-1 actions for T frames) and the states.
Nothing here imports the lerobot package: parquet goes through pyarrow and video through PyAV
(requirements-lerobot.txt), both imported only when a LeRobot dataset is read or written.
"""
import glob
import importlib
import io
import json
import math
import os

import numpy as np
from PIL import Image

INFO = os.path.join('meta', 'info.json')
VERSIONS = ('v2.0', 'v2.1', 'v3.0')  # v2.0 has v2.1's layout (v2.1 only added per-episode stats)
ACTION, STATE = 'action', 'observation.state'
CHUNK = 1000  # files (v3.0) or episodes (v2.1) per chunk-XXX folder, LeRobot's default `chunks_size`
V21_DATA = 'data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet'
V21_VIDEO = 'videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4'
V30_DATA = 'data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet'
V30_VIDEO = 'videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4'
V30_EPISODES = 'meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet'
AV1_ENCODERS = ('libsvtav1', 'libaom-av1', 'librav1e')  # whichever this PyAV build has; LeRobot uses SVT-AV1


def _lib(name):
    """pyarrow or av, imported on first use, so that the core install needs neither."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(f"LeRobot datasets need pyarrow and av: pip install -r requirements-lerobot.txt "
                         f"(missing: {name})") from None


def is_lerobot(path):
    return os.path.isfile(os.path.join(path, INFO))


def _columns(path, names):
    """The parquet file's columns `names` that it has, as a pyarrow table; ValueError naming the file."""
    pq = _lib('pyarrow.parquet')
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing parquet file")
    try:
        have = pq.ParquetFile(path).schema_arrow.names
        return pq.read_table(path, columns=[n for n in names if n in have])
    except Exception as e:  # arrow's errors come in many types; all mean "bad file"
        raise ValueError(f"cannot read parquet {path}: {type(e).__name__}: {e}") from e


def _array(table, name, path):
    """A numeric column -> (rows, D) float32; list columns (LeRobot's vectors) give D = list length."""
    pa, pc = _lib('pyarrow'), _lib('pyarrow.compute')
    col = table.column(name).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(col) and (lengths.min() != lengths.max()):
            raise ValueError(f"{path}: column {name!r} has rows of different lengths")
        return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    return col.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)


class _Video:
    """Decodes a video file front to back. A v3.0 file holds consecutive episodes: the next one continues
    where the last stopped, so preparing decodes every file once, without seeking."""

    def __init__(self):
        self.path, self.container = None, None

    def _open(self, path, t0):
        av = _lib('av')
        self.close()
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing video")
        try:
            self.container = av.open(path)
            stream = self.container.streams.video[0]
            stream.thread_type = 'AUTO'  # decoding is most of the cost of preparing: use every core
            if t0 > 1:  # far into the file: jump to the key frame before t0 instead of decoding up to it
                self.container.seek(int(t0 / stream.time_base), stream=stream)
            self.frames = self.container.decode(stream)
            # one reformatter for the whole file: frame.to_ndarray() builds a new swscale context for every
            # frame, which made the conversion 8x slower than decoding (measured: 1,000 against 8,500 frames/s)
            self.rgb = av.video.reformatter.VideoReformatter()
        except Exception as e:
            self.close()
            raise ValueError(f"cannot read video {path}: {type(e).__name__}: {e}") from e
        self.path, self.pending, self.done = path, None, -math.inf

    def window(self, path, t0, t1, stride, convert):
        """([convert(frame as (H, W, 3) uint8) for every stride-th frame with t0 <= time < t1], how many frames
        the window had)."""
        if path != self.path or t0 < self.done:  # another file, or backwards: start again
            self._open(path, t0)
        out, k = [], 0
        try:
            while True:
                f = self.pending if self.pending is not None else next(self.frames, None)
                self.pending = None
                if f is None:
                    break
                if f.time is None:
                    raise ValueError("a frame without a timestamp")
                if f.time >= t1:
                    self.pending = f  # the next episode's first frame
                    break
                if f.time >= t0:
                    if k % stride == 0:  # only kept frames pay for the RGB conversion and the resize
                        out.append(convert(self.rgb.reformat(f, format='rgb24').to_ndarray()))
                    k += 1
        except Exception as e:
            self.close()
            raise ValueError(f"cannot read video {path}: {type(e).__name__}: {e}") from e
        self.done = t1
        return out, k

    def close(self):
        if self.container is not None:
            self.container.close()
        self.path, self.container = None, None


class Source:
    """One camera of a LeRobot dataset as a list of episodes: `names`, `files` (what the dataset is made of,
    with sizes: a prepared copy is redone when it changes) and load(k, convert).

    Dataset-level problems (no meta/info.json keys, an unknown codebase_version, a camera that is not there)
    raise ValueError here; problems of one episode raise from load(), so that --skip_bad can skip it."""

    def __init__(self, root, camera='', stride=1):
        self.root = root
        path = os.path.join(root, INFO)
        try:
            with open(path) as f:
                info = json.load(f)
            self.version, self.fps, features = info['codebase_version'], float(info['fps']), info['features']
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a LeRobot info.json ({type(e).__name__}: {e})") from None
        if self.version not in VERSIONS:
            raise ValueError(f"{path}: unknown codebase_version {self.version!r} (this reads {', '.join(VERSIONS)})")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"--frame_stride must be a whole number >= 1, got {stride!r}")
        cams = [k for k, v in features.items() if v.get('dtype') in ('video', 'image')]
        if not cams:
            raise ValueError(f"{path}: no camera (a feature of dtype video or image)")
        if camera and camera not in cams:
            raise ValueError(f"--camera={camera} is not a camera of {root}; it has {', '.join(cams)}")
        self.camera, self.stride = camera or cams[0], stride
        self.image = features[self.camera]['dtype'] == 'image'  # frames in the data parquet, not in a video
        self.columns = [c for c in (ACTION, STATE) if c in features]
        self.tag = f"_{self.camera}" + (f"_stride{stride}" if stride > 1 else '')  # names the prepared copy
        try:
            data_path, video_path = info['data_path'], None if self.image else info['video_path']
            self.episodes = (self._v30 if self.version == 'v3.0' else self._v21)(info, data_path, video_path)
        except (KeyError, IndexError) as e:
            raise ValueError(f"{path}: its path templates or episode metadata lack {e}") from None
        self.names = [f"episode_{e['index']:06d}" for e in self.episodes]
        used = sorted({INFO} | self.meta | {e[k] for e in self.episodes for k in ('data', 'video') if e[k]})
        self.files = [f"{f}:{os.path.getsize(os.path.join(root, f)) if os.path.exists(os.path.join(root, f)) else -1}"
                      for f in used]
        self._video, self._table = _Video(), (None, None)

    def _v21(self, info, data_path, video_path):
        jsonl = os.path.join(self.root, 'meta', 'episodes.jsonl')
        if os.path.isfile(jsonl):
            with open(jsonl) as f:
                eps = [json.loads(line) for line in f if line.strip()]
        else:  # the file is optional to us: info.json counts the episodes too
            eps = [dict(episode_index=i) for i in range(info['total_episodes'])]
        self.meta = {os.path.join('meta', 'episodes.jsonl')} if os.path.isfile(jsonl) else set()
        chunk = info.get('chunks_size', CHUNK)
        out = []
        for e in eps:
            i = int(e['episode_index'])
            where = dict(episode_chunk=i // chunk, episode_index=i)
            out.append(dict(index=i, length=e.get('length'), data=data_path.format(**where),
                            video=video_path and video_path.format(video_key=self.camera, **where),
                            t0=-math.inf, t1=math.inf))
        return out

    def _v30(self, info, data_path, video_path):
        metas = sorted(glob.glob(os.path.join(self.root, 'meta', 'episodes', '*', '*.parquet')))
        if not metas:
            raise ValueError(f"{os.path.join(self.root, 'meta', 'episodes')}: no episode metadata (*.parquet)")
        self.meta = {os.path.relpath(m, self.root) for m in metas}
        v = f'videos/{self.camera}/'
        keys = ['episode_index', 'length', 'data/chunk_index', 'data/file_index'] + (
            [] if self.image else [v + 'chunk_index', v + 'file_index', v + 'from_timestamp', v + 'to_timestamp'])
        out = []
        for m in metas:
            t = _columns(m, keys)
            missing = [k for k in keys if k not in t.column_names]
            if missing:
                raise ValueError(f"{m}: no column {missing[0]!r}")
            cols = {k: t.column(k).to_pylist() for k in keys}
            for r in range(t.num_rows):
                c = {k: cols[k][r] for k in keys}
                out.append(dict(index=int(c['episode_index']), length=int(c['length']),
                                data=data_path.format(chunk_index=c['data/chunk_index'],
                                                      file_index=c['data/file_index']), video=None, t0=0, t1=0))
                if not self.image:
                    out[-1].update(video=video_path.format(video_key=self.camera, chunk_index=c[v + 'chunk_index'],
                                                           file_index=c[v + 'file_index']),
                                   t0=float(c[v + 'from_timestamp']), t1=float(c[v + 'to_timestamp']))
        return sorted(out, key=lambda e: e['index'])

    def _rows(self, e):
        """The episode's parquet rows: dict of (L, D) arrays in frame order. A v3.0 data file holds many
        episodes and is read once for all of them."""
        path = os.path.join(self.root, e['data'])
        if self._table[0] != path:
            images = [self.camera] if self.image else []
            t = _columns(path, ['episode_index', 'frame_index'] + self.columns + images)
            missing = [c for c in self.columns + images + ['episode_index'] if c not in t.column_names]
            if missing:
                raise ValueError(f"{path}: no column {missing[0]!r}")
            cols = {c: _array(t, c, path) for c in self.columns}
            if self.image:  # Hugging Face's Image feature: a struct of the encoded file's bytes and its path
                col = t.column(self.camera).combine_chunks()
                cols['image'] = np.array(list(zip(col.field('bytes').to_pylist(), col.field('path').to_pylist())),
                                         dtype=object)
            cols['episode_index'] = t.column('episode_index').to_numpy().ravel()
            cols['frame_index'] = (t.column('frame_index').to_numpy().ravel() if 'frame_index' in t.column_names
                                   else np.arange(t.num_rows))
            self._table = (path, cols)
        cols = self._table[1]
        rows = np.flatnonzero(cols['episode_index'] == e['index'])
        rows = rows[np.argsort(cols['frame_index'][rows], kind='stable')]
        return path, {c: cols[c][rows] for c in cols if c not in ('episode_index', 'frame_index')}, len(rows)

    def _decode(self, data, rel, path):
        """One image of an image feature: its encoded bytes, or without them the file at its path -> (H, W, 3) uint8."""
        try:
            return np.asarray(Image.open(io.BytesIO(data) if data else os.path.join(self.root, rel)).convert('RGB'))
        except Exception as e:  # PIL's errors come in many types; all mean "bad image"
            raise ValueError(f"{path}: an image of column {self.camera!r} cannot be read: {type(e).__name__}: {e}") from e

    def load(self, k, convert=lambda f: f):
        """Episode k: dict(frames (T,H,W,3) uint8 through convert, actions (T-1,A) or None, states (T,S) or
        None), every stride-th frame; an action spans the stride (the mean of the rows it covers)."""
        e, s = self.episodes[k], self.stride
        path, rows, n = self._rows(e)
        if n == 0 or (e['length'] is not None and n != e['length']):
            raise ValueError(f"{path}: episode {e['index']} has {n} rows, but the metadata says {e['length']}")
        if self.image:
            video = path
            frames = [convert(self._decode(b, p, path)) for b, p in rows['image'][::s]]
        else:
            h = 0.5 / self.fps  # frame times are i / fps from the episode's start: the window takes half a frame's slack
            video = os.path.join(self.root, e['video'])
            frames, decoded = self._video.window(video, e['t0'] - h, e['t1'] - h, s, convert)
            if decoded != n:
                raise ValueError(f"{video}: episode {e['index']} has {decoded} frames in the video but {n} rows in {path}")
        m = len(frames)
        if m < 2:
            raise ValueError(f"{video}: episode {e['index']} keeps {m} frame at --frame_stride={s}; it needs 2")
        A, S = rows.get(ACTION), rows.get(STATE)
        return dict(frames=np.stack(frames),
                    actions=None if A is None else A[:(m - 1) * s].reshape(m - 1, s, -1).mean(1, dtype=np.float32),
                    states=None if S is None else np.ascontiguousarray(S[::s]))


# ----------------------------------------------------------------------------------------------------
# the writer: simulator episodes as a LeRobot dataset, so that a user can see the layout and the tests have files

def pick_codec(codec=''):
    """'' -> the first AV1 encoder this PyAV build has (LeRobot's default codec), else libx264."""
    av = _lib('av')
    for name in [codec] if codec else AV1_ENCODERS + ('libx264',):
        try:
            av.Codec(name, 'w')
            return name
        except Exception:
            continue
    raise ValueError(f"this PyAV build has no {codec or 'AV1 or H.264'} encoder")


class _Encoder:
    """One mp4 file, appended to an episode at a time; frame k of the file is at time k / fps."""

    def __init__(self, path, codec, fps, h, w):
        av = _lib('av')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.environ.setdefault('SVT_LOG', '1')  # SVT-AV1 prints a banner to stderr unless told errors only
        self.c = av.open(path, 'w')
        # LeRobot's settings: a key frame every 2 frames (fast random access) and yuv420p; a lower crf than its
        # 30, since at 64 px every pixel counts (measured: crf 20 loses 0.6 dB less than 30, mostly chroma)
        self.s = self.c.add_stream(codec, rate=int(fps), options=dict(g='2', crf='20'))
        self.s.width, self.s.height, self.s.pix_fmt = w, h, 'yuv420p'
        self.frames = 0

    def add(self, frames):
        av = _lib('av')
        for f in frames:
            self.c.mux(self.s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')))
        self.frames += len(frames)

    def close(self):
        self.c.mux(self.s.encode())
        self.c.close()


def _write_table(path, cols, index=None):
    """dict of name -> list or (N, ...) array as one parquet file; 2-d float arrays become fixed-size lists, as
    LeRobot (through Hugging Face datasets) stores its vectors, and lists of PNG bytes the struct of Hugging
    Face's Image feature. `index` (a list) is written as a pandas DataFrame's index (pandas' own metadata, without
    pandas): LeRobot v3.0 reads meta/tasks.parquet with pandas and takes each task's string from the index."""
    pa, pq = _lib('pyarrow'), _lib('pyarrow.parquet')
    arrays = {}
    for k, v in cols.items():
        if isinstance(v, np.ndarray) and v.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float32).ravel()), v.shape[1])
        elif len(v) and isinstance(v[0], bytes):
            arrays[k] = pa.StructArray.from_arrays([pa.array(list(v), pa.binary()), pa.nulls(len(v), pa.string())],
                                                   ['bytes', 'path'])
        else:
            arrays[k] = pa.array(v)
    table = pa.table(arrays)
    if index is not None:
        table = table.append_column('__index_level_0__', pa.array(index))
        kind = lambda t: 'unicode' if pa.types.is_string(t) else str(t)
        meta = dict(index_columns=['__index_level_0__'], column_indexes=[], pandas_version='2.0.0',
                    columns=[dict(name=None if k == '__index_level_0__' else k, field_name=k, metadata=None,
                                  pandas_type=kind(table.schema.field(k).type),
                                  numpy_type='object' if pa.types.is_string(table.schema.field(k).type)
                                  else str(table.schema.field(k).type)) for k in table.column_names])
        table = table.replace_schema_metadata({b'pandas': json.dumps(meta).encode()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


def png(frame):
    """(H, W, 3) uint8 -> PNG bytes (lossless: an image dataset reads back exactly)."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format='PNG')
    return buf.getvalue()


def write_dataset(root, episodes, fps=10, version='v3.0', codec='', camera='observation.image',
                  episodes_per_file=50, task='push the blocks', videos=True):
    """Write episodes (dicts: frames (T,H,W,3) uint8, actions (T-1,A), states (T,S); either may be missing) as a
    LeRobot dataset at root; returns the encoder used ('png' with videos=False: the frames are PNG images in the
    data parquet, as LeRobot's use_videos=False keeps them). v3.0 puts episodes_per_file episodes in each video file
    and four times as many in each data file (LeRobot splits by size, and parquet rows are small), so the reader
    must not assume they line up. meta/info.json is written last: a crash leaves no dataset."""
    if version not in ('v2.1', 'v3.0'):
        raise ValueError(f"version must be v2.1 or v3.0, got {version!r}")
    if is_lerobot(root):
        raise ValueError(f"{root} already holds a LeRobot dataset; write to another folder")
    codec, v3 = pick_codec(codec) if videos else 'png', version == 'v3.0'
    data_tpl = V30_DATA if v3 else V21_DATA
    video_tpl = (V30_VIDEO if v3 else V21_VIDEO) if videos else None
    metas, rows, video, shape, dims, total = [], [], None, None, {}, 0

    def flush_rows(path):
        _write_table(path, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
        rows.clear()
    for i, ep in enumerate(episodes):
        frames, T = ep['frames'], len(ep['frames'])
        shape = shape or frames.shape[1:]
        if frames.shape[1:] != shape:
            raise ValueError(f"episode {i}: frames {frames.shape[1:]} differ from the first episode's {shape}")
        r = dict(timestamp=np.arange(T, dtype=np.float32) / np.float32(fps), frame_index=np.arange(T),
                 episode_index=np.full(T, i), index=total + np.arange(T), task_index=np.zeros(T, np.int64))
        if ep.get('actions') is not None:  # LeRobot has an action for every frame: after the last one, none
            r[ACTION] = np.concatenate([ep['actions'], np.zeros_like(ep['actions'][:1])]).astype(np.float32)
        if ep.get('states') is not None:
            r[STATE] = np.asarray(ep['states'], np.float32)
        if not videos:
            r[camera] = np.array([png(f) for f in frames], dtype=object)
        dims.update({k: r[k].shape[1] for k in (ACTION, STATE) if k in r})
        meta = dict(episode_index=i, tasks=[task], length=T, dataset_from_index=total, dataset_to_index=total + T)
        if v3:
            vf, df = divmod(i // episodes_per_file, CHUNK), divmod(i // (4 * episodes_per_file), CHUNK)
            meta.update({'data/chunk_index': df[0], 'data/file_index': df[1],
                         'meta/episodes/chunk_index': 0, 'meta/episodes/file_index': 0})
            if videos:
                if i % episodes_per_file == 0:
                    if video:
                        video.close()
                    video = _Encoder(os.path.join(root, video_tpl.format(video_key=camera, chunk_index=vf[0],
                                                                         file_index=vf[1])), codec, fps, *shape[:2])
                meta.update({f'videos/{camera}/chunk_index': vf[0], f'videos/{camera}/file_index': vf[1],
                             f'videos/{camera}/from_timestamp': video.frames / fps,
                             f'videos/{camera}/to_timestamp': (video.frames + T) / fps})
                video.add(frames)
            rows.append(r)
            if (i + 1) % (4 * episodes_per_file) == 0:
                flush_rows(os.path.join(root, data_tpl.format(chunk_index=df[0], file_index=df[1])))
        else:
            where = dict(episode_chunk=i // CHUNK, episode_index=i)
            if videos:
                video = _Encoder(os.path.join(root, video_tpl.format(video_key=camera, **where)), codec, fps, *shape[:2])
                video.add(frames)
                video.close()
                video = None
            rows.append(r)
            flush_rows(os.path.join(root, data_tpl.format(**where)))
        metas.append(meta)
        total += T
    if not metas:
        raise ValueError("no episodes to write")
    if video:
        video.close()
    if rows:
        flush_rows(os.path.join(root, data_tpl.format(chunk_index=df[0], file_index=df[1])))
    if v3:
        cols = {k: [m[k] for m in metas] for k in metas[0]}
        _write_table(os.path.join(root, V30_EPISODES.format(chunk_index=0, file_index=0)), cols)
        _write_table(os.path.join(root, 'meta', 'tasks.parquet'), dict(task_index=[0]), index=[task])
    else:
        os.makedirs(os.path.join(root, 'meta'), exist_ok=True)
        with open(os.path.join(root, 'meta', 'episodes.jsonl'), 'w') as f:
            f.writelines(json.dumps({k: m[k] for k in ('episode_index', 'tasks', 'length')}) + '\n' for m in metas)
        with open(os.path.join(root, 'meta', 'tasks.jsonl'), 'w') as f:
            f.write(json.dumps(dict(task_index=0, task=task)) + '\n')
    H, W = shape[:2]
    features = {camera: dict(dtype='video' if videos else 'image', shape=[H, W, 3], names=['height', 'width', 'channels'])}
    if videos:
        features[camera]['info'] = {'video.height': H, 'video.width': W, 'video.codec': 'av1' if 'av1' in codec else 'h264',
                                    'video.pix_fmt': 'yuv420p', 'video.is_depth_map': False, 'video.fps': fps,
                                    'video.channels': 3, 'has_audio': False}
    features.update({k: dict(dtype='float32', shape=[d], names=None) for k, d in dims.items()})
    features.update({k: dict(dtype=t, shape=[1], names=None) for k, t in
                     (('timestamp', 'float32'), ('frame_index', 'int64'), ('episode_index', 'int64'),
                      ('index', 'int64'), ('task_index', 'int64'))})
    info = dict(codebase_version=version, robot_type=None, total_episodes=len(metas), total_frames=total,
                total_tasks=1, chunks_size=CHUNK, fps=fps, splits={'train': f'0:{len(metas)}'},
                data_path=data_tpl, video_path=video_tpl, features=features)
    if v3:
        info.update(data_files_size_in_mb=100, video_files_size_in_mb=200)
    else:
        info.update(total_chunks=(len(metas) - 1) // CHUNK + 1, total_videos=len(metas) if videos else 0)
    with open(os.path.join(root, INFO) + '.tmp', 'w') as f:
        json.dump(info, f, indent=2)
    os.replace(os.path.join(root, INFO) + '.tmp', os.path.join(root, INFO))
    return codec
