"""Stand-ins for ``_sync``'s PTX primitives under Triton's interpreter (``TRITON_INTERPRET=1``), which runs no
inline assembly: the global timer, the posted release store of a barrier flag and the acquire spin on it, with the
same contract (values, masks, the bounded wait and its per-lane timeout status). ``_sync`` takes them only when the
interpreter is on, so what the GPU compiles is unchanged; ranks run as threads of one process there (see
:mod:`arfuse.testing.virtual_ranks`), where every load and store is sequentially consistent.
"""
import time

import triton
import triton.language as tl


def _now_ns() -> int:
    return time.monotonic_ns()


@triton.jit
def globaltimer():
    """Nanoseconds from the host's monotonic clock."""
    return tl.full([], _now_ns(), tl.int64)


@triton.jit
def signal(addrs, active, gen):
    """Store ``gen`` into each active lane's flag; returns zeros, like the PTX version."""
    tl.store(addrs, gen, mask=active != 0)
    return active * 0


@triton.jit
def wait(addrs, active, gen, timeout_ns):
    """Spin until each active lane's flag has reached ``gen`` (wrapping compare); 1 in the lanes still behind
    when ``timeout_ns`` has passed."""
    start = globaltimer()
    on = active != 0
    flags = tl.load(addrs, mask=on, other=0, volatile=True)
    late = on & ((flags - gen).to(tl.int32) < 0)
    while tl.sum(late.to(tl.int32), axis=0) > 0 and globaltimer() - start < timeout_ns:
        flags = tl.load(addrs, mask=on, other=0, volatile=True)
        late = on & ((flags - gen).to(tl.int32) < 0)
    return late.to(tl.int32)
