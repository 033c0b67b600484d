"""arfuse's Triton kernels compile for Hopper (sm_90) without a GPU, move 16-byte vectors, keep peer waits bounded,
and never touch NVLink multicast. Needs Triton (CI installs the version the GPU machine runs)."""
import re

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from arfuse.kernels.add_rmsnorm import add_rmsnorm_kernel  # noqa: E402
from arfuse.kernels.lamport import lamport_kernel  # noqa: E402
from arfuse.kernels.lamport_two_shot import lamport_two_shot_kernel  # noqa: E402
from arfuse.kernels.one_shot import one_shot_kernel  # noqa: E402
from arfuse.kernels.two_shot import two_shot_kernel  # noqa: E402

PEERS = {f"P{i}": "i64" for i in range(8)}
PADS = {f"S{i}": "i64" for i in range(8)}
# Integer arguments the launchers keep divisible by 16 (Triton specialises on it at run time).
ALIGNED = {"region_off", "half_stride", "slot_stride", "buffer_stride", "rs_off", "rs_slot", "rs_buffer", "gather_off",
           "gather_buffer"}


def _io(dt, pattern):
    out = "*fp8e4nv" if pattern == 3 else f"*{dt}"
    return {"x_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": out, "res_out_ptr": f"*{dt}",
            "scale_ptr": "*fp32", "n_rows": "i32", "eps": "fp32", "timeout_ns": "i64"}


def _signature(kind, dt, pattern):
    io = _io(dt, pattern)
    if kind == "one_shot":
        return {**PEERS, **PADS, "gen_ptr": "*i32", "err_ptr": "i64", "state_ptr": "*i32", **io, "region_off": "i64",
                "half_stride": "i64"}
    if kind == "two_shot":
        return {**PEERS, **PADS, "gen_ptr": "*i32", "err_ptr": "i64", **io, "rs_off": "i64", "rs_slot": "i64",
                "gather_off": "i64"}
    if kind == "lamport":
        return {**PEERS, "err_ptr": "i64", "state_ptr": "*i32", **io, "region_off": "i64", "slot_stride": "i64",
                "buffer_stride": "i64"}
    return {**PEERS, "err_ptr": "i64", "state_ptr": "*i32", **io, "rs_off": "i64", "rs_slot": "i64",
            "rs_buffer": "i64", "gather_off": "i64", "gather_buffer": "i64"}


KERNELS = {"one_shot": one_shot_kernel, "two_shot": two_shot_kernel, "lamport": lamport_kernel,
           "lamport_two_shot": lamport_two_shot_kernel}
CASES = [("lamport", "bf16", 2, 4), ("lamport", "fp32", 3, 2), ("lamport_two_shot", "bf16", 2, 4),
         ("lamport_two_shot", "fp16", 0, 3), ("one_shot", "bf16", 3, 4), ("two_shot", "bf16", 1, 8)]


def _compile(fn, sig, constants, num_warps=16, aligned=ALIGNED):
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n in aligned or re.fullmatch(r"[PS]\d", n)}
    src = ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


@pytest.mark.parametrize("kind,dt,pattern,ws", CASES)
def test_kernel_compiles_for_sm90(kind, dt, pattern, ws):
    constants = {"RANK": ws - 1, "WS": ws, "H": 4096, "BLOCK_H": 4096, "PATTERN": pattern}
    if kind in ("lamport", "lamport_two_shot"):
        constants.update(WS_P2=1 << (ws - 1).bit_length(), BITS=32 if dt == "fp32" else 16)
    else:
        constants.update(NTHREADS=32 * 16)
    if kind == "lamport":
        constants["SPLIT"] = 4 if dt == "bf16" else 1  # a row's push in 4 chunks of 1024 elements, or whole
    if kind == "one_shot":
        constants["COPY_IN"] = True
    ptx = _compile(KERNELS[kind], _signature(kind, dt, pattern), constants)
    assert "multimem" not in ptx and "multicast" not in ptx  # NVLink multicast must never be used
    assert re.search(r"(ld|st)(\.volatile)?\.global\.v4\.b32", ptx), "expected 16-byte vector accesses"
    assert "%globaltimer" in ptx, "every wait on a peer must be bounded by the global timer"
    if kind in ("one_shot", "two_shot"):
        assert "st.release.sys.global" in ptx and "ld.acquire.sys.global" in ptx


def test_fused_norm_kernel_compiles_for_sm90():
    sig = {"sum_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp8e4nv", "res_out_ptr": "*bf16",
           "scale_ptr": "*fp32", "n_rows": "i32", "eps": "fp32"}
    ptx = _compile(add_rmsnorm_kernel, sig, {"H": 8192, "BLOCK_H": 8192, "PATTERN": 3})
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx  # saturating round-to-nearest FP8, as the torch reference clamps


# -- bitwise identity across ranks: every epilogue call site of a kernel reduces in the same order ---------------
LAYOUT_DEF = re.compile(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
                        r"warpsPerCTA = \[([\d, ]+)\]", re.M)
# a row's square (`acc * acc`) and the layout it is summed in; kept when a tt.reduce consumes it
SQUARE = re.compile(r"(%[\w.]+) = arith\.mulf (%[\w.]+), \2 : tensor<(\d+)xf32, "
                    r"(#\w+|#ttg\.slice<\{dim = (\d), parent = (#\w+)\}>)>")
REDUCED = re.compile(r'"tt\.reduce"\((%[\w.]+)\)')
# epilogue call sites per kernel at 4 ranks: the two-shot kernels finish their own rows and each peer's rows
SITES = {"lamport": 1, "one_shot": 1, "two_shot": 4, "lamport_two_shot": 4}


def _thread_mapping(layout: str, dim: str, parent: str, defs: dict) -> tuple:
    """How a 1-D row is spread over threads: (elements per thread, threads per warp, warps) along the row, and
    the replication over the other dimension of a sliced 2-D layout."""
    if not dim:
        spt, tpw, wpc = defs[layout]
        return spt[0], tpw[0], wpc[0], 1, 1
    spt, tpw, wpc = defs[parent]
    keep = 1 - int(dim)  # the sliced-away dimension is `dim`
    return spt[keep], tpw[keep], wpc[keep], tpw[int(dim)], wpc[int(dim)]


def _ttgir(kind, pattern, hidden, num_warps):
    constants = {"RANK": 1, "WS": 4, "H": hidden, "BLOCK_H": hidden, "PATTERN": pattern}
    if kind in ("lamport", "lamport_two_shot"):
        constants.update(WS_P2=4, BITS=16)
    else:
        constants.update(NTHREADS=32 * num_warps)
    if kind == "lamport":
        constants["SPLIT"] = 2
    if kind == "one_shot":
        constants["COPY_IN"] = True
    sig = _signature(kind, "bf16", pattern)
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n in ALIGNED or re.fullmatch(r"[PS]\d", n)}
    src = ASTSource(fn=KERNELS[kind], signature=sig, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ttgir"]


@pytest.mark.parametrize("kind", sorted(KERNELS))
@pytest.mark.parametrize("pattern", [1, 2, 3])
@pytest.mark.parametrize("hidden,num_warps", [(4096, 8), (8192, 16)])
def test_every_epilogue_call_site_reduces_in_one_order(kind, pattern, hidden, num_warps):
    # Two-shot kernels run the epilogue at two call sites (rows this rank reduced, rows gathered from their
    # owner). If the mean square were summed over different element-to-thread splits, a row's output would
    # differ in the last bits between its owner and the other ranks; the FP8 epilogue of lamport_two_shot did
    # that on the GPU (2026-11-28) until its owner rows took the gathered rows' layout.
    ttgir = _ttgir(kind, pattern, hidden, num_warps)
    defs = {name: tuple([int(v) for v in g.split(",")] for g in groups)
            for name, *groups in LAYOUT_DEF.findall(ttgir)}
    reduced = set(REDUCED.findall(ttgir))
    sites = [_thread_mapping(layout, dim, parent, defs)
             for name, _, n, layout, dim, parent in SQUARE.findall(ttgir) if name in reduced and int(n) == hidden]
    assert len(sites) == SITES[kind], f"{kind}: expected {SITES[kind]} mean-square reductions, found {sites}"
    assert len(set(sites)) == 1, f"{kind} pattern {pattern}: call sites reduce over different thread splits {sites}"


# -- the e2e model's split-KV decode attention ---------------------------------------------------------------
@pytest.mark.parametrize("chunk,group,head_dim", [(64, 8, 128), (384, 8, 128), (64, 2, 8)])
def test_decode_attention_kernels_compile_for_sm90(chunk, group, head_dim):
    from arfuse.models import decode_attention as da

    padded = max(da.MIN_ROWS, triton.next_power_of_2(head_dim))
    strides = ("sq_b", "sq_h", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n")
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "part_ptr": "*fp32",
           "lse_ptr": "*fp32", **{n: "i32" for n in strides + ("n_kv_heads", "chunks")}, "qk_scale": "fp32"}
    # the launcher specialises strides divisible by 16 (a KV cache's always are at head_dim 128) as it does pointers
    strides = set(strides) if head_dim % 16 == 0 else set()
    constants = {"CHUNK": chunk, "GROUP": group, "ROWS": 16, "HD": head_dim, "D": padded, "BLOCK": da.BLOCK_N}
    ptx = _compile(da.attention_chunk_kernel, sig, constants, num_warps=4, aligned=strides)
    assert re.search(r"\bmma\.|wgmma", ptx), "the scores and the weighted values should run on tensor cores"
    if strides:
        # a loop of several steps streams through async copies, a single step loads directly: 16 bytes either way
        assert re.search(r"cp\.async\.cg\.shared\.global|ld\.global\.v4\.b32", ptx), "expected 16-byte cache loads"
    sig = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "so_b": "i32", "so_h": "i32", "n_heads": "i32",
           "chunks": "i32"}
    _compile(da.attention_combine_kernel, sig, {"GROUP": group, "CHUNKS": 16, "HD": head_dim, "D": padded}, num_warps=4)
