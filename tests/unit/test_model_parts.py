"""Parts of the e2e model that need no process group: one rank's shapes, the decode mask, both decode-attention
implementations against a float64 reference, and the kernel-time breakdown."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arfuse.models import decode_attention, llama, profile, timing
from arfuse.models.generate import rel_err
from tests._decode_ref import decode_inputs, reference_decode

REPO = Path(__file__).resolve().parents[2]


def test_rank_shapes_split_what_tensor_parallelism_splits():
    full = llama.preset("llama3-70b")
    rank = llama.rank_shapes(full, 4)
    assert (rank.n_heads, rank.n_kv_heads, rank.intermediate_size, rank.vocab_size) == (16, 2, 7168, 32064)
    assert (rank.dim, rank.n_layers, rank.head_dim) == (full.dim, full.n_layers, full.head_dim)
    assert llama.rank_shapes(full, 1) == full
    with pytest.raises(ValueError, match="n_kv_heads=8 is not divisible by tp=16"):
        llama.rank_shapes(full, 16)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="tp must be a positive int"):
            llama.rank_shapes(full, bad)


def test_decode_mask_is_additive_and_follows_the_position():
    mask = llama.decode_mask(6, torch.tensor([3]), "cpu", torch.bfloat16)
    assert mask.shape == (1, 1, 1, 6) and mask.dtype == torch.bfloat16
    assert mask.flatten().tolist() == [0, 0, 0, 0, float("-inf"), float("-inf")]


@pytest.mark.parametrize("batch,pos", [(1, 0), (3, 17), (2, 39)])
def test_sdpa_decode_matches_float64(batch, pos):
    q, keys, values = decode_inputs(batch, 8, 2, 40, 16, torch.float32, "cpu", seed=batch * 100 + pos)
    input_pos = torch.tensor([pos])
    mask = llama.decode_mask(40, input_pos, "cpu", torch.float32)
    assert rel_err(llama.sdpa_decode(q, keys, values, input_pos, mask), reference_decode(q, keys, values, pos)) <= 1e-5


def test_decode_attention_by_name():
    assert llama.decode_attention("sdpa") is llama.sdpa_decode
    with pytest.raises(ValueError, match="name must be 'sdpa' or 'triton', got 'flash'"):
        llama.decode_attention("flash")
    model = llama.Transformer(llama.preset("tiny"))
    with pytest.raises(ValueError, match="got 'flash'"):
        model.use_decode_attention_("flash")
    assert all(layer.self_attn.decode_attention is llama.sdpa_decode for layer in model.layers)


@pytest.mark.parametrize("programs,length,sms", [(2, 1024, 132), (128, 1024, 132), (1, 40, 132), (16, 4096, 78),
                                                 (4096, 100, 132), (1, 1, 1)])
def test_split_plan_covers_the_cache_in_whole_blocks(programs, length, sms):
    chunks, chunk = decode_attention.split_plan(programs, length, sms)
    assert chunk % decode_attention.BLOCK_N == 0 and (chunks - 1) * chunk < length <= chunks * chunk
    assert programs * chunks <= max(programs, decode_attention.WAVES * sms + programs)


TRITON_CASES = [  # batch, heads, kv_heads, cache length, head_dim, position, dtype, tolerance
    (1, 8, 2, 40, 16, 25, "float32", 1e-5), (3, 16, 2, 300, 32, 299, "float32", 1e-5),
    (2, 4, 4, 200, 16, 0, "float32", 1e-5), (2, 16, 2, 1024, 128, 700, "float32", 1e-5),
    (1, 16, 2, 1024, 128, 64, "float32", 1e-5), (2, 6, 3, 70, 24, 69, "float32", 1e-5),
    (2, 16, 2, 300, 32, 150, "float16", 2e-3)]

INTERPRETED = """
import json, sys, torch
from arfuse.models import decode_attention, generate, llama, timing
from tests._decode_ref import decode_inputs, reference_decode
errors = []
for b, h, kv, length, d, pos, dtype, _ in json.loads(sys.argv[1]):
    q, k, v = decode_inputs(b, h, kv, length, d, getattr(torch, dtype), "cpu", seed=b + pos)
    out = decode_attention.triton_decode(q, k, v, torch.tensor([pos]))
    errors.append(generate.rel_err(out, reference_decode(q, k, v, pos)))
args = llama.preset("tiny")
model = llama.Transformer(args).init_random_(5).requires_grad_(False)
prompt = timing.random_tokens((2, 7), args.vocab_size, 5, "cpu")
ref_logits, ref_tokens = generate.greedy(model, prompt, 5)
logits, tokens = generate.greedy(model.use_decode_attention_("triton"), prompt, 5)
print(json.dumps({"errors": errors, "model_err": generate.rel_err(logits, ref_logits),
                  "same_tokens": torch.equal(tokens, ref_tokens)}))
"""


def test_triton_decode_matches_float64_under_the_interpreter():
    """The split-KV kernels, run by Triton's interpreter on the CPU, against float64; then a whole model's
    greedy decoding with them against SDPA (positions move from step to step)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", INTERPRETED, json.dumps(TRITON_CASES)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for case, err in zip(TRITON_CASES, result["errors"]):
        assert err <= case[-1], (case, err)
    assert result["model_err"] <= 1e-5 and result["same_tokens"], result


def test_triton_decode_rejects_what_it_cannot_run():
    pytest.importorskip("triton")
    q, keys, values = decode_inputs(1, 8, 2, 40, 16, torch.float32, "cpu", seed=0)
    pos = torch.tensor([3])
    with pytest.raises(ValueError, match=r"heads a multiple of the cache's 3 KV heads"):
        decode_attention.triton_decode(q, keys[:, :1].expand(1, 3, 40, 16), values[:, :1].expand(1, 3, 40, 16), pos)
    big = torch.zeros(1, 8, 1, 512)
    with pytest.raises(ValueError, match="head_dim at most 256"):
        decode_attention.triton_decode(big, torch.zeros(1, 2, 40, 512), torch.zeros(1, 2, 40, 512), pos)
    with pytest.raises(ValueError, match="contiguous last"):
        decode_attention.triton_decode(q, keys.transpose(-1, -2).contiguous().transpose(-1, -2), values, pos)
    if not decode_attention.interpreted():
        with pytest.raises(ValueError, match="must be on a CUDA device"):
            decode_attention.triton_decode(q, keys, values, pos)


def test_breakdown_sums_by_category():
    kernels = [("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", 20.0), ("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT", 30.0),
               ("lamport_two_shot_kernel", 7.0), ("add_rmsnorm_kernel", 2.0),
               ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", 3.0),
               ("void at::native::index_elementwise_kernel<128, 4, index_copy_kernel_impl>", 1.5),
               ("Memset (Unknown)", 0.5), ("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT", 10.0)]
    b = profile.breakdown(kernels, top=2)
    cats = {k: v["us"] for k, v in b["categories"].items() if v["count"]}
    assert cats == {"attn": 20.0, "gemm": 40.0, "comm": 7.0, "norm": 2.0, "compiled": 3.0, "copy": 1.5,
                    "other": 0.5}
    assert b["kernels"] == 8 and b["us"] == pytest.approx(74.0)
    assert [t["name"] for t in b["top"]] == ["nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT",
                                              "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]
    assert b["top"][0]["count"] == 2 and b["top"][0]["us"] == 40.0


def test_profile_decode_on_cpu_accounts_for_the_step():
    args = llama.preset("tiny")
    model = llama.Transformer(args).init_random_(1).requires_grad_(False)
    b = timing.profile_decode(model, 2, 16, timing.TimingConfig(decode_warmup=1))
    assert b["source"] == "eager" and b["kernels"] > 0
    assert b["categories"]["gemm"]["count"] >= 4 * args.n_layers  # qkv, o, gate_up, down per layer
    assert b["categories"]["attn"]["count"] >= args.n_layers
    assert sum(c["us"] for c in b["categories"].values()) == pytest.approx(b["us"])
