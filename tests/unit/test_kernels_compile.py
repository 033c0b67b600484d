"""arfuse's Triton kernels compile for Hopper (sm_90) without a GPU, move 16-byte vectors, keep peer waits bounded,
and never touch NVLink multicast. Needs Triton (CI installs the version the GPU machine runs)."""
import functools
import re

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from arfuse.core.spec import (ALLREDUCE, RESIDUAL_RMSNORM, RESIDUAL_RMSNORM_FP8, RMSNORM,  # noqa: E402
                               FusionSpec, Prologue, Quant, ScaleLayout)
from arfuse.kernels.lamport import lamport_kernel  # noqa: E402
from arfuse.kernels.lamport_two_shot import lamport_two_shot_kernel  # noqa: E402
from arfuse.kernels.nccl_epilogue import moe_finalize_kernel, rmsnorm_epilogue_kernel  # noqa: E402
from arfuse.kernels.one_shot import one_shot_kernel  # noqa: E402
from arfuse.kernels.two_shot import two_shot_kernel  # noqa: E402

PEERS = {f"P{i}": "i64" for i in range(8)}
PADS = {f"S{i}": "i64" for i in range(8)}
# Integer arguments the launchers keep divisible by 16 (Triton specialises on it at run time).
ALIGNED = {"region_off", "half_stride", "slot_stride", "buffer_stride", "rs_off", "rs_slot", "rs_buffer", "gather_off",
           "gather_buffer"}
MOE = dict(prologue=Prologue.MOE_FINALIZE)
PER_TOKEN = dict(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32)
GROUP = dict(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.FP32)
UE8M0 = dict(GROUP, scale_layout=ScaleLayout.UE8M0)


def _epilogue_io(dt, spec):
    out = "*fp8e4nv" if spec.quant else f"*{dt}"
    return {"res_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": out, "res_out_ptr": f"*{dt}", "norm_ptr": f"*{dt}",
            "scale_ptr": "*fp32", "scale_out_ptr": "*i32" if spec.scale_layout is ScaleLayout.UE8M0 else "*fp32",
            "scale_row_stride": "i32", "scale_col_stride": "i32", "eps": "fp32", "weight_offset": "fp32"}


def _io(dt, spec):
    prologue = {"x_ptr": f"*{dt}", "idx_ptr": "*i32", "esc_ptr": "*fp32", "shared_ptr": f"*{dt}", "guard_ptr": "i64",
                "n_expert_rows": "i32", "top_k": "i32"}
    return {**prologue, **_epilogue_io(dt, spec), "n_rows": "i32", "timeout_ns": "i64"}


def _signature(kind, dt, spec):
    io = _io(dt, spec)
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
# A representative set, not the product (spec kinds x 4 variants x 3 world sizes x dtypes would be ~400 compiles):
# every variant compiles every spec kind once - the classic four, weight offset, each quantization (with also_norm
# and the offset spread over them), the MoE prologue with and without the shared expert and with a quantization -
# at world sizes 2, 4 and 8 and at both hidden / warp configurations, bf16 mostly, fp16 and fp32 once each.
SPEC_CASES = [  # spec, dtype, world size, hidden, num_warps
    (RMSNORM, "bf16", 4, 4096, 8), (RESIDUAL_RMSNORM, "fp16", 2, 8192, 16), (ALLREDUCE, "fp32", 8, 4096, 8),
    (RESIDUAL_RMSNORM_FP8, "bf16", 4, 8192, 16),
    (FusionSpec(weight_offset=True, also_norm=True, **PER_TOKEN), "bf16", 8, 8192, 16),
    (FusionSpec(weight_offset=True, **GROUP), "bf16", 2, 4096, 8),
    (FusionSpec(also_norm=True, **UE8M0), "bf16", 4, 8192, 16),
    (FusionSpec(**MOE), "bf16", 2, 4096, 8),
    (FusionSpec(shared_expert=True, **MOE, **UE8M0), "fp32", 8, 8192, 16),
    (FusionSpec(**MOE, **PER_TOKEN), "fp16", 4, 4096, 8),
]
TWO_SHOT_CASES = [(RESIDUAL_RMSNORM_FP8, "bf16", 4, 4096, 8)]  # where the owner rows' layout once differed
CASES = [(kind, *case) for kind in sorted(KERNELS) for case in SPEC_CASES + (TWO_SHOT_CASES if "two" in kind else [])]


def _attrs(sig, aligned=ALIGNED):
    names = list(sig)
    return {(names.index(n),): [["tt.divisibility", 16]] for n in names
            if sig[n].startswith("*") or n in aligned or re.fullmatch(r"[PS]\d", n)}


def _compile(fn, sig, constants, num_warps=16, aligned=ALIGNED):
    src = ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=_attrs(sig, aligned))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm


@functools.lru_cache(maxsize=None)
def _symm_asm(kind, spec, dt, ws, hidden, num_warps):
    constants = {"RANK": ws - 1, "WS": ws, "H": hidden, "BLOCK_H": hidden, "EPI": spec.code}
    if kind in ("lamport", "lamport_two_shot"):
        constants.update(WS_P2=1 << (ws - 1).bit_length(), BITS=32 if dt == "fp32" else 16)
    else:
        constants.update(NTHREADS=32 * num_warps)
    if kind == "lamport":
        constants["SPLIT"] = 4 if dt == "bf16" else 1  # a row's push in chunks of hidden / 4 elements, or whole
    if kind == "one_shot":
        constants["COPY_IN"] = True
    return _compile(KERNELS[kind], _signature(kind, dt, spec), constants, num_warps=num_warps)


@pytest.mark.parametrize("kind,spec,dt,ws,hidden,num_warps", CASES, ids=lambda v: getattr(v, "name", None))
def test_kernel_compiles_for_sm90(kind, spec, dt, ws, hidden, num_warps):
    ptx = _symm_asm(kind, spec, dt, ws, hidden, num_warps)["ptx"]
    assert "multimem" not in ptx and "multicast" not in ptx  # NVLink multicast must never be used
    assert re.search(r"(ld|st)(\.volatile)?\.global\.v4\.b32", ptx), "expected 16-byte vector accesses"
    assert "%globaltimer" in ptx, "every wait on a peer must be bounded by the global timer"
    assert ".local" not in ptx, "no register spills to local memory"
    if kind in ("one_shot", "two_shot"):
        assert "st.release.sys.global" in ptx and "ld.acquire.sys.global" in ptx
    if spec.quant:
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx  # saturating round-to-nearest FP8, as the torch reference clamps


NCCL_CASES = [  # spec, hidden, rows per tile, num_warps, evict-first loads
    (RESIDUAL_RMSNORM_FP8, 8192, 1, 16, False), (RESIDUAL_RMSNORM, 5120, 2, 8, False),
    (FusionSpec(weight_offset=True, also_norm=True, **PER_TOKEN), 7168, 4, 8, False),
    (FusionSpec(**GROUP), 5120, 1, 16, False), (FusionSpec(also_norm=True, **UE8M0), 4096, 4, 4, False),
    (FusionSpec(residual=False, **dict(UE8M0, group_size=32)), 256, 2, 4, False),
    (RESIDUAL_RMSNORM, 4096, 1, 4, True), (FusionSpec(also_norm=True, **UE8M0), 8192, 2, 16, True),
]


@pytest.mark.parametrize("spec,hidden,rows,num_warps,evict", NCCL_CASES, ids=lambda v: getattr(v, "name", None))
def test_nccl_path_epilogue_compiles_for_sm90(spec, hidden, rows, num_warps, evict):
    sig = {"sum_ptr": "*bf16", **_epilogue_io("bf16", spec), "n_rows": "i32"}
    block_h = triton.next_power_of_2(hidden)
    ptx = _compile(rmsnorm_epilogue_kernel, sig, {"H": hidden, "BLOCK_H": block_h, "ROWS": rows, "EVICT_FIRST": evict,
                                                  "EPI": spec.code}, num_warps=num_warps)["ptx"]
    if hidden >= 1024:
        assert re.search(r"ld\.global[\w.:]*\.v4\.b32", ptx), "expected 16-byte vector loads"
    assert ".local" not in ptx, "no register spills to local memory"
    if spec.quant:
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx  # saturating round-to-nearest FP8, as the torch reference clamps
    # evict-first launches: the summed rows and the residual streamed through evict-first loads, the weight kept
    streamed = re.findall(r"ld\.global\.L1::evict_first[\w.:]*\.v4", ptx)
    assert (len(streamed) >= 2) if evict else not streamed
    assert ("evict_last" in ptx) == evict


def test_unused_arguments_compile_as_none():
    # the launchers pass None for the outputs and inputs a spec does not have (Triton makes them constexprs), and
    # the kernels bundle them into tuples: compile both kinds of kernel that way
    none = {"res_ptr", "res_out_ptr", "norm_ptr", "scale_ptr", "scale_out_ptr"}
    sig = {"sum_ptr": "*bf16", **_epilogue_io("bf16", RMSNORM), "n_rows": "i32"}
    sig.update({n: "constexpr" for n in none})
    src = ASTSource(fn=rmsnorm_epilogue_kernel, signature=sig, attrs={},
                    constexprs={**dict.fromkeys(none), "H": 4096, "BLOCK_H": 4096, "ROWS": 2, "EVICT_FIRST": False,
                                "EPI": RMSNORM.code})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    spec = FusionSpec(**PER_TOKEN)
    none = {"idx_ptr", "esc_ptr", "shared_ptr", "norm_ptr", "scale_ptr"}
    sig = {**_signature("lamport", "bf16", spec), **{n: "constexpr" for n in none}}
    constants = {**dict.fromkeys(none), "RANK": 1, "WS": 2, "WS_P2": 2, "H": 4096, "BLOCK_H": 4096, "SPLIT": 2,
                 "EPI": spec.code, "BITS": 16}
    src = ASTSource(fn=lamport_kernel, signature=sig, constexprs=constants, attrs={})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})


MOE_CASES = [  # hidden, block_h, num_warps, slots: a token's whole row per CTA, or its columns split over CTAs
    (7168, 8192, 16, 4), (7168, 8192, 16, 1), (4096, 4096, 8, 4), (7168, 1024, 4, 8), (8192, 2048, 8, 8),
    (5120, 512, 2, 8), (8192, 1024, 4, 4),
]


def _load_order(ptx: str):
    """In a MoE finalize kernel's PTX, from the first scalar (index) load on: the scalar loads before the first
    16-byte (row) load, and the 16-byte loads before the first bf16 -> fp32 conversion (the sum's start)."""
    events = re.findall(r"ld\.global(?:\.[\w:]+)*?\.(v4\.b32|b32) |(cvt\.f32\.bf16)", ptx)
    kinds = ["row" if load == "v4.b32" else "index" if load else "convert" for load, _ in events]
    kinds = kinds[kinds.index("index"):]
    indices = kinds.index("row")
    rows = kinds[:kinds.index("convert")].count("row")
    return indices, rows


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("hidden,block_h,num_warps,slots", MOE_CASES)
def test_moe_finalize_kernel_compiles_for_sm90(shared, hidden, block_h, num_warps, slots):
    spec = FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=shared)
    sig = {"x_ptr": "*bf16", "idx_ptr": "*i32", "esc_ptr": "*fp32", "shared_ptr": "*bf16", "guard_ptr": "i64",
           "n_expert_rows": "i32", "top_k": "i32", "out_ptr": "*bf16", "n_rows": "i32"}
    ptx = _compile(moe_finalize_kernel, sig, {"H": hidden, "BLOCK_H": block_h, "SLOTS": slots, "EPI": spec.code},
                   num_warps=num_warps)["ptx"]
    assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx), "expected 16-byte vector stores"
    assert ".local" not in ptx, "no register spills to local memory"
    # a step's index loads come first, then its row loads, then the sum: 2 dependent round trips per step
    indices, rows = _load_order(ptx)
    assert indices >= slots, f"{indices} index loads before the first row load, expected {slots}"
    assert rows >= slots * (block_h // (32 * num_warps)) // 8, f"only {rows} row loads before the sum starts"


# -- bitwise identity across ranks: every epilogue call site of a kernel reduces in the same order ---------------
LAYOUT_DEF = re.compile(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
                        r"warpsPerCTA = \[([\d, ]+)\]", re.M)
# a row's square (`acc * acc`) and the layout it is summed in; kept when a tt.reduce consumes it
SQUARE = re.compile(r"(%[\w.]+) = arith\.mulf (%[\w.]+), \2 : tensor<(\d+)xf32, "
                    r"(#\w+|#ttg\.slice<\{dim = (\d), parent = (#\w+)\}>)>")
REDUCED = re.compile(r'"tt\.reduce"\((%[\w.]+)\)')


def _sites(kind, ws):
    """Epilogue call sites: the two-shot kernels finish their own rows and each peer's rows (unrolled per peer)."""
    return ws if kind in ("two_shot", "lamport_two_shot") else 1


def _thread_mapping(layout: str, dim: str, parent: str, defs: dict) -> tuple:
    """How a 1-D row is spread over threads: (elements per thread, threads per warp, warps) along the row, and
    the replication over the other dimension of a sliced 2-D layout."""
    if not dim:
        spt, tpw, wpc = defs[layout]
        return spt[0], tpw[0], wpc[0], 1, 1
    spt, tpw, wpc = defs[parent]
    keep = 1 - int(dim)  # the sliced-away dimension is `dim`
    return spt[keep], tpw[keep], wpc[keep], tpw[int(dim)], wpc[int(dim)]


@pytest.mark.parametrize("kind,spec,dt,ws,hidden,num_warps", [c for c in CASES if c[1].norm],
                         ids=lambda v: getattr(v, "name", None))
def test_every_epilogue_call_site_reduces_in_one_order(kind, spec, dt, ws, hidden, num_warps):
    # Two-shot kernels run the epilogue at two call sites (rows this rank reduced, rows gathered from their
    # owner). If the mean square were summed over different element-to-thread splits, a row's output would
    # differ in the last bits between its owner and the other ranks; the FP8 epilogue of lamport_two_shot did
    # that on the GPU (2026-11-28) until its owner rows took the gathered rows' layout. (The quantizations' amax
    # reductions are maxima: exact in any order.)
    ttgir = _symm_asm(kind, spec, dt, ws, hidden, num_warps)["ttgir"]
    defs = {name: tuple([int(v) for v in g.split(",")] for g in groups)
            for name, *groups in LAYOUT_DEF.findall(ttgir)}
    reduced = set(REDUCED.findall(ttgir))
    sites = [_thread_mapping(layout, dim, parent, defs)
             for name, _, n, layout, dim, parent in SQUARE.findall(ttgir) if name in reduced and int(n) == hidden]
    assert len(sites) == _sites(kind, ws), f"{kind}: expected {_sites(kind, ws)} mean-square reductions, found {sites}"
    assert len(set(sites)) == 1, f"{kind} {spec.name}: call sites reduce over different thread splits {sites}"


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
    ptx = _compile(da.attention_chunk_kernel, sig, constants, num_warps=4, aligned=strides)["ptx"]
    assert re.search(r"\bmma\.|wgmma", ptx), "the scores and the weighted values should run on tensor cores"
    if strides:
        # a loop of several steps streams through async copies, a single step loads directly: 16 bytes either way
        assert re.search(r"cp\.async\.cg\.shared\.global|ld\.global\.v4\.b32", ptx), "expected 16-byte cache loads"
    sig = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "so_b": "i32", "so_h": "i32", "n_heads": "i32",
           "chunks": "i32"}
    _compile(da.attention_combine_kernel, sig, {"GROUP": group, "CHUNKS": 16, "HD": head_dim, "D": padded}, num_warps=4)
