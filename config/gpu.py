# One GPU: the CPU model's shapes at a larger batch and longer schedule (bf16 autocast, TF32, fused AdamW).
# python train.py config/gpu.py   (add --compile=True on a recent PyTorch)
preset = 'cpu'
batch_size = 64
pretrain_steps = 5000
warmup_steps = 1500
joint_steps = 5000
optimizer = 'adamw'     # as measured on a GPU; train.py's Muon + WSD is measured on 2 CPU cores only
lr_schedule = 'cosine'
lr = 5e-4
actions_lr = 5e-4
lr_ramp = 500
ema_decay = 0.999
log_interval = 50
ckpt_interval = 1000
