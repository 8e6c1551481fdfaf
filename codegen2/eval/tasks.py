"""Per-task prompt, stop strings, post-processing and the program that checks a completion.

Left-to-right tasks follow the Codex / human-eval convention: the model continues ``prompt`` and the completion
is cut at the first top-level ``\\ndef``, ``\\nclass``, ``\\nif``, ``\\nprint`` or ``\\n#``. MBPP uses
bigcode-evaluation-harness's stop strings (no ``\\ndef``: solutions may need helper functions). Infill tasks send
``Infill(prefix, suffix)``, which the engine turns into the model's own sentinel format and ends at ``<eom>``;
single-line infills are cut after their first newline, keeping it (the reference middles end with it).

What this is not: no data loading (datasets.py) and no execution (execution.py).
"""

from __future__ import annotations

from codegen2.eval.datasets import SOURCES, Problem
from codegen2.infill import Infill

TASKS = tuple(SOURCES)
HUMANEVAL_STOPS = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]
MBPP_STOPS = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"]
# Seconds per program: 3 as in human-eval, HumanEval+ more since its checks run hundreds of inputs. A few reference
# solutions are slow by nature (HumanEval+/139 computes special factorials of ~500 twice per input, Mbpp/123 sums
# amicable numbers below 10,000): their problems get SLOW times the task's timeout, so references always pass.
TIMEOUTS = {"humaneval-plus": 20.0}
SLOW = {("humaneval-plus", "HumanEval/139"): 4, ("mbpp", "Mbpp/123"): 4}
PRELOAD = {"humaneval-plus": ("numpy",)}  # every HumanEval+ check imports numpy: import it once per worker


def timeout(task: str, task_id: str, base: float | None = None) -> float:
    return (base or TIMEOUTS.get(task, 3.0)) * SLOW.get((task, task_id), 1)


def is_infill(task: str) -> bool:
    return task.startswith("humaneval-infill")


def prompt(task: str, problem: Problem) -> str | Infill:
    return Infill(problem.prompt, problem.suffix or "") if is_infill(task) else problem.prompt


def stops(task: str) -> list[str]:
    """Stop strings for generation (infill tasks stop at <eom>, which the engine adds itself)."""
    return [] if is_infill(task) else MBPP_STOPS if task == "mbpp" else HUMANEVAL_STOPS


def postprocess(task: str, completion: str) -> str:
    """Cut a raw completion the way generation would have; idempotent, so it also cleans --samples files."""
    if task == "humaneval-infill-single-line":
        end = completion.find("\n")
        return completion if end < 0 else completion[:end + 1]
    cut = len(completion)
    for s in stops(task):
        if (i := completion.find(s)) >= 0:
            cut = min(cut, i)
    return completion[:cut]


def program(task: str, problem: Problem, completion: str) -> str:
    """The whole program run in the sandbox; it passes if it runs to its end."""
    if task == "mbpp":
        return problem.prompt + completion + "\n" + problem.test + "\n"
    middle = completion + (problem.suffix or "") if is_infill(task) else completion
    return problem.prompt + middle + "\n" + problem.test + "\n" + f"check({problem.entry_point})\n"
