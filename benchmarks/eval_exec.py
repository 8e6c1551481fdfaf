"""Sandbox throughput: our zygote sandbox against the openai/human-eval way, same programs, same run.

    python benchmarks/eval_exec.py                   # all 164 HumanEval canonical solutions, 3 rounds each
    python benchmarks/eval_exec.py --rounds 5 --workers 8 --data /path/to/HumanEval.jsonl.gz

openai/human-eval's ``check_correctness`` (re-implemented here from its description, no code copied): per sample,
a ``multiprocessing.Manager`` list for the result and a new ``multiprocessing.Process`` (a fork of the harness)
that makes a temporary directory, applies its ``reliability_guard`` (rlimits, then deletes os.kill, shutil.rmtree,
subprocess.Popen, ... from the modules) and ``exec``s the program under a SIGALRM timer; the parent joins with
timeout + 1 s and kills the process if it is still alive. Samples run on a thread pool of ``--workers``.

Ours gives each sample a fresh process too, with strictly more isolation (PID, mount and network namespaces, an
unprivileged uid, the whole process tree killed). Prints a table and one JSON line. Both must score 164/164.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import multiprocessing
import os
import platform
import resource
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from codegen2.eval import tasks
from codegen2.eval.datasets import load
from codegen2.eval.execution import Sandbox


class _Timeout(Exception):
    pass


def _guard(memory_bytes: int) -> None:
    """The reliability-guard idea: rlimits plus removing dangerous functions from the modules."""
    import builtins
    import shutil
    import subprocess

    for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        resource.setrlimit(which, (memory_bytes, memory_bytes))
    faulthandler.disable()
    builtins.exit = builtins.quit = None
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None


def _unsafe_execute(program: str, timeout: float, result) -> None:
    with tempfile.TemporaryDirectory() as d:
        rmtree, rmdir, chdir = __import__("shutil").rmtree, os.rmdir, os.chdir
        os.chdir(d)
        _guard(4 << 30)

        def alarm(signum, frame):
            raise _Timeout()

        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                exec(program, {})
            result.append("passed")
        except _Timeout:
            result.append("timed out")
        except BaseException as e:
            result.append(f"failed: {e!r}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        __import__("shutil").rmtree, os.rmdir, os.chdir = rmtree, rmdir, chdir


def openai_style(program: str, timeout: float) -> bool:
    manager = multiprocessing.Manager()
    result = manager.list()
    p = multiprocessing.Process(target=_unsafe_execute, args=(program, timeout, result))
    p.start()
    p.join(timeout=timeout + 1)
    if p.is_alive():
        p.kill()
    ok = bool(result) and result[0] == "passed"
    manager.shutdown()
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="times each canonical solution is run (default 3)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--data", help="HumanEval.jsonl.gz (default: the bundled copy)")
    args = ap.parse_args()
    multiprocessing.set_start_method("fork")  # what human-eval gets on Linux
    problems = load("humaneval", args.data)
    programs = [tasks.program("humaneval", p, p.canonical_solution) for p in problems] * args.rounds

    rows = {}
    t = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        passed = sum(pool.map(lambda prog: openai_style(prog, args.timeout), programs))
    rows["openai-style"] = (time.perf_counter() - t, passed)

    t = time.perf_counter()
    with Sandbox(args.workers) as sandbox, ThreadPoolExecutor(args.workers) as pool:
        mode = sandbox.mode
        passed = sum(r.passed for r in pool.map(lambda prog: sandbox.run(prog, args.timeout), programs))
    rows["codegen2"] = (time.perf_counter() - t, passed)  # zygote start-up included

    n = len(programs)
    print(f"{n} programs ({len(problems)} canonical solutions x {args.rounds}), {args.workers} workers, "
          f"{os.cpu_count()} CPUs, sandbox mode: {mode}")
    print(f"{'harness':<14}{'seconds':>10}{'samples/s':>12}{'passed':>10}")
    for name, (seconds, passed) in rows.items():
        print(f"{name:<14}{seconds:>10.2f}{n / seconds:>12.1f}{passed:>10}")
    ratio = rows["openai-style"][0] / rows["codegen2"][0]
    print(f"speed-up: {ratio:.2f}x")
    print(json.dumps({"benchmark": "eval_exec", "programs": n, "workers": args.workers, "cpus": os.cpu_count(),
                      "mode": mode, "python": platform.python_version(),
                      **{f"{k}_samples_per_s": round(n / v[0], 1) for k, v in rows.items()},
                      **{f"{k}_passed": v[1] for k, v in rows.items()}, "speedup": round(ratio, 2)}))


if __name__ == "__main__":
    main()
