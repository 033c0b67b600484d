"""The sweep behind ``arfuse bench`` and ``arfuse tune``: every capable path on this group, checked, then timed.

Per (hidden, dtype): every registered backend/variant that can run here, ``auto``, and the peers
(:mod:`arfuse.bench.peers`). Each path is built once (collective). Then, per token count, on inputs shared by
every path (:class:`arfuse.verify.Case`: fresh random ``x`` per rank), with outputs poisoned with NaN, one call
is checked against the float64 reference on every rank - a wrong or failing path is reported ``FAILED`` and not
timed - and only then timed (:mod:`arfuse.bench.timing`). arfuse's paths run through
``AllReduceFusion(backend="name/variant", strict=True)``, so a fallback raises instead of passing silently, and
``fusion.stats()`` is recorded as proof of which kernel ran. The whole sweep is collective: every rank runs it
and every rank returns the same records.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from arfuse.api import AllReduceFusion
from arfuse.backends import base
from arfuse.bench import peers, timing
from arfuse.core.types import Capacity, GroupCaps, Pattern, Problem
from arfuse.probe import vote
from arfuse.select import policy
from arfuse.select.table import choice_text, device_key, dtype_name
from arfuse.verify import TOLERANCE, Case, digest, poison, reference

PATTERN = Pattern.RESIDUAL_RMSNORM
BACKEND, AUTO, PEER = "backend", "auto", "peer"


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep; plain values so it pickles into spawned ranks. ``only``: path filters (a backend name,
    ``name/variant``, ``auto``, a peer name, or ``peers``); empty means every path."""

    tokens: Tuple[int, ...]
    hidden: Tuple[int, ...]
    dtypes: Tuple[str, ...]
    only: Tuple[str, ...] = ()
    peers: bool = True
    auto: bool = True
    timing: timing.TimingConfig = field(default_factory=timing.TimingConfig)
    seed: int = 0
    table_path: Optional[str] = None  # the tuning table ``auto`` reads (None: the default)
    progress: bool = True


@dataclass
class PathSpec:
    path: str
    kind: str  # BACKEND, AUTO or PEER
    reasons: Dict[int, Optional[str]]  # per token count: why it cannot run (None: it can)

    @property
    def tokens(self) -> List[int]:
        return [n for n, why in self.reasons.items() if why is None]


def selected(path: str, kind: str, only: Tuple[str, ...]) -> bool:
    """Whether the filters ``only`` keep ``path``."""
    if not only:
        return True
    return any(f == path or path.startswith(f + "/") or (f == "peers" and kind == PEER) for f in only)


def paths_for(cfg: SweepConfig, caps: GroupCaps, hidden: int, dtype: torch.dtype) -> List[PathSpec]:
    """Every path to sweep for this shape, with per token count why it cannot run. Pure."""
    specs = []
    for backend in base.registered():
        for variant in backend.variants:
            path = choice_text((backend.name, variant))
            if selected(path, BACKEND, cfg.only):
                reasons = {n: policy.why_not(backend, Problem(PATTERN, n, hidden, dtype, caps.device_type,
                                                              caps.world_size), caps, variant)
                           for n in cfg.tokens}
                specs.append(PathSpec(path, BACKEND, reasons))
    if cfg.auto and selected(policy.AUTO, AUTO, cfg.only):
        specs.append(PathSpec(policy.AUTO, AUTO, {n: None for n in cfg.tokens}))
    if cfg.peers:
        for name, why in peers.peer_reasons(caps, dtype).items():
            if selected(name, PEER, cfg.only):
                specs.append(PathSpec(name, PEER, {n: why for n in cfg.tokens}))
    return specs


def caps_summary(caps: GroupCaps) -> Dict[str, object]:
    fi = caps.fact("flashinfer")
    return {"gpu": caps.gpu_name, "sm": list(caps.sm) if caps.sm else None, "dist_backend": caps.dist_backend,
            "single_host": caps.single_host, "p2p": caps.p2p, "symm_mem": caps.fact("symm_mem"),
            "triton": caps.fact("triton"),
            "flashinfer": getattr(fi, "version", None) if fi is not None and getattr(fi, "available", False)
            else None, "notes": list(caps.notes)}


class _Inputs:
    """One token count's inputs on this rank and its float64 reference, shared by every path."""

    def __init__(self, n: int, hidden: int, dtype: torch.dtype, seed: int, rank: int, world: int,
                 device: torch.device):
        case = Case(n, hidden, dtype, seed=seed * 1_000_003 + hidden * 4099 + n)
        self.eps = case.eps
        self.x, self.residual, self.weight = case.x(rank, device), case.residual(device), case.weight(device)
        ref_out, ref_res = reference(case, world, PATTERN)
        self.ref_out, self.ref_res = ref_out.to(device), ref_res.to(device)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = out.double() - ref
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    return (diff.norm() / ref.norm().clamp_min(1e-300)).item()


class _Sweep:
    """One rank's share of the sweep. Every method that touches the group is collective."""

    def __init__(self, cfg: SweepConfig, group, device: torch.device):
        self.cfg, self.group, self.device = cfg, group, device
        self.rank, self.world = vote.rank(group), vote.world_size(group)
        self.records: List[dict] = []
        self.shapes: List[dict] = []
        self.bar = self._progress()

    def _progress(self):
        from tqdm import tqdm

        return tqdm(total=0, file=sys.stderr, unit="pt", dynamic_ncols=True,
                    disable=not (self.cfg.progress and self.rank == 0))

    def run(self) -> Dict[str, list]:
        try:
            for dtype_text in self.cfg.dtypes:
                for hidden in self.cfg.hidden:
                    self._shape(hidden, getattr(torch, dtype_text))
        finally:
            self.bar.close()
        return {"measurements": self.records, "shapes": self.shapes}

    def _shape(self, hidden: int, dtype: torch.dtype) -> None:
        top = max(self.cfg.tokens)
        with AllReduceFusion(self.group, max_tokens=top, hidden_size=hidden, dtype=dtype, device=self.device,
                             backend=policy.REFERENCE, strict=True) as probe:
            caps = probe.caps
        specs = paths_for(self.cfg, caps, hidden, dtype)
        self.shapes.append({"world_size": self.world, "hidden": hidden, "dtype": dtype_name(dtype),
                            "caps": caps_summary(caps), "restriction": policy.group_restriction(caps),
                            "paths": {s.path: {"kind": s.kind, "tokens": s.tokens,
                                               "reason": next((w for w in s.reasons.values() if w), None)}
                                      for s in specs}})
        self.bar.total += sum(len(s.reasons) for s in specs)
        self.bar.refresh()
        inputs: Dict[int, _Inputs] = {}
        for spec in specs:
            self._path(spec, caps, hidden, dtype, inputs)

    def _record(self, spec: PathSpec, caps: GroupCaps, hidden: int, dtype: torch.dtype, n: int, **fields) -> dict:
        rec = {"world_size": self.world, "gpu": device_key(caps), "device": self.device.type, "hidden": hidden,
               "dtype": dtype_name(dtype), "tokens": n, "path": spec.path, "kind": spec.kind, "status": "n/a",
               "us": None, "us_ranks": None, "us_spread": None, "err_out": None, "err_residual": None,
               "identical": None, "reason": None, "ran": None, "plan": None, "counters": None}
        rec.update(fields)
        for key in ("err_out", "err_residual"):  # JSON has no inf/nan: an unusable output is None + reason
            if rec[key] is not None and not math.isfinite(rec[key]):
                rec[key] = None
        self.records.append(rec)
        self.bar.update(1)
        return rec

    def _path(self, spec: PathSpec, caps: GroupCaps, hidden: int, dtype: torch.dtype,
              inputs: Dict[int, _Inputs]) -> None:
        self.bar.set_description(f"TP{self.world} h{hidden} {dtype_name(dtype)} {spec.path}")
        for n, why in spec.reasons.items():
            if why is not None:
                self._record(spec, caps, hidden, dtype, n, reason=why)
        if not spec.tokens:
            return
        call, fusion, why = self._build(spec, Capacity(max(spec.tokens), hidden, dtype, self.device))
        if why is not None:
            for n in spec.tokens:
                self._record(spec, caps, hidden, dtype, n, status="FAILED", reason=why)
            return
        try:
            for n in spec.tokens:
                if n not in inputs:
                    inputs[n] = _Inputs(n, hidden, dtype, self.cfg.seed, self.rank, self.world, self.device)
                self._measure(spec, caps, call, fusion, inputs[n], hidden, dtype, n)
        finally:
            (fusion or call).close()

    def _build(self, spec: PathSpec, capacity: Capacity) -> Tuple[Optional[Callable], Optional[AllReduceFusion],
                                                                  Optional[str]]:
        """The path's callable (and its fusion object for arfuse paths), or why it could not be built. The
        outcome is agreed by all ranks, so either every rank runs the path or none does."""
        call = fusion = why = None
        try:
            if spec.kind == PEER:
                call = peers.build_peer(spec.path, self.group, capacity)
            else:
                fusion = AllReduceFusion(self.group, max_tokens=capacity.max_tokens,
                                         hidden_size=capacity.hidden_size, dtype=capacity.dtype, device=self.device,
                                         backend=spec.path, strict=True,
                                         table_path=self.cfg.table_path if spec.kind == AUTO else None)
                call = fusion.residual_rmsnorm
        except Exception as e:  # boundary: a path that cannot be built is reported, and the sweep goes on
            why = f"build: {type(e).__name__}: {e}"
        ok, reason = vote.agree(why is None, why, self.group)
        if not ok:
            if fusion is not None or call is not None:
                (fusion or call).close()
            return None, None, reason
        return call, fusion, None

    def _check(self, call, inp: _Inputs, dtype: torch.dtype):
        """One call on poisoned outputs; returns (record fields, failure reason or None). Collective."""
        x = inp.x.clone()  # peers all-reduce in place
        norm_out, res_out = poison(torch.empty_like(x)), poison(torch.empty_like(x))
        error = None
        try:
            call(x, inp.residual, inp.weight, inp.eps, norm_out=norm_out, residual_out=res_out)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            mine = (_rel_err(norm_out, inp.ref_out), _rel_err(res_out, inp.ref_res), digest(norm_out, res_out))
        except Exception as e:  # boundary: a failing call is a FAILED measurement
            error, mine = f"{type(e).__name__}: {e}", (math.inf, math.inf, None)
        every = vote.all_gather_object((mine, error), self.group)
        err_out, err_res = max(m[0][0] for m in every), max(m[0][1] for m in every)
        fields = {"err_out": err_out, "err_residual": err_res, "identical": len({m[0][2] for m in every}) == 1}
        failed = next((f"rank {r}: {m[1]}" for r, m in enumerate(every) if m[1]), None)
        tol = TOLERANCE[dtype]
        if failed is None and not (err_out <= tol and err_res <= tol):
            failed = f"error vs float64 reference {max(err_out, err_res):.3g} > tolerance {tol:g}"
        return fields, failed, (x, norm_out, res_out)

    def _measure(self, spec: PathSpec, caps: GroupCaps, call, fusion: Optional[AllReduceFusion],
                 inp: _Inputs, hidden: int, dtype: torch.dtype, n: int) -> None:
        if fusion is not None:
            fusion.reset_stats()
        fields, failed, (x, norm_out, res_out) = self._check(call, inp, dtype)
        if fusion is not None:
            plan = fusion.plan(PATTERN, n)
            fields["plan"] = {"path": plan.key, "reason": plan.reason}
            fields["ran"] = sorted(fusion.stats()["calls"])
            if failed is None and spec.kind == BACKEND and fields["ran"] != [spec.path]:
                failed = f"ran {fields['ran']} instead of {spec.path}"
        if failed is not None:
            self._record(spec, caps, hidden, dtype, n, status="FAILED", reason=failed, **fields)
            return
        why = None
        try:
            measured = timing.time_call(lambda: call(x, inp.residual, inp.weight, inp.eps, norm_out=norm_out,
                                                     residual_out=res_out), self.device, self.group, self.cfg.timing)
        except Exception as e:  # boundary: a path that breaks under graph capture is reported
            why, measured = f"timing: {type(e).__name__}: {e}", timing.Measured(math.nan)
        ok, reason = vote.agree(why is None, why, self.group)
        if not ok:
            self._record(spec, caps, hidden, dtype, n, status="FAILED", reason=reason, **fields)
            return
        worst, per_rank = timing.worst_over_ranks(measured, self.group)
        if fusion is not None:
            fields["counters"] = dict(fusion.stats())
        self._record(spec, caps, hidden, dtype, n, status="ok", us=worst.us, us_ranks=per_rank,
                     us_spread=list(worst.spread) if worst.spread else None, **fields)


def current_device(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sweep(cfg: SweepConfig, group=None, device_type: str = "cpu") -> Dict[str, list]:
    """Run the sweep on this rank of ``group`` (default: WORLD, already initialised). Collective.

    Returns ``{"measurements": [...], "shapes": [...]}``, identical on every rank: one measurement per (path,
    token count) with ``status`` ``ok`` (``us`` = µs per call, slowest rank; on CPU ``us_spread`` = the
    samples' interquartile range, each bound the largest over the ranks), ``FAILED`` or ``n/a`` and its
    ``reason``; one shape per (hidden, dtype) with the group's capabilities and every path's capability.
    """
    return _Sweep(cfg, group, current_device(device_type)).run()
