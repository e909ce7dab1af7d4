"""
Drive a trained world model by hand. A key sets a real action; the real-action adapter and the LAM's quantizer
turn it into a latent action (as plan.py does; a --mode=actions checkpoint takes the real action itself), and
the world model generates the next frame from the last n_context frames, one frame a key.

  python play.py --ckpt=out/ckpt.pt              # a page at http://localhost:8000 (remote: ssh -L 8000:localhost:8000)
  python play.py --ckpt=out/ckpt.pt --keys=right,right,right,down,e,3,r   # headless: the session as play.gif

Keys: arrows or WASD move the agent (a real action of size `speed` along that axis); 0-9 play that codebook entry in
every action token, with no adapter in the way; E plays the episode's own next transition (the IDM's latent action
of it, or its real action), and while every move since the start came from the episode its true frame stands beside
the generated one; R starts again from another held-out clip. The page shows generated | truth.
"""
import base64
import io
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from PIL import Image

import measure
from configurator import configure, fail
from data import to_model, to_uint8, write_gif
from lam import codebook_vectors
from world_model import sample

# ----------------------------------------------------------------------------------------------------
# settings (applied by configure() at the bottom, so that the tests can import the Session)
ckpt = 'out/ckpt.pt'
data = ''               # held-out clips to start from and labelled episodes for the adapter; '' = the checkpoint's
port = 8000             # the page's port, on localhost only
keys = ''               # headless: comma-separated keys (up, down, left, right, w, a, s, d, 0-9, e, r) -> out
out = 'play.gif'        # headless: generated | truth, one GIF frame per key
speed = 1.0             # the size of a key's real action, in the data's action units ([-1, 1] in the simulator)
euler_steps = 2         # Euler steps per frame (as eval.py)
cfg_scale = 1.0
adapter_episodes = 32   # labelled training episodes the adapter learns from (as plan.py)
adapter_steps = 500
scale = 8               # page and GIF pixels per frame pixel
device = ''             # 'cpu', 'cuda', 'cuda:N'; '' = cuda if available
seed = 0
RENAMED = {'sample_steps': 'euler_steps'}  # old flags that still work
# ----------------------------------------------------------------------------------------------------

MOVES = {'up': (0, -1), 'down': (0, 1), 'left': (-1, 0), 'right': (1, 0), 'w': (0, -1), 's': (0, 1), 'a': (-1, 0),
         'd': (1, 0)}  # the built-in simulator's action: (x right, y down)


class Session:
    """One drive through the world model: the frames so far (a held-out episode's first n_context, then generated
    ones), the latent action of every transition, and that episode, for E and the truth beside the frames."""

    def __init__(self, model, sampler, adapter=None):
        self.model, self.sampler, self.adapter = model, sampler, adapter
        self.nc, self.dev = model.wm.cfg.n_context, model.wm.pos_time.device
        self.codebook = None if model.real_actions else codebook_vectors(model.lam.quantizer)  # real actions: no codes
        self.generator = torch.Generator(self.dev).manual_seed(seed)
        self.clip = -1
        self.reset()

    def reset(self):
        """Start again from the first n_context frames of the next held-out episode."""
        ids = self.sampler.episodes('val')
        self.clip += 1
        self.episode = self.sampler.get_episode(ids[self.clip % len(ids)])
        self.truth = to_model(torch.from_numpy(self.episode['frames'])[None], self.dev)  # (1, L, 3, H, W)
        self.frames = list(self.truth[:, :self.nc].unbind(1))
        self.z = list(self.episode_latents(self.nc - 1).unbind(1)) if self.nc > 1 else []
        self.on_episode = True  # every move so far is the episode's own: its true frames stay comparable

    def episode_latents(self, n):
        """The latent actions of the episode's first n transitions: the IDM's, or its real actions (1, n, n_tok, d)."""
        return self.model.drive(self.truth[:, :n + 1], torch.from_numpy(self.episode['actions'][None, :n]).to(self.dev))

    @torch.inference_mode()
    def press(self, key):
        """Apply one key; returns a line saying what it did."""
        key, t = key.lower(), len(self.frames) - 1  # t: the index of the latest frame
        if key in ('', 'r'):  # '': the page's first look
            if key:
                self.reset()
            return f"held-out episode {self.episode['source']}"
        if key in MOVES:
            action = np.zeros(self.sampler.action_dim, np.float32)
            action[:2] = speed * np.array(MOVES[key])
            z = self.model.encode_actions(torch.from_numpy(action).to(self.dev)[None, None], self.adapter)[:, 0]
            said = f"{key}: action {action.tolist()}"
        elif key.isdigit() and self.codebook is not None and int(key) < len(self.codebook):
            z, said = self.codebook[int(key)].expand(1, self.model.lam.cfg.n_action_tokens, -1), f"code {key}"
        elif key == 'e' and t + 1 < len(self.episode['frames']):
            z, said = self.episode_latents(t + 1)[:, t], "the episode's own transition"
        else:
            return f"{key}: nothing to do (keys: arrows or WASD, 0-9 for a code, E, R)"
        self.on_episode &= key == 'e'
        ctx = torch.stack(self.frames[-self.nc:], 1)  # (1, nc, 3, H, W)
        zw = torch.stack(self.z[len(self.z) - self.nc + 1:] + [z], 1)  # the context's transitions, then the new one
        new = sample(self.model.wm, self.model.action, ctx, zw, self.nc + 1, euler_steps, cfg_scale, self.generator)
        self.frames.append(new[:, 0].clamp(-1, 1))
        self.z.append(z)
        return said

    def view(self):
        """generated | truth (grey where there is none), uint8 (H, 2W, 3)."""
        t = len(self.frames) - 1
        gen = to_uint8(self.frames[-1][:, None])[0, 0]
        has_truth = self.on_episode and t < len(self.episode['frames'])
        truth = self.episode['frames'][t] if has_truth else np.full_like(gen, 128)
        return np.concatenate([gen, truth], 1)


def png(image):
    """uint8 (H, W, 3) -> PNG bytes, `scale` times larger (nearest: a pixel stays a pixel)."""
    buf = io.BytesIO()
    H, W, _ = image.shape
    Image.fromarray(image).resize((W * scale, H * scale), Image.NEAREST).save(buf, format='PNG')
    return buf.getvalue()


def serve(session):
    """The page (play.html) and one JSON answer per key: {said, image (a PNG data URL), frame, ms (to make it)}. One thread: the
    presses run one after another on the one model."""
    page = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'play.html'), 'rb').read()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            if url.path == '/':
                body, kind = page, 'text/html'
            elif url.path == '/key':
                t0 = time.perf_counter()
                said = session.press(parse_qs(url.query).get('k', [''])[0])
                image = 'data:image/png;base64,' + base64.b64encode(png(session.view())).decode()
                answer = dict(said=said, image=image, frame=len(session.frames) - 1, ms=1000 * (time.perf_counter() - t0))
                body, kind = json.dumps(answer).encode(), 'application/json'
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header('Content-Type', kind)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # one line a key would drown the terminal
            pass

    try:
        server = HTTPServer(('127.0.0.1', port), Handler)
    except OSError as e:
        fail(f"--port={port}: {e.strerror}; pick another port")
    print(f"serving http://localhost:{server.server_port} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def main():
    dev = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        model, settings, wm_cfg, sampler = measure.open_run(ckpt, data, dev, 'train', seed=seed)
        adapter = None
        if sampler.actions is None:
            raise ValueError(f"{sampler.dir} has no actions: keys need the adapter, fit on labelled episodes")
        if not model.real_actions:  # the real-action adapter, fit as plan.py and eval.py fit it
            z_e, acts = measure.episode_latents(model, sampler, sampler.episodes('train')[:adapter_episodes], dev)
            adapter, losses = measure.train_adapter(torch.cat(acts), torch.cat(z_e), adapter_steps, seed=seed)
            print(f"adapter fit on {len(z_e)} labelled episodes: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    except (ValueError, OSError) as e:  # OSError: a full disk while preparing the data
        fail(str(e))
    session = Session(model, sampler, adapter)
    if not keys:
        return serve(session)
    views = [session.view()]
    for key in keys.split(','):
        print(f"frame {len(session.frames)}: {session.press(key.strip())}")
        views.append(session.view())
    H, W2 = views[0].shape[:2]
    cells = np.stack(views).reshape(len(views), H, 2, W2 // 2, 3).transpose(2, 0, 1, 3, 4)[None]  # (1, 2, T, H, W, 3)
    write_gif(out, cells, fps=4, scale=scale // 2, n_context=1)
    print(f"wrote {out}: {len(keys.split(','))} keys, generated | truth")


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    main()
