"""The TP model demo on CPU: the ``tiny`` preset at TP1 (in process) and TP2 (one gloo launch), float32.

Checked: the TP2 logits equal the TP1 logits of the same weights; the fused paths ("auto", "torch_ref") and the
unfused path agree; every fused path makes exactly two arfuse calls per layer; KV-cache decode equals a full
recompute; greedy tokens are equal; ranks compute bitwise the same logits; bad arguments raise before any
collective. Then ``arfuse e2e --preset tiny --tp 2`` end to end (a second launch).
"""
from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch

from arfuse.cli import e2e
from arfuse.cli.args import UsageError
from arfuse.launch import run_ranks
from arfuse.models import generate, llama, timing, tp

SEED = 3
PROMPT = (2, 7)  # batch, prompt length
STEPS = 6
PATHS = ("unfused", "torch_ref", "auto")
FP32_TOL = generate.LOGITS_TOLERANCE[torch.float32]


def _prompt(args):
    return timing.random_tokens(PROMPT, args.vocab_size, SEED, "cpu")


def _recompute_errors(model, prompt, tokens, logits):
    """Rel. error of each decode step's logits against a fresh prefill of the whole sequence so far."""
    errors = []
    for i in range(1, STEPS):
        seq = torch.cat([prompt, tokens[:i].T.to(prompt.device)], dim=1)
        model.setup_caches(seq.shape[0], seq.shape[1])
        with torch.no_grad():
            full = model(seq).float().cpu()
        errors.append(generate.rel_err(logits[i], full))
    return errors


def _tp1_reference():
    args = llama.preset("tiny")
    model = llama.Transformer(args).init_random_(SEED).requires_grad_(False)
    prompt = _prompt(args)
    logits, tokens = generate.greedy(model, prompt, STEPS)
    return args, model, prompt, logits, tokens


def _tp2_rank(rank, world, ref_tokens):
    """One rank of the TP2 launch: every path teacher-forced on the TP1 tokens; logits returned as numpy."""
    args = llama.preset("tiny")
    model = tp.build(args, seed=SEED, dtype=torch.float32, device="cpu")
    full = llama.Transformer(args).init_random_(SEED)
    tp.shard_(full, None)
    same_slices = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), full.state_dict().values()))
    with torch.device("meta"):  # the one-device model of a rank's shapes (only the replicated embedding differs)
        single = llama.Transformer(llama.rank_shapes(args, world))
    shapes = {n: tuple(p.shape) for n, p in single.named_parameters() if not n.startswith("embed_tokens")}
    rank_shapes_match = shapes == {n: tuple(p.shape) for n, p in model.named_parameters() if n in shapes}
    switch = tp.NormSwitch(model, None, tp.TPConfig(max_tokens=64))
    prompt = _prompt(args)
    out = {"same_slices": same_slices, "rank_shapes_match": rank_shapes_match, "logits": {}, "calls": {}}
    for path in PATHS:
        switch.use(path)
        logits, _ = generate.greedy(model, prompt, STEPS, forced=ref_tokens)
        out["logits"][path] = logits.numpy()
        out["calls"][path] = switch.stats().get("calls", {})
    logits, tokens = generate.greedy(model, prompt, STEPS)  # last path ("auto"), free-running
    out["free_tokens"] = tokens.numpy()
    out["recompute"] = _recompute_errors(model, prompt, tokens, logits)
    switch.close()
    bad = llama.Transformer(llama.ModelArgs(dim=16, n_layers=1, n_heads=3, n_kv_heads=3, head_dim=4,
                                            intermediate_size=32, vocab_size=64))
    try:
        tp.shard_(bad, None)
        out["bad_shard"] = "no error"
    except ValueError as e:
        out["bad_shard"] = str(e)
    return out


@pytest.fixture(scope="module")
def tp1():
    return _tp1_reference()


@pytest.fixture(scope="module")
def tp2(tp1):
    return run_ranks(_tp2_rank, 2, tp1[4], device="cpu", timeout_s=240)


def test_tp1_kv_decode_equals_full_recompute(tp1):
    args, model, prompt, logits, tokens = tp1
    assert max(_recompute_errors(model, prompt, tokens, logits)) <= FP32_TOL


def test_tp1_paths_agree_and_make_two_fused_calls_per_layer(tp1):
    args, _, prompt, ref_logits, ref_tokens = tp1
    model = tp.build(args, seed=SEED, dtype=torch.float32, device="cpu")
    switch = tp.NormSwitch(model, None, tp.TPConfig(max_tokens=64))
    for path in PATHS:
        switch.use(path)
        logits, tokens = generate.greedy(model, prompt, STEPS, forced=ref_tokens)
        check = generate.compare(ref_logits, logits, torch.float32)
        assert check["ok"] and check["tokens_equal"] == check["tokens"], (path, check)
        if path != "unfused":  # on CPU every forward is eager: one prefill and STEPS-1 decode steps
            assert switch.stats()["calls"] == {"torch_ref": STEPS * 2 * args.n_layers}, (path, switch.stats())
    switch.close()
    assert isinstance(model.layers[1].input_layernorm, llama.RMSNorm)  # close() restores the plain norms


def test_tp2_equals_tp1_for_every_path(tp1, tp2):
    args, _, _, ref_logits, ref_tokens = tp1
    for rank, out in enumerate(tp2):
        assert out["same_slices"], f"rank {rank}: build() differs from shard_() of the full model"
        assert out["rank_shapes_match"], f"rank {rank}: llama.rank_shapes() differs from the rank's shard"
        for path in PATHS:
            logits = torch.from_numpy(out["logits"][path])
            check = generate.compare(ref_logits, logits, torch.float32)
            assert check["ok"] and check["tokens_equal"] == check["tokens"], (rank, path, check)
            if path != "unfused":
                assert out["calls"][path] == {"torch_ref": STEPS * 2 * args.n_layers}, (rank, path, out["calls"])
    assert np.array_equal(tp2[0]["free_tokens"], ref_tokens.numpy())


def test_tp2_ranks_bitwise_identical(tp2):
    for path in PATHS:
        assert np.array_equal(tp2[0]["logits"][path], tp2[1]["logits"][path]), path


def test_tp2_kv_decode_equals_full_recompute(tp2):
    for out in tp2:
        assert max(out["recompute"]) <= FP32_TOL, out["recompute"]


def test_tp2_rejects_indivisible_heads(tp2):
    assert "n_heads=3" in tp2[0]["bad_shard"] and "world size 2" in tp2[0]["bad_shard"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="preset: name"):
        llama.preset("llama9")
    with pytest.raises(ValueError, match="layers"):
        llama.preset("tiny", layers=0)
    model = llama.Transformer(llama.preset("tiny"))
    with pytest.raises(ValueError, match="setup_caches"):
        model(torch.zeros(1, 3, dtype=torch.long))
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="one token per row"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(ValueError, match="steps"):
        generate.greedy(model, torch.zeros(1, 2, dtype=torch.long), 0)
    switch = tp.NormSwitch(model)
    with pytest.raises(TypeError, match="norm_path"):
        switch.use(1)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        switch.use("nope")
    assert isinstance(model.norm, llama.RMSNorm)


def test_compare_allows_only_near_ties():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 2, 1000, generator=g, dtype=torch.float64)
    noisy = ref + 1e-3 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    top, winner = ref[1, 0].max(0)
    ref[1, 0, 7] = top - 1e-4  # a near-tie in the reference ...
    noisy[1, 0, winner], noisy[1, 0, 7] = top, top + 1e-4  # ... that the other path flips: allowed, counted
    check = generate.compare(ref, noisy, torch.bfloat16)
    assert check["ok"] and check["near_ties"] == 1 and check["tokens_equal"] == check["tokens"] - 1, check
    far = noisy.clone()
    far[0, 0, 3] = ref[0, 0].max() + 0.01  # a clear loser wins: the averaged error stays within tolerance ...
    check = generate.compare(ref, far, torch.bfloat16)
    assert check["logits_rel_err"] <= check["tolerance"] and not check["ok"], check  # ... but the flip is caught
    assert not generate.compare(ref, ref * float("nan"), torch.bfloat16)["ok"]


def test_e2e_cli_tiny_tp2(tmp_path, capfd):
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    path = tmp_path / "e2e.json"
    args = parser.parse_args(["--preset", "tiny", "--tp", "2", "--device", "cpu", "--backends", "auto,unfused",
                              "--prompt-lens", "16,32", "--batches", "1,4", "--kv-len", "32",
                              "--prefill-repeats", "2", "--decode-replays", "3", "--json", str(path)])
    assert e2e.run(args) == 0
    out, err = capfd.readouterr()
    assert "ttft spread over the repeats" in out
    # progress on stderr (never stdout): what is starting, then rank 0 naming each path and point as it goes
    assert "arfuse e2e: starting 2 cpu ranks: tiny, paths auto, unfused" in err and "rank 0 of 2" not in out
    for step in ("unfused: agreement check", "unfused: TTFT P=32", "auto: TPOT B=4"):
        assert f"rank 0 of 2: {step}" in err, (step, err[-2000:])
    record = json.loads(path.read_text())
    assert record["reference"] == "unfused" and record["tp"] == 2 and record["dtype"] == "float32"
    assert set(record["results"]) == {"auto", "unfused"}
    for result in record["results"].values():
        assert set(result["ttft_ms"]) == {"16", "32"} and set(result["tpot_ms"]) == {"1", "4"}
        assert all(v > 0 for v in list(result["ttft_ms"].values()) + list(result["tpot_ms"].values()))
        for p, samples in result["ttft_samples_ms"].items():  # the slowest rank of each repeat; median reported
            assert len(samples) == 2 and min(samples) <= result["ttft_ms"][p] <= max(samples)
        assert result["check"]["ok"] and result["check"]["ranks_identical"]
    assert record["results"]["auto"]["plans"] == {"16": "torch_ref", "32": "torch_ref", "1": "torch_ref",
                                                  "4": "torch_ref"}
    assert record["model"]["n_layers"] == 2 and "CPU" in record["method"]["tpot"]


def test_compiled_rotary_and_swiglu_match_eager():
    args, model, prompt, ref_logits, ref_tokens = _tp1_reference()
    model.compile_pointwise_(backend="aot_eager")  # inductor would spend ~30 s building C++ on CPU
    assert all(layer.self_attn.rope is llama.compiled(llama.rope_qk, "aot_eager") for layer in model.layers)
    logits, tokens = generate.greedy(model, prompt, STEPS)
    assert torch.equal(tokens, ref_tokens)
    assert generate.rel_err(logits, ref_logits) <= 1e-6


def test_graph_prefill_needs_cuda_and_prefill_steps_have_no_position():
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--tp", "2", "--device", "cpu", "--graph-prefill"])
    with pytest.raises(UsageError, match="--graph-prefill needs CUDA"):
        e2e.run(args)
    _, model, prompt, ref_logits, _ = _tp1_reference()
    model.setup_caches(*prompt.shape)
    step = timing.DecodeStep(model, prompt, None)  # a prefill; eager on CPU
    assert torch.equal(step().float(), ref_logits[0])
    with pytest.raises(ValueError, match="no position"):
        step(prompt, 3)


def test_e2e_cli_rank_shapes_with_profile(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    path = tmp_path / "e2e.json"
    args = parser.parse_args(["--preset", "tiny", "--rank-shapes-of", "2", "--device", "cpu",
                              "--backends", "unfused,auto", "--prompt-lens", "16", "--batches", "1,4", "--kv-len", "32",
                              "--prefill-repeats", "2", "--decode-replays", "3", "--profile", "--json", str(path)])
    assert e2e.run(args) == 0
    assert "where the device time goes" in capsys.readouterr().out
    record = json.loads(path.read_text())
    tiny = llama.preset("tiny")
    assert record["rank_shapes_of"] == 2 and record["tp"] == 1
    assert (record["model"]["n_heads"], record["model"]["intermediate_size"]) == (tiny.n_heads // 2,
                                                                                 tiny.intermediate_size // 2)
    assert "TP2" in record["method"]["shapes"] and record["method"]["compile"] == "no torch.compile"
    assert record["method"]["decode_attention"] == "scaled_dot_product_attention"
    for result in record["results"].values():
        assert result["check"]["ok"]
        assert set(result["profile"]["decode"]) == {"1", "4"} and set(result["profile"]["prefill"]) == {"16"}
        for b in list(result["profile"]["decode"].values()) + list(result["profile"]["prefill"].values()):
            assert b["source"] == "eager" and b["categories"]["gemm"]["count"] >= 4 * tiny.n_layers
            assert b["categories"]["comm"]["count"] == 0 and b["us"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--tp", "2", "--rank-shapes-of", "2"], "--rank-shapes-of runs one rank's shapes on one device: it needs --tp 1"),
    (["--rank-shapes-of", "3"], "--rank-shapes-of 3: the tiny model cannot be split 3 ways: model n_heads=8 is not "
                                "divisible by tp=3"),
    (["--tp", "3"], "--tp 3: the tiny model cannot be split 3 ways"),
    (["--tp", "1", "--decode-attention", "triton"], "--decode-attention triton needs CUDA"),
])
def test_e2e_cli_rejects_before_spawning(argv, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--device", "cpu"] + argv)
    with pytest.raises(UsageError, match=re.escape(message)):
        e2e.run(args)


def test_e2e_defaults_to_a_model_that_finishes_on_this_machine():
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    spec, tp = e2e._spec(parser.parse_args(["--device", "cpu"]))
    assert (spec.preset, tp, spec.dtype) == ("tiny", 2, "float32")
    assert e2e.DEFAULT_PRESET == {"cpu": "tiny", "cuda": "llama3-8b"}
