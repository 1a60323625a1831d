"""The ops: each module registers a torch.library custom op and its backends (softvq_fast.dispatch)."""
