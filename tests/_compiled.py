"""Evidence that code compiled by ``torch.compile`` really ran, independent of what the compiled
path reports about itself: the torch profiler records a "Torch-Compiled Region" event each time
a frame that dynamo compiled is executed (a ``torch.compile`` that returned the function
uncompiled, or an eager fallback, records none).  Order-independent: it also sees programs
compiled earlier in the session."""
from torch.profiler import ProfilerActivity, profile


def compiled_calls(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), n)``: the result and how many compiled frames ran during the call."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn(*args, **kwargs)
    n = sum(1 for e in prof.events() if e.name.startswith("Torch-Compiled Region"))
    return result, n
