"""Which torch x Triton x transformers combinations arfuse works with, measured on this (CPU) machine.

Usage: python bench/versions.py --out DIR [--workdir DIR] [--torch V ...] [--triton V ...]
       [--transformers V ...] [--wheels DIR] [--keep] [--steps STEP ...]

One virtual environment per torch version (under ``--workdir``, deleted afterwards unless ``--keep``); inside it,
per Triton x transformers combination: ``pip install triton==X transformers==Y accelerate``, then the README's test
command (``pip install -e '.[test]'``, recording whether it changed any of torch/Triton/transformers), then the
steps:

- ``demo``: ``arfuse demo --no-progress`` (2 gloo ranks, every op checked against the float64 reference);
- ``readme_hf``: the README's ``fuse_hf.py`` under ``torchrun --nproc-per-node 2``, with the README's transformers
  4.x spelling where the installed transformers has no ``DistributedConfig``; passes if it exits 0, prints
  ``max |fused - eager|`` <= 1e-5 on both ranks and fuses at least one collective;
- ``kernel_tests``: ``tests/unit/test_kernels_compile.py`` (every Triton kernel compiled for sm_90) and
  ``tests/unit/test_fast_launch.py`` (the launchers' keys against Triton's binder, and the check of Triton's
  private API that turns the fast launch off) and ``tests/unit/test_epilogue_interpreted.py`` (the nccl path's
  kernels run by Triton's interpreter against float64);
- ``hf_tests``: ``tests/unit/test_hf_models.py``, ``tests/multirank/test_autofuse_models_cpu.py`` (HF Llama and
  Qwen2 with transformers' TP, and a hand-sharded model, compiled on 2 ranks) and
  ``tests/multirank/test_e2e_hf_cli.py`` (``arfuse e2e --model hf:llama``);
- ``probe``: imports arfuse, transformers and Triton together and records whether the fast launch is on (and why
  not) and which TP spelling transformers takes.

Not the whole suite (about 13 minutes on 2 cores per run). By default (``--steps auto``) each combination runs
what its own versions can change, so that a sweep fits in about two hours on 2 cores: ``probe`` everywhere,
``demo`` once per torch, ``kernel_tests`` per Triton (with the newest transformers given), ``readme_hf`` per
transformers (with the newest Triton given) and ``hf_tests`` with the newest Triton and the oldest and newest
transformers given (``--hf-tests newest``: the newest only; ``none``: not at all); the table says "-" where a
step did not run. ``--steps STEP ...`` runs those steps on every
combination. Writes ``results.json`` (machine, date, every combination's versions and steps),
``table.md`` and ``logs/<combination>/<step>.log`` under ``--out``. The machine's pip cap on torch (a constraint
file) is lifted inside these environments for torch versions above it. Not run by CI.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO  # what the steps run: a snapshot of REPO's HEAD (main() sets it), so edits during a sweep change nothing
STEPS = ("probe", "demo", "readme_hf", "kernel_tests", "hf_tests")
TESTS = {"kernel_tests": ["tests/unit/test_kernels_compile.py", "tests/unit/test_fast_launch.py",
                          "tests/unit/test_epilogue_interpreted.py"],
         "hf_tests": ["tests/unit/test_hf_models.py", "tests/multirank/test_autofuse_models_cpu.py",
                      "tests/multirank/test_e2e_hf_cli.py"]}
PROBE = """import importlib.metadata as m, json, arfuse, transformers
from arfuse.kernels import _launch
check = getattr(_launch, "triton_api_problem", None)  # bench/pending/launch_triton_api_check.patch
problem, extra = check() if check else ("no Triton API check in this arfuse", ())
print(json.dumps({"arfuse": arfuse.__file__, "fast_launch": "on" if _launch.ENABLED else "off: " + str(problem),
                  "keyed_knobs": [".".join(k) for k in extra],
                  "tp_spelling": "DistributedConfig" if hasattr(transformers, "DistributedConfig") else "tp_plan"}))
"""
PACKAGES = ("torch", "triton", "transformers", "accelerate")
README_TP = "distributed_config=transformers.DistributedConfig(tp_size=2)"
README_TP_4X = 'tp_plan="auto"'
STEP_TIMEOUT_S = 3600
# This machine is shared (other sessions' builds and tests): the tests' own bounds (10 min a test, 4-9 min a
# launch of ranks) stretched, so that only a hang fails, not a slow compile.
TEST_TIMEOUT_S, TIMEOUT_SCALE = 1800, 3


def run(cmd: List[str], log: Path, env: Optional[dict] = None, timeout: int = STEP_TIMEOUT_S) -> dict:
    """Run ``cmd`` in the repository, its output to ``log``: exit code, seconds, the output's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text(errors="replace")
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    return {"code": code, "seconds": round(time.monotonic() - start, 1), "last_line": last.strip()[:300],
            "log": str(log.relative_to(log.parents[2]))}


def pip_env(torch_version: str, empty_constraint: Path) -> dict:
    """The environment of pip and the steps: the machine's pip cap (torch <= 2.14.1) lifted above it."""
    env = dict(os.environ)
    if release(torch_version) > (2, 14, 1):
        env["PIP_CONSTRAINT"] = str(empty_constraint)
    return env


def installed(python: Path) -> Dict[str, Optional[str]]:
    code = ("import importlib.metadata as m, json\n"
            f"out = {{}}\nfor p in {PACKAGES!r}:\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\nprint(json.dumps(out))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def readme_example(transformers_version: str) -> str:
    """The README's ``fuse_hf.py``, in the spelling the README gives for this transformers."""
    text = (ROOT / "README.md").read_text()
    (snippet,) = [s for s in re.findall(r"```python\n(.*?)```", text, re.S) if "fuse_hf.py" in s]
    if int(transformers_version.split(".")[0]) < 5:
        assert README_TP in snippet, "the README's fuse_hf.py no longer spells transformers' TP as expected"
        snippet = snippet.replace(README_TP, README_TP_4X)
    return snippet


def judge_readme(result: dict, log: Path) -> dict:
    text = log.read_text(errors="replace")
    errs = [float(x) for x in re.findall(r"max \|fused - eager\| = ([0-9.e+-]+)", text)]
    fused = re.findall(r"(\d+) of (\d+) collectives fused", text)
    result["max_err"] = max(errs) if errs else None
    result["fused"] = [f"{a}/{b}" for a, b in fused]
    ok = result["code"] == 0 and len(errs) == 2 and max(errs) <= 1e-5 and fused and all(int(a) > 0 for a, _ in fused)
    result["ok"] = bool(ok)
    return result


def judge_pytest(result: dict) -> dict:
    last = result["last_line"]
    result["ok"] = result["code"] == 0 and " passed" in last and "failed" not in last and "error" not in last
    result["summary"] = re.sub(r"^=+ | =+$", "", last)
    return result


def combination(python: Path, env: dict, torch_v: str, triton_v: str, tf_v: str, logs: Path, steps) -> dict:
    pip = [str(python), "-m", "pip"]
    record = {"requested": {"torch": torch_v, "triton": triton_v, "transformers": tf_v}, "steps": {}}
    # torch pinned too: otherwise pip satisfies a Triton the torch build does not take by replacing torch
    inst = run([*pip, "install", f"torch=={torch_v}", f"triton=={triton_v}", f"transformers=={tf_v}", "accelerate"],
               logs / "install.log", env)
    record["install"] = inst
    record["pip_conflicts"] = [line.strip() for line in (logs / "install.log").read_text().splitlines()
                               if ("requires" in line and "incompatible" in line) or " depends on " in line]
    before = installed(python)
    readme = run([*pip, "install", "-e", ".[test]"], logs / "readme_install.log", env)
    after = installed(python)
    record["versions"] = after
    record["readme_test_install"] = {"code": readme["code"], "changed": {
        p: [before[p], after[p]] for p in ("torch", "triton", "transformers") if before[p] != after[p]}}
    if inst["code"] != 0 or readme["code"] != 0:
        record["steps"] = {s: {"ok": False, "skipped": "install failed"} for s in steps}
        return record
    bindir = python.parent
    if "probe" in steps:
        r = run([str(python), "-c", PROBE], logs / "probe.log", env)
        r["ok"] = r["code"] == 0
        if r["ok"]:
            r.update(json.loads(r["last_line"]))
        record["steps"]["probe"] = r
    if "demo" in steps:
        r = run([str(bindir / "arfuse"), "demo", "--no-progress"], logs / "demo.log", env)
        r["ok"] = r["code"] == 0
        record["steps"]["demo"] = r
    if "readme_hf" in steps:
        script = logs / "fuse_hf.py"
        script.write_text(readme_example(after["transformers"]))
        r = run([str(bindir / "torchrun"), "--nproc-per-node", "2", str(script)], logs / "readme_hf.log", env)
        record["steps"]["readme_hf"] = judge_readme(r, logs / "readme_hf.log")
    for step in ("kernel_tests", "hf_tests"):
        if step in steps:
            r = run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", f"timeout={TEST_TIMEOUT_S}",
                     *TESTS[step]], logs / f"{step}.log", dict(env, ARFUSE_TEST_TIMEOUT_SCALE=str(TIMEOUT_SCALE)))
            record["steps"][step] = judge_pytest(r)
    return record


def planned(steps, triton_i: int, tf_i: int, n_triton: int, n_tf: int, hf_tests: str = "ends") -> List[str]:
    """The steps of one combination (``steps``: a list, or ``["auto"]``: see the module docstring; ``hf_tests``:
    ``ends`` runs them with the oldest and the newest transformers, ``newest`` with the newest only, ``none``
    nowhere)."""
    if steps != ["auto"]:
        return list(steps)
    newest_triton, newest_tf = triton_i == n_triton - 1, tf_i == n_tf - 1
    chosen = {"probe": True, "demo": triton_i == tf_i == 0, "kernel_tests": newest_tf, "readme_hf": newest_triton,
              "hf_tests": newest_triton and hf_tests != "none" and (newest_tf or (tf_i == 0 and hf_tests == "ends"))}
    return [s for s in STEPS if chosen[s]]


def cell(step: Optional[dict]) -> str:
    if step is None:
        return "-"
    if step.get("skipped"):
        return f"not run ({step['skipped']})"
    mark = "pass" if step["ok"] else "FAIL"
    if "fast_launch" in step:
        return f"{mark}, fast launch {step['fast_launch']}, TP via {step['tp_spelling']}"
    if "fused" in step:
        detail = f", fused {' '.join(sorted(set(step['fused'])))}" if step["fused"] else ""
        err = f", err {step['max_err']:.1e}" if step.get("max_err") is not None else ""
        return f"{mark}{detail}{err}"
    if "summary" in step:
        return f"{mark} ({step['summary']})"
    return mark


def table(records: List[dict]) -> str:
    head = ["torch", "Triton", "transformers", "README test install", *STEPS, "pip conflicts", "arfuse commit"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        v = r.get("versions") or r["requested"]
        changed = r.get("readme_test_install", {}).get("changed")
        install = ("changed " + ", ".join(f"{p} {a}->{b}" for p, (a, b) in changed.items())) if changed else \
            ("left all alone" if changed is not None else "-")
        conflicts = "; ".join(r.get("pip_conflicts", [])) or "none"
        commits = sorted({s.get("commit") or r.get("commit") or "?" for s in r["steps"].values()})
        rows.append("| " + " | ".join([v.get("torch") or "-", v.get("triton") or "-", v.get("transformers") or "-",
                                       install, *[cell(r["steps"].get(s)) for s in STEPS], conflicts,
                                       ", ".join(commits)]) + " |")
    return "\n".join(rows) + "\n"


def save(results_file: Path, data: dict, record: dict) -> dict:
    """Add ``record`` to the results on disk (re-read first: another sweep may share the file); a combination
    measured again keeps its earlier steps that this run did not repeat."""
    if results_file.exists():
        data = dict(data, combinations=json.loads(results_file.read_text())["combinations"])
    old = next((c for c in data["combinations"] if c["name"] == record["name"]), None)
    if old is not None:
        record["steps"] = {**old["steps"], **record["steps"]}
    data["combinations"] = [c for c in data["combinations"] if c["name"] != record["name"]] + [record]
    results_file.write_text(json.dumps(data, indent=1) + "\n")
    return data


def snapshot(workdir: Path) -> Path:
    """HEAD's committed files in ``workdir/src-<commit>`` (made once)."""
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    path = workdir / f"src-{commit}"
    if not path.exists():
        path.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    return path


def short(step: Optional[dict]) -> str:
    """A README cell: pass/FAIL, the tests' count or the example's fused collectives."""
    if step is None:
        return "-"
    if step.get("skipped"):
        return f"not run ({step['skipped']})"
    if not step["ok"]:
        return "FAIL"
    if "fused" in step:
        return "pass, " + " ".join(sorted(set(step["fused"]))) + " fused"
    found = re.search(r"(\d+) passed", step.get("summary", ""))
    return f"pass ({found.group(1)})" if found else "pass"


def readme_table(records: List[dict]) -> str:
    """The README's summary: one row per combination, fast launch and TP spelling folded into the versions."""
    head = ["torch", "Triton (fast launch)", "transformers (TP)", "README test command", "demo",
            "README HF example", "kernel tests", "HF tests"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(records, key=lambda r: [release(r["requested"][p]) for p in ("torch", "triton", "transformers")]):
        v, probe = r.get("versions") or r["requested"], r["steps"].get("probe") or {}
        launch = probe.get("fast_launch", "?").split(":")[0]
        changed = r.get("readme_test_install", {}).get("changed")
        if r.get("install", {}).get("code") != 0:
            why = "; ".join(c.split(";")[0] for c in r.get("pip_conflicts", [])) or "see its install.log"
            rows.append("| " + " | ".join([r["requested"][p] for p in ("torch", "triton", "transformers")])
                        + f" | pip cannot install it ({why}) | | | | |")
            continue
        rows.append("| " + " | ".join([
            v["torch"], f"{v['triton']} ({launch})", f"{v['transformers']} ({probe.get('tp_spelling', '?')})",
            "kept all" if changed == {} else ("changed " + ", ".join(changed) if changed else "-"),
            *[short(r["steps"].get(s)) for s in ("demo", "readme_hf", "kernel_tests", "hf_tests")]]) + " |")
    return "\n".join(rows) + "\n"


def release(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def machine(commit: str) -> dict:
    return {"date": datetime.date.today().isoformat(), "host": platform.node(), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "commit": commit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="results directory (results.json, table.md, logs/)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/arfuse-versions"), help="where the venvs go")
    p.add_argument("--torch", nargs="+", default=["2.11.0", "2.13.0", "2.14.1", "2.15.0"])
    p.add_argument("--triton", nargs="+", default=["3.6.0", "3.9.0"])
    p.add_argument("--transformers", nargs="+", default=["4.57.6", "5.17.0", "5.25.0"])
    p.add_argument("--steps", nargs="+", choices=(*STEPS, "auto"), default=["auto"])
    p.add_argument("--hf-tests", choices=("ends", "newest", "none"), default="ends",
                   help="auto plan: hf_tests with the oldest and newest transformers (ends), the newest only, or none")
    p.add_argument("--wheels", type=Path, help="a folder of downloaded wheels pip may take (--find-links)")
    p.add_argument("--keep", action="store_true", help="keep the venvs")
    p.add_argument("--table", action="store_true", help="only write table.md from --out's results.json")
    args = p.parse_args(argv)
    if args.table:
        records = json.loads((args.out / "results.json").read_text())["combinations"]
        (args.out / "table.md").write_text(table(records))
        print(readme_table(records), end="")
        return 0
    global ROOT
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ROOT = snapshot(args.workdir)
    commit = ROOT.name.removeprefix("src-")
    results_file = args.out / "results.json"
    data = json.loads(results_file.read_text()) if results_file.exists() else {"machine": machine(commit),
                                                                               "combinations": []}
    data["steps"] = {s: TESTS.get(s, s) for s in STEPS}
    empty = args.workdir / "no-constraints.txt"
    empty.write_text("")
    for torch_v in args.torch:
        venv = args.workdir / f"torch-{torch_v}"
        env = pip_env(torch_v, empty)
        if args.wheels:
            env["PIP_FIND_LINKS"] = f"/opt/wheels {args.wheels}"
        python = venv / "bin" / "python"
        logs = args.out / "logs" / f"torch-{torch_v}"
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        setup = run([str(python), "-m", "pip", "install", f"torch=={torch_v}"], logs / "torch_install.log", env)
        for (triton_i, triton_v), (tf_i, tf_v) in itertools.product(enumerate(args.triton),
                                                                    enumerate(args.transformers)):
            steps = planned(args.steps, triton_i, tf_i, len(args.triton), len(args.transformers), args.hf_tests)
            name = f"torch-{torch_v}_triton-{triton_v}_transformers-{tf_v}"
            print(f"[{datetime.datetime.now():%H:%M:%S}] {name}", flush=True)
            if setup["code"] != 0:
                record = {"requested": {"torch": torch_v, "triton": triton_v, "transformers": tf_v},
                          "install": setup, "steps": {s: {"ok": False, "skipped": "torch install failed"}
                                                      for s in steps}}
            else:
                record = combination(python, env, torch_v, triton_v, tf_v, args.out / "logs" / name, steps)
            record["name"] = name
            for step in record["steps"].values():
                step["commit"] = commit
            data = save(results_file, data, record)
            (args.out / "table.md").write_text(table(data["combinations"]))
            print("   ", {s: cell(r) for s, r in record["steps"].items()}, flush=True)
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
