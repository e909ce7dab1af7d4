# Multi-GPU "base" preset for real video datasets: a world model of width 768, 12 layers, 12 heads (the size of
# the paper's IDM), 128 px, 16-frame clips; the IDM keeps idm_depth=2 blocks of width 768 (--idm_depth=12: the paper's). 8 GPUs x batch 16 = 128 clips per step, the paper's batch; one learning rate of
# 7.5e-5 for all parts with a 2K-step linear warm-up, as in the paper.
# torchrun --nproc_per_node=8 train.py config/base.py --data=/path/to/videos
preset = 'base'
batch_size = 16
pretrain_steps = 30000
warmup_steps = 8000
joint_steps = 52000
lam_steps = 30000
wm_steps = 30000
optimizer = 'adamw'     # the paper's optimizer and schedule (train.py's Muon + WSD is measured on the CPU preset only)
lr_schedule = 'cosine'
lr = 7.5e-5
actions_lr = 7.5e-5
min_lr = 7.5e-6
lr_ramp = 2000
ema_decay = 0.9999
log_interval = 50
ckpt_interval = 2000
eval_len = 30
