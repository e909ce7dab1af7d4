# PushT (gym-pusht), where the agent is a dot about 2 px across at 32 px:
#   python data.py --env=pusht --out_dir=DIR --episodes=300 --seed=0
#   python train.py config/pusht.py --data=DIR
# The paper's schedule (pretrain -> warm-up -> joint) with what a small agent needs (figures: NOTES.md, "PushT"):
idm_patch = 2          # the IDM and its pixel decoder read 2 x 2 patches (the world model keeps 4 x 4): the
                       # decoder's renders a 2-px agent's sub-pixel move, the IDM's keeps it in the codes
lam_init_steps = 1500  # the LAM first learns the move on pixels (the two-stage decoder sees one frame, so it
                       # cannot do without the latent); through the world model alone the IDM finds nothing
n_context = 1          # one clean context frame: with two, the world model extrapolates 77% of the move
                       # and has little use for the latent
motion_weight = 10.0   # the pixels that moved weigh 11x in the flow loss where actions drive the world model
pretrain_steps = 2000  # shorter pretraining and joint phases: the whole run fits 30 minutes on 2 CPU cores
joint_steps = 1500
