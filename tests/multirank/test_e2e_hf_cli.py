"""``arfuse e2e --model hf:llama`` as a user runs it, on 2 gloo ranks (a one-layer tiny Llama, one point each): the
three paths agree with transformers' eager TP on every rank, ``arfuse.compile`` fuses both allreduces of the
layer, and the JSON and the report say so. The timings themselves are not checked (a benchmark's job)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_e2e_model_hf_runs_all_three_paths_and_fuses_every_layer(tmp_path, capsys):
    from arfuse.cli.main import main

    out = tmp_path / "e2e_hf.json"
    code = main(["e2e", "--model", "hf:llama", "--device", "cpu", "--tp", "2", "--layers", "1", "--prompt-lens", "8",
                 "--batches", "2", "--kv-len", "8", "--prefill-repeats", "1", "--decode-replays", "1",
                 "--check-steps", "2", "--no-progress", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    record = json.loads(out.read_text())
    results = record["results"]
    assert list(results) == ["hf_eager", "hf_compile", "arfuse_compile"]
    for path, result in results.items():
        check = result["check"]
        assert check["ok"] and check["ranks_identical"] and check["logits_rel_err"] <= 1e-5, (path, check)
        assert set(result["ttft_ms"]) == {"8"} and set(result["tpot_ms"]) == {"2"}
        assert all(v > 0 for v in [*result["ttft_ms"].values(), *result["tpot_ms"].values()])
    assert results["arfuse_compile"]["fused_calls_per_forward"] == 2  # o_proj's and down_proj's allreduce
    assert results["hf_compile"]["fused_calls_per_forward"] == 0
    assert "fused into residual_rmsnorm" in printed
    alone = [c for g in record["report"]["graphs"] for c in g["collectives"] if not c["fused"]]
    assert all(c["reason"] and f"left alone: {c['reason']}" in printed for c in alone), alone  # whichever there are
    assert record["tp"] == 2 and record["compile_mode"] == "default"
