import torch, timeit, arfuse
from arfuse.core.spec import FusionSpec
from arfuse.core.types import FusedCall
f = arfuse.AllReduceFusion(max_tokens=16, hidden_size=256, dtype=torch.bfloat16, device="cpu")
x, r, w = torch.randn(8,256,dtype=torch.bfloat16), torch.randn(8,256,dtype=torch.bfloat16), torch.rand(256,dtype=torch.bfloat16)
spec = FusionSpec()
prep = f._preparation
def acc():
    c = FusedCall(x, None, residual=r, weight=w, eps=1e-6)
    prep.accept(spec, c, False)
def mk(): FusedCall(x, None, residual=r, weight=w, eps=1e-6)
dev = torch.device("cpu")
N=20000
with torch.inference_mode():
  for name, fn in [("FusedCall", mk), ("FusedCall+accept", acc), ("x.device!=dev", lambda: x.device != dev), ("x.is_contiguous", lambda: x.is_contiguous()), ("x.shape", lambda: x.shape), ("empty_like", lambda: torch.empty_like(x)), ("residual_rmsnorm", lambda: f.residual_rmsnorm(x, r, w, 1e-6)), ("F.rms_norm", lambda: torch.nn.functional.rms_norm(x, (256,), w, 1e-6))]:
    t = min(timeit.repeat(fn, number=N, repeat=5))/N*1e6
    print(f"{name:20s} {t:6.2f} us")
from arfuse.core.op_specs import spec_for
from arfuse.core import op_specs as opspecs
c0 = FusedCall(x, None, residual=r, weight=w, eps=1e-6); prep.accept(spec, c0, False)
ex = f._executor
with torch.inference_mode():
  for name, fn in [("spec_for", lambda: spec_for(opspecs.RESIDUAL_RMSNORM, 0.0)), ("executor.run", lambda: ex.run(spec, c0)), ("_call", lambda: f._call("residual_rmsnorm", spec, False, FusedCall(x, None, residual=r, weight=w, eps=1e-6)))]:
    t = min(timeit.repeat(fn, number=N, repeat=5))/N*1e6
    print(f"{name:20s} {t:6.2f} us")
  import cProfile, pstats
  cProfile.run("for _ in range(20000): ex.run(spec, c0)", "/tmp/prof")
  pstats.Stats("/tmp/prof").sort_stats("tottime").print_stats(18)
