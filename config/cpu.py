# The CPU default (what `python train.py` runs): the whole CoLA recipe on the built-in simulator,
# pretrain -> warm-up -> joint, in about 15 minutes on 2 cores.
preset = 'cpu'
batch_size = 16
pretrain_steps = 2500
warmup_steps = 1000
joint_steps = 2100
lr = 1e-3
