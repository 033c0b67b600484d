"""Cross-GPU synchronisation helpers for symmetric-memory kernels: peer addressing, a bounded block-level
barrier over the signal pads, Lamport-style polling, the device-side call counter and error reporting.

Peers' buffer and signal-pad addresses arrive as kernel arguments ``P0..P7`` / ``S0..S7`` (unused ones 0), so no
kernel waits on a dependent load of an address table before its first remote access.

Barrier protocol (per block id ``b``, graph-safe, no host state): every block slot keeps a generation count on
the device (``gen_ptr[b]``, bumped once per barrier). Block ``b`` of rank ``r`` writes its new count into flag
``[b * WS + r]`` of every peer's signal pad (a posted ``st.release.sys``: no round trip), then waits until each
peer's flag ``[b * WS + p]`` in its own pad has reached the same count (``ld.acquire.sys``). Counts only grow, so a
fast peer's next signal never hides this one.

Lamport polling: buffers are kept filled with a sentinel (-0.0; senders replace -0.0 with +0.0), so data carries
its own "ready" mark; readers poll with volatile loads until no element is the sentinel, then write it back.

Every wait gives up after ``timeout_ns`` and records ``[1, op, peer, rank]`` in a host-mapped int32 array, so a
missing peer cannot hang the GPU forever.
"""
import triton
import triton.language as tl

from arfuse.kernels.launch_config import OP_NAMES  # noqa: F401  (re-exported for the error messages)

ERR_FLAG = tl.constexpr(0)
ERR_OP = tl.constexpr(1)
ERR_PEER = tl.constexpr(2)
ERR_RANK = tl.constexpr(3)
OP_LAMPORT = tl.constexpr(1)
OP_ONE_SHOT = tl.constexpr(2)
OP_TWO_SHOT = tl.constexpr(3)
OP_LAMPORT_TWO_SHOT = tl.constexpr(4)


@triton.jit
def globaltimer():
    """Nanoseconds from the GPU's global timer (coarse, monotonic)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def select(p: tl.constexpr, V0, V1, V2, V3, V4, V5, V6, V7):
    """``(V0, ..., V7)[p]`` for a compile-time ``p``."""
    if p == 0:
        v = V0
    elif p == 1:
        v = V1
    elif p == 2:
        v = V2
    elif p == 3:
        v = V3
    elif p == 4:
        v = V4
    elif p == 5:
        v = V5
    elif p == 6:
        v = V6
    else:
        v = V7
    return v


@triton.jit
def peer_base(p: tl.constexpr, P0, P1, P2, P3, P4, P5, P6, P7, dtype: tl.constexpr, offset):
    """Rank ``p``'s symmetric buffer as a ``dtype`` pointer, advanced by ``offset`` elements (a multiple of 64,
    which with the aligned allocation keeps loads and stores 16 bytes wide)."""
    base = select(p, P0, P1, P2, P3, P4, P5, P6, P7).to(tl.pointer_type(dtype))
    return tl.multiple_of(base + offset, 16)


@triton.jit
def _signal(addrs, active, gen):
    # Posted write of our generation into each peer's flag (release: orders our earlier writes before it).
    return tl.inline_asm_elementwise(
        """
        {
        .reg .pred %p;
        setp.ne.u32 %p, $1, 0;
        @%p st.release.sys.global.u32 [$2], $3;
        mov.u32 $0, 0;
        }
        """,
        "=r,r,l,r", [active, addrs, gen], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait(addrs, active, gen, timeout_ns):
    # Spin (acquire) until each peer's flag has reached our generation; 1 on timeout.
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b32 %v;
        .reg .pred %p;
        .reg .u64 %t0, %t1;
        mov.u32 $0, 0;
        setp.eq.u32 %p, $1, 0;
        @%p bra WAIT_DONE;
        mov.u64 %t0, %globaltimer;
        WAIT_LOOP:
        ld.acquire.sys.global.u32 %v, [$2];
        sub.u32 %v, %v, $3;
        setp.lt.s32 %p, %v, 0;
        @!%p bra WAIT_DONE;
        mov.u64 %t1, %globaltimer;
        sub.u64 %t1, %t1, %t0;
        setp.lt.u64 %p, %t1, $4;
        @%p bra WAIT_LOOP;
        mov.u32 $0, 1;
        WAIT_DONE:
        }
        """,
        "=r,r,l,r,l", [active, addrs, gen, timeout_ns], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def record_error(err_ptr, peer, OP: tl.constexpr, RANK: tl.constexpr):
    """Write ``[1, OP, peer, RANK]`` into the host-mapped error record (``err_ptr``: its address as an int)."""
    err = err_ptr.to(tl.pointer_type(tl.int32))
    tl.store(err + ERR_OP, OP)
    tl.store(err + ERR_PEER, peer)
    tl.store(err + ERR_RANK, RANK)
    tl.store(err + ERR_FLAG, 1)


@triton.jit
def block_barrier(S0, S1, S2, S3, S4, S5, S6, S7, block_id, gen, err_ptr, timeout_ns, RANK: tl.constexpr,
                  WS: tl.constexpr, NTHREADS: tl.constexpr, OP: tl.constexpr):
    """Synchronise block ``block_id`` with the same block id on every rank; returns True if all arrived in time.

    ``gen`` is this block slot's barrier count (every rank runs the same sequence, so counts agree). Orders this
    block's earlier writes before the peers' later reads (release) and the peers' earlier writes before this
    block's later reads (acquire). The flag operations run on a vector with one element per thread of the CTA,
    lanes ``>= WS`` inactive, so each flag is touched by exactly one thread.
    """
    lanes = tl.arange(0, NTHREADS)
    pad = tl.where(lanes == 0, S0, tl.where(lanes == 1, S1, tl.where(lanes == 2, S2, tl.where(
        lanes == 3, S3, tl.where(lanes == 4, S4, tl.where(lanes == 5, S5, tl.where(lanes == 6, S6, S7)))))))
    own = select(RANK, S0, S1, S2, S3, S4, S5, S6, S7)
    slot = block_id.to(tl.int64) * WS
    active = (lanes < WS).to(tl.int32)
    target = (lanes * 0 + gen).to(tl.uint32)
    tl.debug_barrier()
    _signal(pad.to(tl.pointer_type(tl.uint32)) + slot + RANK, active, target)
    status = _wait(own.to(tl.pointer_type(tl.uint32)) + slot + lanes, active, target, timeout_ns)
    tl.debug_barrier()
    failed = tl.max(status, axis=0) != 0
    if failed:
        record_error(err_ptr, tl.argmax(status, axis=0), OP, RANK)
    return not failed


@triton.jit
def sentinel_of(BITS: tl.constexpr):
    """The -0.0 bit pattern of a ``BITS``-wide float as a signed int."""
    if BITS == 16:
        s = -32768
    else:
        s = -2147483648
    return s


@triton.jit
def poll(ptrs, mask, sentinel, start, timeout_ns):
    """Volatile-load ``ptrs`` (an int view of a Lamport buffer, 1-D or 2-D) until no masked element is the
    sentinel or ``timeout_ns`` has passed since ``start``; returns (bits, ok)."""
    bits = tl.load(ptrs, mask=mask, other=0, volatile=True)
    pending = tl.sum(tl.ravel((bits == sentinel) & mask).to(tl.int32), axis=0)
    ok = 1
    while pending > 0:
        bits = tl.load(ptrs, mask=mask, other=0, volatile=True)
        pending = tl.sum(tl.ravel((bits == sentinel) & mask).to(tl.int32), axis=0)
        if pending > 0:
            if globaltimer() - start > timeout_ns:
                ok = 0
                pending = 0
    return bits, ok


@triton.jit
def first_missing_slot(bits, mask2, sentinel, slots, WS_P2: tl.constexpr):
    """The lowest slot (peer rank) of a 2-D poll that still holds the sentinel."""
    per_slot = tl.sum(((bits == sentinel) & mask2).to(tl.int32), axis=1)
    return tl.min(tl.where(per_slot > 0, slots, WS_P2), axis=0)


@triton.jit
def no_negative_zero(v):
    """``v`` with -0.0 replaced by +0.0 (-0.0 is the Lamport sentinel)."""
    return tl.where(v == 0, tl.zeros_like(v), v)


@triton.jit
def load_epoch(state_ptr):
    """The call counter a kernel family keeps on the device (read by every block before any block bumps it)."""
    return tl.load(state_ptr, volatile=True)


@triton.jit
def bump_epoch(state_ptr, epoch):
    """Count this block's arrival; the last block of the launch advances the counter and resets the count.
    Call it any time after this block read the epoch (graph-safe: no host state)."""
    arrived = tl.atomic_add(state_ptr + 1, 1, sem="relaxed")
    if arrived == tl.num_programs(0) - 1:
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr, epoch + 1)
