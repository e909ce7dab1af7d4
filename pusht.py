"""
PushT (Chi et al. 2023, the gym-pusht package) behind the built-in simulator's interface, and the exploration
policy that records its training episodes (`python data.py --env=pusht`). gym-pusht is an optional extra
(`pip install -r requirements-pusht.txt`), imported only when an environment is made.
"""
import numpy as np
from PIL import Image

from sim import SENSOR_NOISE, record

PUSHT_REACH = 60.0  # env units (the arena is 512 wide) from the agent to its PD target at |action| = 1


class PushT:
    """gym-pusht's PushT (Chi et al. 2023) behind PushSim's interface: reset, step(action) -> frame, render,
    get_state/set_state. gym-pusht is an optional extra (requirements-pusht.txt), imported on first use.

    The env's action is an absolute target for the agent's PD controller; ours is the target's offset from
    the agent in [-1, 1]^2 times PUSHT_REACH (the agent then moves ~3 px per step at 64 px, like PushSim's),
    so an action is a motion, as a latent action is. State (10,): agent xy, block xy, block angle (the env's
    state layout), agent velocity, block velocity, block angular velocity. Frames are rendered at 64x64 by
    the env and resized to res (bilinear, as data.resize does for any dataset). Coverage and success are
    the env's own.
    """

    def __init__(self, res=64, seed=None, state=None):
        import gymnasium as gym
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
        self.res, self.env = res, gym.make('gym_pusht/PushT-v0', obs_type='pixels', render_mode='rgb_array',
                                           observation_width=64, observation_height=64).unwrapped
        self.reset(seed, state)

    def reset(self, seed=None, state=None):
        """The env's random start drawn from `seed`, or `state` (agent xy, block xy, angle) set through the
        env's reset_to_state. That sets the block's position before its angle, and turning then moves the
        block about its centre of gravity; we pass the position that lands the block exactly at `state`."""
        opts = None
        if state is not None:
            cog, a = np.array(self.env.block.center_of_gravity), state[4]
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            opts = {'reset_to_state': [*state[:2], *(np.asarray(state[2:4]) - cog + rot @ cog), a]}
        self.frame, self.info = self.env.reset(seed=seed, options=opts)
        return self.render()

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64), -1, 1)
        self.frame, _, _, _, self.info = self.env.step(np.array(self.env.agent.position) + PUSHT_REACH * a)
        return self.render()

    def render(self):
        if self.res == 64:
            return self.frame
        return np.asarray(Image.fromarray(self.frame).resize((self.res, self.res), Image.BILINEAR))

    def coverage(self):
        return float(self.env._get_coverage())  # the fraction of the goal T the block covers

    def success(self):
        return self.coverage() > self.env.success_threshold  # the env's is_success: coverage > 0.95

    def get_state(self):
        ag, b = self.env.agent, self.env.block
        return np.array([*ag.position, *b.position, b.angle, *ag.velocity, *b.velocity, b.angular_velocity])

    def set_state(self, s):
        """Write positions and velocities directly (reset_to_state would zero the velocities)."""
        ag, b = self.env.agent, self.env.block
        b.angle = float(s[4])  # before the position: turning a body moves it about its centre of gravity
        ag.position, b.position = tuple(s[0:2]), tuple(s[2:4])
        ag.velocity, b.velocity, b.angular_velocity = tuple(s[5:7]), tuple(s[7:9]), float(s[9])
        self.frame = self.env._render()  # what get_obs would return


class PushTPolicy:
    """Smooth exploration for PushT: the action (the target's offset from the agent) follows a momentum
    walk, bounced off the walls, and in most segments (all when p_push=1) it is drawn towards a point of
    the T, so the agent runs into it and pushes. The target moves with the agent, never jumps: the env's
    uniform random targets would fling it across the arena in a step or two."""

    def __init__(self, rng, p_push=0.6):
        self.rng, self.p_push, self.v, self.left, self.aim = rng, p_push, np.zeros(2), 0, None

    def act(self, sim):
        rng, agent, block = self.rng, np.array(sim.env.agent.position), sim.env.block
        if self.left <= 0:  # a new segment: wander, or head for a random point near the block's centre
            self.left = int(rng.integers(8, 25))
            self.aim = rng.normal(0, 25, 2) if rng.random() < self.p_push else None
        self.left -= 1
        pull = 0.0 if self.aim is None else np.clip(
            (np.array(block.local_to_world(block.center_of_gravity)) + self.aim - agent) / PUSHT_REACH, -1, 1)
        self.v = 0.7 * self.v + 0.3 * pull + 0.25 * rng.standard_normal(2)
        self.v = np.where((agent < 60) & (self.v < 0) | (agent > 452) & (self.v > 0), -self.v, self.v)
        return np.clip(self.v, -1, 1).astype(np.float32)


def generate_pusht_episode(seed, T=48, res=64, noise=SENSOR_NOISE):
    """One PushT exploration episode from the env's own random start: record()'s dict, states (T,10).
    noise=0 gives the env's exact renders."""
    return record(PushT(res, seed), PushTPolicy(np.random.default_rng([seed, 1])), T, np.random.default_rng([seed, 2]),
                  noise)
