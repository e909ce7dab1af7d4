# experiments.py on one GPU: the same models, schedules and budgets as on a CPU (world_model.PRESETS["cpu"]),
# 1000 PushT episodes, 4 jobs at once. Small models leave an H100 mostly idle: several runs side by side cost
# little more than one (11 CoLA runs of about 3,500 steps ran side by side at 45-82 ms per step: README).
episodes = 1000
workers = 4
threads = 2
runs_dir = 'out-experiments-gpu'
out_dir = 'results-gpu'
