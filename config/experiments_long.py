# experiments.py at the length of `python train.py`: 3100 steps after pretraining (warm-up 1000 + joint 2100),
# the simulator, the three schedules of the main claims x seeds 0-2: about 2 hours on 2 CPU cores.
envs = 'sim'
schedules = 'two_stage,naive_joint,cola'
budget = 3100
warmup = 1000
runs_dir = 'out-experiments-long'
out_dir = 'results-long'
