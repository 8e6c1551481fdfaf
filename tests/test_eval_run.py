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

    def run(self, program, timeout=None):
        CountingSandbox.runs += 1
        return super().run(program, timeout)


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


def test_samples_with_unknown_task_id(tmp_path):
    samples = tmp_path / "s.jsonl"
    write_samples(samples, [{"task_id": "HumanEval/9999", "completion": ""}])
    with pytest.raises(SystemExit, match="HumanEval/9999"):
        main(["eval", "humaneval", "--samples", str(samples), "--out", str(tmp_path / "out")])


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
