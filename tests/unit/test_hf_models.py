"""HF transformers models for ``arfuse.compile`` and ``arfuse e2e --model hf:...``: config presets, random
builds, greedy decoding, the HF timing helpers (eager, one process) and the command's argument checks."""
from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("transformers")
from arfuse.cli import e2e, e2e_hf  # noqa: E402
from arfuse.models import hf, hf_timing  # noqa: E402
from arfuse.models.timing import TimingConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return hf.build(hf.config("llama", "tiny", layers=1), seed=0)


def test_presets_have_the_documented_shapes():
    cfg = hf.config("qwen2", "llama3-70b", layers=2)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.num_hidden_layers) == (8192, 28672, 64, 8, 2)
    assert hf.config("llama", "llama3-8b").num_hidden_layers == 32


@pytest.mark.parametrize("kwargs, words", [
    (dict(family="gpt2"), "family"), (dict(family="llama", preset="huge"), "preset"),
    (dict(family="llama", layers=0), "layers"), (dict(family="llama", layers=True), "layers"),
])
def test_bad_config_arguments_raise_naming_them(kwargs, words):
    with pytest.raises(ValueError, match=words):
        hf.config(**kwargs)


def test_build_is_deterministic_and_greedy_has_the_documented_shape(tiny):
    again = hf.build(hf.config("llama", "tiny", layers=1), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values()))
    logits, tokens = hf.greedy(tiny, torch.tensor([[1, 2, 3], [4, 5, 6]]), 3)
    assert logits.shape == (3, 2, tiny.config.vocab_size) and tokens.shape == (3, 2)
    assert torch.equal(tokens, logits.argmax(-1))


def test_greedy_can_be_teacher_forced(tiny):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    logits, tokens = hf.greedy(tiny, prompt, 4)
    forced_logits, forced_tokens = hf.greedy(tiny, prompt, 4, forced=tokens)  # its own picks: the same run
    assert torch.equal(forced_logits, logits) and torch.equal(forced_tokens, tokens)
    other = (tokens + 1) % tiny.config.vocab_size
    steered, _ = hf.greedy(tiny, prompt, 4, forced=other)
    assert torch.equal(steered[0], logits[0]) and not torch.equal(steered[1:], logits[1:])  # fed, not picked
    with pytest.raises(ValueError, match="forced"):
        hf.greedy(tiny, prompt, 4, forced=tokens[:2])


def test_saved_checkpoint_loads_to_the_same_model(tiny, tmp_path):
    path = hf.save_random(tiny.config, str(tmp_path / "m"), seed=0)
    loaded = hf.load(path)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, tiny(input_ids=ids).logits)


def test_timing_helpers_time_prefill_and_decode(tiny):
    cfg = TimingConfig(prefill_warmup=1, prefill_repeats=2, decode_warmup=1, decode_replays=2)
    samples = hf_timing.prefill_samples(tiny, 8, tiny.config.vocab_size, cfg, torch.device("cpu"))
    assert len(samples) == 2 and all(s > 0 for s in samples)
    assert hf_timing.time_decode(tiny, 2, 8, tiny.config.vocab_size, cfg, torch.device("cpu")) > 0


def test_decode_passes_the_cache_under_the_keyword_the_model_takes(tiny):
    class OldForward(torch.nn.Module):  # transformers 5.17's spelling: past_key_values only
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return {"past_key_values": past_key_values, "logits": None}

    assert hf_timing.cache_keyword(OldForward()) == "past_key_values"
    assert hf_timing.cache_keyword(tiny) in ("cache", "past_key_values")
    assert hf_timing.cache_keyword(torch.compile(tiny)) == hf_timing.cache_keyword(tiny)  # looks through the wrapper


@pytest.mark.parametrize("text", ["llama", "hf:gpt2", "vllm:llama", "hf:"])
def test_model_option_must_name_an_hf_family(text):
    with pytest.raises(ValueError, match="--model"):
        e2e_hf.parse_model(text)
    assert e2e_hf.parse_model("hf:qwen2") == "qwen2"


def _args(*argv):
    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    return p.parse_args(list(argv))


def test_e2e_rejects_a_bad_model_or_preset_before_launching(capsys):
    from arfuse.cli.main import main as cli_main

    for argv, flag in ((["--model", "hf:gpt2"], "--model"), (["--model", "hf:llama", "--preset", "huge"], "--preset")):
        with pytest.raises(SystemExit) as info:
            cli_main(["e2e", *argv, "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and flag in err and len(err.splitlines()) == 1, err
    assert _args().model is None  # the default: arfuse's own model, as before


@pytest.mark.parametrize("argv, flag", [
    (["--model", "hf:llama", "--backends", "auto"], "--backends"),
    (["--model", "hf:llama", "--compile", "pointwise"], "--compile"),
    (["--model", "hf:llama", "--profile"], "--profile"),
    (["--model", "hf:llama", "--rank-shapes-of", "4"], "--rank-shapes-of"),
    (["--model", "hf:llama", "--compile-mode", "reduce-overhead"], "--compile-mode"),  # CUDA graphs: not on CPU
    (["--compile-mode", "default"], "--compile-mode"),  # an HF model's option, not arfuse's own model's
])
def test_e2e_flags_that_do_not_apply_are_errors_not_ignored(argv, flag, capsys):
    from arfuse.cli.main import main as cli_main

    with pytest.raises(SystemExit) as info:
        cli_main(["e2e", *argv, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and flag in err and len(err.splitlines()) == 1, err


def test_readme_fuse_example_is_the_documented_script():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (snippet,) = [s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if "fuse_hf.py" in s]
    compile(snippet, "README.md", "exec")  # valid Python (it ran under torchrun with 2 gloo ranks when written)
    for needed in ("DistributedConfig(tp_size=2)", "arfuse.compile(model)", "arfuse.compile_report()",
                   "arfuse.stats()", 'init_process_group("gloo")'):
        assert needed in snippet
    # the transformers 4.x spelling, which bench/versions.py substitutes to run the example on 4.57.6
    assert ('write `tp_plan="auto"` in place of `distributed_config=transformers.DistributedConfig(tp_size=2)`'
            in " ".join(readme.split()))


def test_tp_is_asked_for_in_the_installed_transformers_spelling():
    import types

    import torch.distributed as dist

    five = types.SimpleNamespace(DistributedConfig=lambda tp_size, **ep: ("config", tp_size, ep), __version__="5.25.0")
    assert hf.tp_kwargs(five, 2) == {"distributed_config": ("config", 2, {})}
    # a MoE config whose TP plan leaves the experts to its EP plan: experts sharded over the TP ranks and summed
    moe = types.SimpleNamespace(base_model_tp_plan={"layers.*.self_attn.o_proj": "rowwise"},
                                base_model_ep_plan={"layers.*.mlp.experts": "ep_dispatch_experts"})
    assert hf.tp_kwargs(five, 2, moe) == {"distributed_config": ("config", 2, {"ep_size": 2,
                                                                               "ep_implementation": "all_reduce"})}
    moe.base_model_tp_plan["layers.*.mlp.experts"] = "moe_tp_experts"  # older plans shard them by TP
    assert hf.tp_kwargs(five, 2, moe) == {"distributed_config": ("config", 2, {})}
    assert not hf.experts_need_ep(hf.config("llama", "tiny"))
    shared_only = types.SimpleNamespace(base_model_tp_plan={"layers.*.mlp.shared_experts.down_proj": "rowwise"},
                                        base_model_ep_plan={"layers.*.mlp.shared_experts": "x"})
    assert not hf.experts_need_ep(shared_only)  # a shared expert is not the routed experts
    older = types.SimpleNamespace(DistributedConfig=lambda tp_size: ("config", tp_size, {}), __version__="5.0.0")
    moe.base_model_tp_plan.pop("layers.*.mlp.experts")  # a release whose DistributedConfig has no EP: TP alone
    assert hf.tp_kwargs(older, 2, moe) == {"distributed_config": ("config", 2, {})}
    moe.num_experts = 4  # experts must split evenly over the ranks: a clear error before transformers' own
    with pytest.raises(ValueError, match="its 4 experts do not split over 8 ranks: use a TP size that divides 4"):
        hf.tp_kwargs(five, 8, moe)
    four = types.SimpleNamespace(__version__="4.57.6")  # no DistributedConfig: tp_plan="auto" over the group
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="tp_size=2 needs the default process group"):
            hf.tp_kwargs(four, 2)
    else:
        assert hf.tp_kwargs(four, dist.get_world_size()) == {"tp_plan": "auto"}


def test_moe_presets_and_random_norm_weights():
    qwen3 = hf.config("qwen3_moe", "tiny")
    assert (qwen3.num_experts, qwen3.num_experts_per_tok, qwen3.moe_intermediate_size) == (hf.EXPERTS, hf.TOP_K, 32)
    assert qwen3.decoder_sparse_step == 1 and list(qwen3.mlp_only_layers) == []  # every layer has experts
    mixtral = hf.config("mixtral", "tiny")
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (hf.EXPERTS, hf.TOP_K)
    plain = hf.build(hf.config("llama", "tiny", layers=1), seed=0)
    drawn = hf.build(hf.config("llama", "tiny", layers=1), seed=0, random_norms=True)
    norms = {n: p for n, p in drawn.named_parameters() if n.endswith("norm.weight")}
    assert len(norms) == 3 and all(0.5 <= p.min() and p.max() <= 1.5 and p.std() > 0 for p in norms.values())
    assert all(torch.equal(p, 1 + 0 * p) for n, p in plain.named_parameters() if n.endswith("norm.weight"))
