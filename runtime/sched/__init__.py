"""The shared scheduler and what it schedules: one loop decides, step by step, whether the ranks serve or
train (scheduler.py); training as schedulable work on the served weights (work.py); the weights' version and
pinning (weights.py); RL losses on the served model (rl.py). See docs/scheduler.md."""
