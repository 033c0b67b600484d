"""``arfuse.compile`` of models nobody here wrote for arfuse, on 2 gloo ranks (float32): HF transformers Llama,
Qwen2 and the MoE families Qwen3-MoE and Mixtral (their experts' sum reaches the residual add through a reshape)
with transformers' own TP (``hf.load(..., tp_size=2)``), and a hand-written decoder sharded with
``parallelize_module`` (``nn.RMSNorm``, a ``funcol`` embedding allreduce). Every RMSNorm weight is random, so a
fused norm with the wrong weight would show.

Checked per model: compiled fused logits equal the eager TP logits and the single-process logits; exactly two
fused arfuse calls per decoder layer per forward; 8 greedy tokens equal eager TP's (dense models; the MoE ones
skip it to keep CI short: it recompiles per length); the report shows every decoder-layer allreduce fused and every
other collective (the embedding allreduce and the lm_head all-gather, where the model has them) left alone with its
reason; ranks agree bitwise. One launch compiles all of them (CPU compiles take 10-60 s each).
"""
from __future__ import annotations

import hashlib

import pytest
import torch

import arfuse
from arfuse.models import generate
from tests import _autofuse_models as hand
from tests._ranks import launch

transformers = pytest.importorskip("transformers")
from arfuse.models import hf  # noqa: E402  (needs transformers)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # one launch compiles five models
SEED, STEPS = 5, 8
PROMPT = torch.tensor([[3, 17, 42, 9, 88, 5, 61, 27], [11, 2, 90, 33, 7, 70, 48, 1]])
TOL = 1e-5  # fp32: ||fused - reference|| / ||reference||
HF_FAMILIES = {"llama": dict(dynamic=None, grad_mode="no_grad", greedy=True),
               "qwen2": dict(dynamic=True, grad_mode="inference_mode", greedy=True),
               "qwen3_moe": dict(dynamic=None, grad_mode="no_grad", greedy=False),
               "mixtral": dict(dynamic=True, grad_mode="inference_mode", greedy=False)}
SOURCES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
           "mixtral": "MixtralForCausalLM", "hand": "HandTP"}
ALLREDUCED = (".o_proj", ".down_proj", ".mlp.experts")  # where a decoder layer's allreduces are traced
HAND_MAX_TOKENS = 16


def _calls(stats) -> int:
    return sum(n for path, n in stats["calls"].items() if not path.startswith("autofuse/"))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _grad_mode(name):
    return torch.inference_mode() if name == "inference_mode" else torch.no_grad()


def _forwards(model, compiled, reference, prompt, call):
    """Eager TP, single-process and compiled logits, and the fused calls of each of two compiled forwards."""
    eager = call(model, prompt)
    single = call(reference, prompt)
    counts = []
    for _ in range(2):
        before = _calls(arfuse.stats())
        fused = call(compiled, prompt)
        counts.append(_calls(arfuse.stats()) - before)
    return {"eager_err": generate.rel_err(fused, eager), "single_err": generate.rel_err(fused, single),
            "calls_per_forward": counts, "digest": _digest(fused)}


def _hf_logits(model, prompt):
    return model(input_ids=prompt, use_cache=False).logits.float()


def _hand_logits(model, prompt):
    return model(prompt).float()


def _hand_greedy(model, prompt, steps):
    seq, picks = prompt, []
    for _ in range(steps):
        pick = model(seq)[:, -1].argmax(-1, keepdim=True)
        picks.append(pick)
        seq = torch.cat([seq, pick], dim=1)
    return torch.cat(picks, dim=1).T  # (steps, batch), as hf.greedy


def _rank(rank, world, paths):
    out = {}
    for family, cfg in HF_FAMILIES.items():
        model = hf.load(paths[family], tp_size=world)
        single = hf.load(paths[family])
        with _grad_mode(cfg["grad_mode"]):
            compiled = arfuse.compile(model, fullgraph=True, dynamic=cfg["dynamic"])
            result = _forwards(model, compiled, single, PROMPT, _hf_logits)
            if cfg["greedy"]:
                result["eager_tokens"] = hf.greedy(model, PROMPT, STEPS)[1].tolist()
                result["fused_tokens"] = hf.greedy(compiled, PROMPT, STEPS)[1].tolist()
        result["layers"] = model.config.num_hidden_layers
        out[family] = result
    model = hand.parallelize(hand.HandTP(SEED), world)
    single = hand.HandTP(SEED)
    with torch.no_grad():
        compiled = arfuse.compile(model, max_tokens=HAND_MAX_TOKENS)
        result = _forwards(model, compiled, single, PROMPT, _hand_logits)
        result["eager_tokens"] = _hand_greedy(model, PROMPT[:1], STEPS).tolist()
        result["fused_tokens"] = _hand_greedy(compiled, PROMPT[:1], STEPS).tolist()
        long = torch.cat([PROMPT, PROMPT[:, :4]], dim=1)  # 24 tokens > max_tokens: the unfused math
        before = arfuse.stats()
        result["over_capacity_err"] = generate.rel_err(_hand_logits(compiled, long), _hand_logits(single, long))
        after = arfuse.stats()
    result["over_capacity_calls"] = (after["calls"].get("autofuse/unfused (over max_tokens)", 0)
                                     - before["calls"].get("autofuse/unfused (over max_tokens)", 0))
    result["layers"] = hand.LAYERS
    out["hand"] = result
    out["stats"] = arfuse.stats()
    out["report"] = arfuse.compile_report()
    out["report_text"] = str(arfuse.compile_report())
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    paths = {family: hf.save_random(hf.config(family, "tiny"), str(root / family), seed=SEED, random_norms=True)
             for family in HF_FAMILIES}
    return launch(_rank, 2, paths, timeout_s=900)


MODELS = list(SOURCES)


@pytest.mark.parametrize("model", MODELS)
def test_fused_logits_equal_eager_tp_and_single_process(ranks, model):
    for rank, out in enumerate(ranks):
        r = out[model]
        assert r["eager_err"] <= TOL, (rank, r["eager_err"])
        assert r["single_err"] <= TOL, (rank, r["single_err"])
    assert ranks[0][model]["digest"] == ranks[1][model]["digest"], "ranks computed different logits"


@pytest.mark.parametrize("model", MODELS)
def test_two_fused_calls_per_decoder_layer_per_forward(ranks, model):
    for out in ranks:
        r = out[model]
        assert r["calls_per_forward"] == [2 * r["layers"]] * 2


@pytest.mark.parametrize("model", [m for m in MODELS if m == "hand" or HF_FAMILIES[m]["greedy"]])
def test_greedy_tokens_equal_eager_tp(ranks, model):
    for out in ranks:
        assert out[model]["fused_tokens"] == out[model]["eager_tokens"]
        assert len(out[model]["fused_tokens"]) == STEPS


@pytest.mark.parametrize("model", MODELS)
def test_report_fuses_every_layer_and_explains_the_rest(ranks, model):
    """Every decoder-layer allreduce fused, every other collective left alone with its reason. Which other
    collectives there are is the model's business (for the HF models, the transformers release's: 5.18 has no
    embedding allreduce, later ones do); the hand-written model has both an embedding allreduce and an lm_head
    all-gather by construction, so there they must be found."""
    graphs = [g for g in ranks[0]["report"]["graphs"] if g["source"] == SOURCES[model] and g["kind"] == "forward"]
    assert graphs, ranks[0]["report_text"]
    layers = ranks[0][model]["layers"]
    for g in graphs:  # the first compile and any recompile for a new shape
        fused = [c for c in g["collectives"] if c["fused"]]
        alone = [c for c in g["collectives"] if not c["fused"]]
        assert len(fused) == 2 * layers, g
        assert {c["into"] for c in fused} == {"residual_rmsnorm"}
        assert all(c["where"].endswith(ALLREDUCED) for c in fused), fused
        assert len({c["where"] for c in fused}) == 2 * layers  # each layer's two allreduces, once each
        for c in alone:
            if c["op"] != "all_reduce":
                assert c["reason"].endswith(": not an allreduce"), c
            else:
                assert "embed_tokens" in c["where"], f"an allreduce outside the embedding was left alone: {c}"
                assert c["reason"].startswith("embedding all_reduce: no residual add follows"), c
        if model == "hand":
            assert sorted((c["op"], c["where"]) for c in alone) == [
                ("all_gather_into_tensor", "lm_head"), ("all_reduce", "embed_tokens")], alone


def test_call_beyond_capacity_runs_unfused_and_is_counted(ranks):
    for out in ranks:
        r = out["hand"]
        assert r["over_capacity_err"] <= TOL
        assert r["over_capacity_calls"] == 2 * hand.LAYERS
        reasons = [k for k in out["stats"]["fallbacks"] if "max_tokens 16" in k]
        assert reasons and all("ran unfused" in k for k in reasons), out["stats"]["fallbacks"]
        assert out["stats"]["errors"] == {}
