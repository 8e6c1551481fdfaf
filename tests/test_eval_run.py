"""`codegen2 eval` end to end: scoring a samples file, resuming, and generating with a tiny random model."""

from __future__ import annotations

import json

import pytest

from codegen2.eval import run as ev
from codegen2.eval import tasks
from codegen2.eval.cli import main
from codegen2.eval.datasets import load
from codegen2.eval.execution import STATUSES, Sandbox


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class CountingSandbox(Sandbox):
    runs = 0

    def run(self, program, timeout=None, stdin=None):
        CountingSandbox.runs += 1
        return super().run(program, timeout, stdin)


def test_score_samples_file_and_resume(tmp_path, monkeypatch, capsys):
    problems = load("humaneval")[:3]
    rows = []
    for p in problems:  # two correct samples and one empty one per problem: pass@1 = 2/3 exactly
        rows += [{"task_id": p.task_id, "completion": p.canonical_solution + "\ndef extra():\n    pass\n"},
                 {"task_id": p.task_id, "completion": p.canonical_solution}, {"task_id": p.task_id, "completion": ""}]
    samples, out = tmp_path / "samples.jsonl", tmp_path / "out"
    write_samples(samples, rows)
    argv = ["eval", "humaneval", "--samples", str(samples), "--out", str(out), "--workers", "2"]
    main(argv)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@1"] == pytest.approx(2 / 3) and "pass@10" not in summary
    assert summary["problems"] == 3 and summary["samples"] == 9
    assert summary["results"] == {"passed": 6, "failed": 3, "timeout": 0, "crashed": 0}
    results = lines(out / "results.jsonl")
    assert sorted((r["task_id"], r["sample"]) for r in results) == sorted((p.task_id, i) for p in problems
                                                                          for i in range(3))
    assert all(set(r) == {"task_id", "sample", "completion", "result", "error"} for r in results)
    assert "| humaneval | 3 | 3 | 66.67 |" in (out / "summary.md").read_text()
    assert '"pass@1": 0.6666' in capsys.readouterr().out

    # Interrupted run: two results lost and a half-written line. The re-run executes exactly those two.
    kept = (out / "results.jsonl").read_text().splitlines()[:-2]
    (out / "results.jsonl").write_text("\n".join(kept) + '\n{"task_id": "HumanEval/0", "sam')
    monkeypatch.setattr(ev, "Sandbox", CountingSandbox)
    CountingSandbox.runs = 0
    main(argv)
    assert CountingSandbox.runs == 2
    assert json.loads((out / "summary.json").read_text())["pass@1"] == pytest.approx(2 / 3)
    main(argv)  # nothing left to do: no sandbox at all
    assert CountingSandbox.runs == 2

    write_samples(samples, rows[:3])  # another samples file into the same directory is refused
    with pytest.raises(SystemExit, match="other settings"):
        main(argv)


@pytest.mark.parametrize("line, message", [
    ('{"task_id": "HumanEval/9999", "completion": ""}', "s.jsonl:2: task_id 'HumanEval/9999' is not a humaneval"),
    ('{"task_id": "HumanEval/0"}', "s.jsonl:2: no completion string"),
    ('{"task_id": "HumanEval/0", "completion": 7}', "s.jsonl:2: no completion string"),
    ('{"task_id": "HumanEval/0", "compl', "s.jsonl:2: not a JSON line"),
    ('["HumanEval/0"]', "s.jsonl:2: task_id"),
])
def test_bad_samples_are_refused_naming_the_line(tmp_path, line, message):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": ""}\n' + line + "\n")
    with pytest.raises(SystemExit, match=message):
        main(["eval", "humaneval", "--samples", str(samples), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("argv, message", [
    (["humaneval", "--model", "M", "--postprocess"], "--postprocess applies to --samples"),
    (["humaneval-plus", "--samples", "S", "--timeout", "5"], "humaneval-plus takes none"),
    (["humaneval", "--samples", "S", "--timeout", "0"], "--timeout must be positive"),
])
def test_contradictory_options_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["eval", *argv])


@pytest.mark.parametrize("k", ["0", "1,x", "", "-1"])
def test_bad_k_is_refused(k, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "humaneval", "--samples", "S", "--k", k])
    assert "positive integers" in capsys.readouterr().err


def test_samples_are_scored_as_given_unless_postprocess(tmp_path):
    """A helper defined after the function is part of the sample, as in human-eval: it passes as given and fails
    only when --postprocess cuts the completion at the generation stop string "\ndef" (NameError)."""
    p = load("humaneval")[2]  # truncate_number(number) -> number % 1.0
    helper = "    return _fraction(number)\n\n\ndef _fraction(x):\n    return x % 1.0\n"
    samples, rows = tmp_path / "s.jsonl", [{"task_id": p.task_id, "completion": helper}] * 5
    write_samples(samples, rows)
    base = ["eval", "humaneval", "--samples", str(samples), "--limit", "3", "--workers", "2", "--k", "1,2,5,9"]
    main(base + ["--out", str(tmp_path / "given")])
    given = json.loads((tmp_path / "given" / "summary.json").read_text())
    assert given["pass@1"] == 1.0 and given["pass@5"] == 1.0 and "pass@9" not in given  # k <= n = 5 only
    assert given["postprocess"] is False
    assert all(r["completion"] == helper for r in lines(tmp_path / "given" / "results.jsonl"))
    main(base + ["--out", str(tmp_path / "cut"), "--postprocess"])
    cut = lines(tmp_path / "cut" / "results.jsonl")
    assert {r["completion"] for r in cut} == {"    return _fraction(number)\n\n"}
    assert all(r["result"] == "failed" and "NameError" in r["error"] for r in cut)
    assert "| pass@1 | pass@2 | pass@5 |" in (tmp_path / "cut" / "summary.md").read_text()


def test_humaneval_plus_reports_base_and_plus(tmp_path, monkeypatch):
    """HumanEval/39 (prime_fib): HumanEval's own reference tests primality by trial division up to the square root,
    EvalPlus's faster. HumanEval's passes the base inputs (n <= 10) and fails the plus ones: n = 12 is
    99,194,853,094,755,497, some 3e8 divisions (~20 s), far over the 1 s limit; an empty completion fails both.
    pass@1: base 2/3, plus 1/3."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    plus_problem = next(p for p in load("humaneval-plus") if p.task_id == "HumanEval/39")
    assert plus_problem.inputs == {"base": [[n] for n in range(1, 11)], "plus": [[11], [12]]}
    human = next(p for p in load("humaneval") if p.task_id == "HumanEval/39")
    samples = tmp_path / "s.jsonl"
    write_samples(samples, [{"task_id": "HumanEval/39", "completion": c}
                            for c in (plus_problem.canonical_solution, human.canonical_solution, "")])
    main(["eval", "humaneval-plus", "--samples", str(samples), "--out", str(tmp_path / "out"), "--workers", "2"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pass@1"] == pytest.approx(1 / 3) and summary["base_pass@1"] == pytest.approx(2 / 3)
    results = sorted(lines(tmp_path / "out" / "results.jsonl"), key=lambda r: r["sample"])
    assert [(r["base_result"], r["result"]) for r in results] == [("passed", "passed"), ("passed", "failed"),
                                                                  ("failed", "failed")]
    assert results[1]["error"].startswith("plus: AssertionError: input 2 of 2: Timeout: over the 1 s limit")
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| humaneval-plus (base + plus tests) | 1 | 3 | 33.33 |" in table
    assert "| humaneval-plus (base tests) | 1 | 3 | 66.67 |" in table


def test_generate_with_tiny_model(codegen_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["eval", "humaneval", "--model", str(codegen_dir), "--limit", "2", "--n-samples", "2",
            "--max-tokens", "16", "--temperature", "0.8", "--dtype", "fp32", "--device", "cpu", "--workers", "2",
            "--out", str(out)]
    main(argv)
    assert {f.name for f in out.iterdir()} == {"config.json", "samples.jsonl", "results.jsonl", "summary.json",
                                               "summary.md"}
    samples, results = lines(out / "samples.jsonl"), lines(out / "results.jsonl")
    problems = {p.task_id: p for p in load("humaneval")[:2]}
    assert sorted((s["task_id"], s["sample"]) for s in samples) == sorted((t, i) for t in problems for i in range(2))
    assert all(r["result"] in STATUSES for r in results) and len(results) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 2 and summary["samples"] == 4 and "pass@1" in summary

    # The results agree with executing the completions ourselves.
    with Sandbox(2) as sb:
        for r in results:
            mine = sb.run(tasks.program("humaneval", problems[r["task_id"]], r["completion"]))
            assert mine.status == r["result"], (r, mine)
            assert tasks.postprocess("humaneval", r["completion"]) == r["completion"]

    # Resume: a lost sample is generated again, identically (its seed depends only on seed, problem and index).
    lost = samples[-1]
    write_samples(out / "samples.jsonl", samples[:-1])
    write_samples(out / "results.jsonl", [r for r in results if (r["task_id"], r["sample"]) !=
                                          (lost["task_id"], lost["sample"])])
    main(argv)
    again = lines(out / "samples.jsonl")
    assert len(again) == 4 and again[-1] == lost
    assert len(lines(out / "results.jsonl")) == 4

    with pytest.raises(SystemExit, match="other settings"):
        main(argv[:-2] + ["--out", str(out), "--seed", "1"])
    other = tmp_path / "seed1"
    main(argv[:-2] + ["--out", str(other), "--seed", "1"])
    assert [s["completion"] for s in lines(other / "samples.jsonl")] != [s["completion"] for s in again]
