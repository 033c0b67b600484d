"""Runtime layer: the executor behind a fusion object, and the torch.library ops that call it."""
