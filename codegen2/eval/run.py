"""An evaluation run: generate samples with our engine (or read them from a file), execute them, report pass@k.

Everything lives in one output directory, so a run that is interrupted resumes where it stopped:

    config.json     the settings the samples were made with (a re-run with other settings is refused)
    samples.jsonl   one line per generated sample: task_id, sample (0..n-1), completion (post-processed)
    results.jsonl   one line per executed sample: task_id, sample, completion, result, error
                    (humaneval-plus: result is the HumanEval+ verdict, base and plus inputs; base_result the base's)
    summary.json    pass@k, status counts, settings;  summary.md: the same as a Markdown table

Sample ``i`` of the problem at index ``t`` is drawn with seed ``seed * 10**9 + t * 10**5 + i`` (the engine seeds
sample ``i`` of a request with ``params.seed + i``), so the same seed gives the same samples however the run is
split, batched or resumed. What this is not: no prompt logic (tasks.py) and no sandboxing (execution.py).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from codegen2.eval import plus, tasks
from codegen2.eval.datasets import Problem
from codegen2.eval.execution import STATUSES, Limits, Sandbox
from codegen2.eval.passk import estimate

if TYPE_CHECKING:
    from codegen2.engine.engine import Engine

CHUNK = 16  # samples per engine request: one prompt prefill shared by up to this many samples


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by an interrupted run; it is simply redone
            pass
    return rows


def open_append(path: Path):
    """Open a JSONL file for appending, first dropping a line an interrupted run left half-written."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return path.open("a", encoding="utf-8")


def check_config(out: Path, config: dict) -> None:
    """Write config.json, or make sure the samples already in ``out`` were made with the same settings."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != config:
            diff = {k: (old.get(k), config.get(k)) for k in set(old) | set(config) if old.get(k) != config.get(k)}
            raise ValueError(f"{out} holds a run with other settings {diff} (old, new); use another --out")
    else:
        path.write_text(json.dumps(config, indent=1) + "\n")


def sample_seed(seed: int, task_index: int, sample: int) -> int:
    return seed * 10**9 + task_index * 10**5 + sample


def generate(task: str, problems: list[Problem], engine: Engine, out: Path, n: int, max_tokens: int,
             temperature: float, top_p: float, seed: int) -> list[dict]:
    """Generate the samples missing from ``out/samples.jsonl``; return all of them."""
    from codegen2.engine.sampling import SamplingParams

    path = out / "samples.jsonl"
    have = {(r["task_id"], r["sample"]) for r in read_jsonl(path)}
    pending: dict[str, tuple[Problem, int]] = {}
    wanted = {(p.task_id, i) for p in problems for i in range(n)}
    bar = tqdm(total=len(wanted), initial=len(wanted & have), desc=f"generate {task}", unit="sample")
    with open_append(path) as f:
        def write(problem: Problem, start: int, completions: Iterable[str], error: str = "") -> None:
            for i, text in enumerate(completions):
                record = {"task_id": problem.task_id, "sample": start + i, "completion": text}
                f.write(json.dumps(record | ({"error": error} if error else {})) + "\n")
                bar.update(1)
            f.flush()

        for t, problem in enumerate(problems):
            missing = [i for i in range(n) if (problem.task_id, i) not in have]
            runs: list[list[int]] = []  # consecutive missing indices, at most CHUNK per request
            for i in missing:
                if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < CHUNK:
                    runs[-1].append(i)
                else:
                    runs.append([i])
            for run in runs:
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=len(run),
                                        seed=sample_seed(seed, t, run[0]), stop=tasks.stops(task))
                try:
                    pending[engine.add_request(tasks.prompt(task, problem), params)] = (problem, run[0])
                except ValueError as e:  # e.g. a prompt longer than the model's context: these samples fail
                    write(problem, run[0], [""] * len(run), error=str(e))
        texts: dict[str, dict[int, str]] = {}  # request id -> completion index -> text so far
        while engine.has_unfinished():
            for output in engine.step():  # deltas: each completion's new text
                so_far = texts.setdefault(output.request_id, {})
                for o in output.outputs:
                    so_far[o.index] = so_far.get(o.index, "") + o.text
                if output.finished and output.request_id in pending:
                    problem, start = pending.pop(output.request_id)
                    done = texts.pop(output.request_id)
                    write(problem, start, [tasks.postprocess(task, done[i]) for i in sorted(done)])
    bar.close()
    return [r for r in read_jsonl(path) if (r["task_id"], r["sample"]) in wanted]


def read_samples(task: str, path: Path, problems: list[Problem], postprocess: bool = False) -> list[dict]:
    """Samples made elsewhere (human-eval format: task_id and completion per line), numbered per task in order.
    Scored as given, as the official harnesses do; ``postprocess`` applies the generation-time cut first."""
    known, counts, samples = {p.task_id for p in problems}, Counter(), []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON line ({e})") from None
        if not isinstance(row, dict) or row.get("task_id") not in known:
            raise ValueError(f"{path}:{number}: task_id {row.get('task_id') if isinstance(row, dict) else row!r} "
                             f"is not a {task} problem (or is cut off by --limit)")
        if not isinstance(row.get("completion"), str):
            raise ValueError(f"{path}:{number}: no completion string (each line needs task_id and completion)")
        completion = tasks.postprocess(task, row["completion"]) if postprocess else row["completion"]
        samples.append({"task_id": row["task_id"], "sample": counts[row["task_id"]], "completion": completion})
        counts[row["task_id"]] += 1
    if not samples:
        raise ValueError(f"{path} holds no samples (JSON lines with task_id and completion)")
    return samples


def execute(task: str, problems: list[Problem], samples: list[dict], out: Path, workers: int | None,
            timeout: float | None = None) -> tuple[list[dict], str]:
    """Execute the samples missing from ``out/results.jsonl``; return all results and the sandbox mode."""
    path = out / "results.jsonl"
    done = {(r["task_id"], r["sample"]): r for r in read_jsonl(path)}
    todo = [s for s in samples if (s["task_id"], s["sample"]) not in done]
    by_id = {p.task_id: p for p in problems}
    mode = "none needed (resumed)"
    if todo:
        oracles = plus.oracles([by_id[t] for t in sorted({s["task_id"] for s in todo})]) \
            if task == "humaneval-plus" else {}
        limits = Limits(memory_mb=tasks.MEMORY_MB.get(task, Limits.memory_mb))
        with Sandbox(workers, limits, preload=tasks.PRELOAD.get(task, ())) as sandbox, \
                ThreadPoolExecutor(sandbox.workers) as pool, open_append(path) as f:
            mode = sandbox.mode

            def check(s: dict) -> dict:
                record = {"task_id": s["task_id"], "sample": s["sample"], "completion": s["completion"]}
                for part, program, seconds, stdin in tasks.checks(task, by_id[s["task_id"]], s["completion"],
                                                                  oracles.get(s["task_id"]), timeout):
                    result = sandbox.run(program, seconds, stdin)
                    error = f"{part}: {result.error}" if part and result.error else result.error
                    record |= {"result": result.status, "error": error}
                    if part == "base":
                        record["base_result"] = result.status
                    if not result.passed:
                        break
                return record

            for future in tqdm(as_completed([pool.submit(check, s) for s in todo]), total=len(todo),
                               desc=f"execute {task}", unit="sample"):
                record = future.result()
                f.write(json.dumps(record) + "\n")
                f.flush()
                done[(record["task_id"], record["sample"])] = record
    wanted = {(s["task_id"], s["sample"]) for s in samples}
    return [r for key, r in sorted(done.items(), key=lambda kv: (kv[0][0], kv[0][1])) if key in wanted], mode


def summarize(task: str, problems: list[Problem], results: list[dict], out: Path, settings: dict,
              ks: Iterable[int] = (1, 10, 100)) -> dict:
    """pass@k for each k <= n over the problems that have samples; writes summary.json and summary.md.
    HumanEval+ has EvalPlus's two figures: pass@k on base and plus inputs, base_pass@k on the base inputs."""
    n = Counter(r["task_id"] for r in results)
    order = [p.task_id for p in problems if p.task_id in n]
    rows = {"": (task, "result")}  # metric prefix: (row name, the field that says passed)
    if task == "humaneval-plus":
        rows = {"": (f"{task} (base + plus tests)", "result"), "base_": (f"{task} (base tests)", "base_result")}
    metrics = {}
    for prefix, (_, field) in rows.items():
        c = Counter(r["task_id"] for r in results if r.get(field) == "passed")
        metrics |= {prefix + k: v for k, v in estimate(((n[t], c[t]) for t in order), ks).items()}
    statuses, per_problem = Counter(r["result"] for r in results), "/".join(map(str, sorted(set(n.values()))))
    summary = {"task": task, "problems": len(order), "samples": len(results),
               "samples_per_problem": sorted(set(n.values())), **metrics,
               "results": {s: statuses.get(s, 0) for s in STATUSES}, **settings}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    ks = [k for k in metrics if not k.startswith("base_")]
    table = [f"| task | problems | samples/problem | {' | '.join(ks)} |", "|---|---:|---:|" + "---:|" * len(ks)]
    table += [f"| {name} | {len(order)} | {per_problem} | " + " | ".join(f"{100 * metrics[prefix + k]:.2f}"
                                                                       for k in ks) + " |"
              for prefix, (name, _) in rows.items()]
    table += ["", "Results: " + ", ".join(f"{s} {v}" for s, v in summary["results"].items())
              + f". Sandbox: {settings.get('sandbox')}.", ""]
    (out / "summary.md").write_text("\n".join(table))
    return summary


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
