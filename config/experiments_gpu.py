# experiments.py on one GPU: the 64-px models of the CPU training preset (world_model.PRESETS['cpu']) at
# batch 32, with 7.5x the steps of the CPU experiment. Not yet run: no GPU was lent to the session that
# wrote it. From bench.py's 47 ms per joint step at batch 16 on an H200, expect several hours.
res = 64
train_args = '--preset=cpu --batch_size=32'
pretrain_steps = 3000
budget = 3000
warmup = 400
eval_args = '--n_clips=32 --horizon=10'
plan_args = '--n_tasks=10'
episodes = 1000
workers = 1
runs_dir = 'out-experiments-gpu'
out_dir = 'results-gpu'
