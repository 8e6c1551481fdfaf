"""HumanEval+ scored by EvalPlus's rules (data v0.1.10): differential testing against the reference solution.

EvalPlus stores inputs, not outputs: the expected output of an input is what ``prompt + canonical_solution``
returns for it (called on a deep copy), and the reference's time there sets the candidate's limit: max(1 s, 4 x).
Both are measured once on this machine in a plain subprocess (trusted code from a checksummed file; EvalPlus runs
it in its own process) and cached per problem and part under ``~/.cache/codegen2/data/humanevalplus/`` (~250 MB:
HumanEval/15 returns strings of a million numbers), a file that becomes the checking sample's stdin. A sample is
checked on the base inputs (HumanEval's tests), then on the plus inputs, each in a fresh sandboxed process of at
most min(60 s, sum of its limits) + 2 s and 4 GB: ``prompt + completion`` runs in an empty namespace, then the
function on each input in turn; the first input that raises, runs over its limit or gives a wrong output fails
the part. Right means equal; failing that, with a non-zero ``atol`` (raised to 1e-6 for good once a float output
meets atol 0), the same type (and length, for sequences) and ``numpy.allclose(out, exp, rtol=1e-7, atol=atol)``;
for ``find_zero`` (HumanEval/32), |poly(xs, out)| <= atol. Reported: base pass@k, and plus pass@k (both parts).
This follows EvalPlus's current code: its 0.3.1 release (PyPI) fails every HumanEval/32 sample, its find_zero
branch skipping the mark that an input passed.

What this is not: no EvalPlus code (the rules above are re-implemented), no MBPP+ and no sandbox (execution.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codegen2.eval.datasets import Problem

PARTS = ("base", "plus")
MIN_LIMIT, FACTOR, MAX_SECONDS = 1.0, 4.0, 60.0  # per-input limit max(1 s, 4 x reference); per process <= 60 s


def oracles(problems: list[Problem]) -> dict[str, dict[str, tuple[str, list[float]]]]:
    """Per problem and part: the cached file of its inputs and expected outputs, and the reference's seconds."""
    from codegen2.eval.datasets import DatasetError, cache_dir

    folder = cache_dir() / "humanevalplus" / f"py{sys.version_info.major}{sys.version_info.minor}"
    paths = {p.task_id: {part: folder / f"{_key(p)}.{part}.pkl" for part in PARTS} for p in problems}
    missing = [p for p in problems if not all(path.is_file() for path in paths[p.task_id].values())]
    if missing:
        print(f"HumanEval+: running the reference solutions of {len(missing)} problems once, for their expected "
              f"outputs and times (cached in {folder})", file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(p.prompt + p.canonical_solution, p.entry_point, p.inputs,
                 {part: str(path) for part, path in paths[p.task_id].items()}) for p in missing]
        run = subprocess.run([sys.executable, "-I", os.path.abspath(__file__)], input=pickle.dumps(jobs),
                             capture_output=True)
        if run.returncode != 0:
            raise DatasetError(f"the HumanEval+ reference solutions failed: {run.stderr.decode()[-2000:]}")
    return {task_id: {part: (str(path), _seconds(path)) for part, path in parts.items()}
            for task_id, parts in paths.items()}


def _seconds(path: Path) -> list[float]:
    with path.open("rb") as f:
        return pickle.load(f)  # the first of the file's two pickles: (seconds, then inputs and expected outputs)


def program(problem: Problem, completion: str, oracle: tuple[str, list[float]]) -> tuple[str, float, str]:
    """The program checking ``completion`` on one part's inputs, its time limit in seconds and its stdin file."""
    path, seconds = oracle
    limits = [max(MIN_LIMIT, FACTOR * t) for t in seconds]
    args = (problem.prompt + completion, problem.entry_point, limits, problem.atol, problem.entry_point == "find_zero")
    return f"{_HARNESS}\n_check{args!r}\n", min(MAX_SECONDS, sum(limits)) + 2.0, path


def _key(p: Problem) -> str:
    """The cache key: everything the reference's outputs and times depend on."""
    text = json.dumps([p.prompt, p.canonical_solution, p.entry_point, p.inputs])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# Runs in the sandbox after nothing else: the solution gets its own namespace, so it cannot shadow these names.
_HARNESS = '''
def _check(solution, entry_point, limits, atol, find_zero):
    import io, math, pickle, reprlib, signal, sys
    import numpy as np

    data = io.BytesIO(sys.stdin.buffer.read())  # read to its end: the solution's own reads of stdin find nothing
    _, (inputs, expected) = pickle.load(data), pickle.load(data)

    class Timeout(Exception):  # an Exception, as EvalPlus's: a solution catching Exception may swallow it
        pass

    def alarm(signum, frame):
        raise Timeout(f"over the {limit:g} s limit")

    def floats(x):
        if isinstance(x, (list, tuple)):
            return bool(x) and all(isinstance(v, float) for v in x)
        return isinstance(x, float) or isinstance(x, np.ndarray) and x.dtype in (np.float64, np.float32)

    def right(out, exp, inp):
        equal = out == exp
        if find_zero:
            return abs(sum(c * math.pow(out, i) for i, c in enumerate(inp[0]))) <= atol
        if equal or atol == 0:
            return bool(equal)
        if type(out) is not type(exp) or isinstance(exp, (list, tuple)) and len(out) != len(exp):
            return False
        return bool(np.allclose(out, exp, rtol=1e-07, atol=atol))

    namespace = {}
    exec(compile(solution, "<solution>", "exec"), namespace)
    fn = namespace[entry_point]
    signal.signal(signal.SIGALRM, alarm)
    for i, (inp, exp, limit) in enumerate(zip(inputs, expected, limits)):
        message = None
        try:
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                out = fn(*inp)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if atol == 0 and floats(exp) and not find_zero:
                atol = 1e-6  # for this input and every later one, as in EvalPlus
            if not right(out, exp, inp):
                message = f"wrong output {reprlib.repr(out)}"
        except BaseException as e:
            message = f"{type(e).__name__}: {e}"
        if message is not None:
            raise AssertionError(f"input {i + 1} of {len(inputs)}: {message}"[:500])  # the first failing input
'''


def _reference_main() -> None:
    """Subprocess entry: pickled jobs on stdin; writes each part's file: seconds per input, then (inputs, expected
    outputs). Each part gets a fresh namespace, as in EvalPlus; each call a deep copy of its arguments."""
    jobs = pickle.load(sys.stdin.buffer)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the references print goes nowhere
    for code, entry_point, inputs, paths in jobs:
        for part, path in paths.items():
            namespace: dict = {}
            exec(code, namespace)
            fn, outputs, seconds = namespace[entry_point], [], []
            for args in inputs[part]:
                args = copy.deepcopy(args)
                start = time.perf_counter()
                outputs.append(fn(*args))
                seconds.append(time.perf_counter() - start)
            tmp = f"{path}.part{os.getpid()}"
            with open(tmp, "wb") as f:
                pickle.dump(seconds, f)
                pickle.dump((inputs[part], outputs), f)
            os.replace(tmp, path)  # atomic: a concurrent run sees no file or the whole file


if __name__ == "__main__":
    _reference_main()
