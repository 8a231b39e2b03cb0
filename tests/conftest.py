import torch

# The suite runs many tiny models: one intra-op thread is as fast for them, and immune to the busy-waiting
# slow-downs of OpenMP thread pools on a loaded 2-core machine.
torch.set_num_threads(1)
