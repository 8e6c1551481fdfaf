"""Per-task prompt, stop strings, post-processing and the programs that check a completion.

Each task follows the protocol of the harness its numbers are compared with:
- ``humaneval`` (openai/human-eval): the model continues ``prompt``; the program is
  ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``, 3 s.
- ``humaneval-infill-*`` (openai/human-eval-infilling): the model fills ``Infill(prefix, suffix)`` in its own
  sentinel format and ends at ``<eom>``; the program is ``prefix + middle + suffix + "\\n" + test + ...``, 3 s.
- ``mbpp``, ``mbpp-sanitized`` (bigcode-evaluation-harness ``mbpp``): the prompt from datasets.py; the program is
  ``prompt + completion + "\\n" + asserts``, 3 s.
- ``humaneval-plus`` (EvalPlus): HumanEval's prompt; the checks are plus.py's, base inputs then plus inputs.

Generation-time post-processing (``postprocess``) is what our own generations get: left-to-right completions
are cut at the first stop string (human-eval's Codex convention ``\\ndef``, ``\\nclass``, ``\\nif``, ``\\nprint``,
``\\n#``; MBPP uses bigcode-evaluation-harness's list, which has no ``\\ndef`` so that helpers survive), and
single-line infills after their first newline, keeping it (the reference middles end with it). The official
harnesses score a samples file as given, and so does ``--samples`` unless ``--postprocess`` asks for the cut.

What this is not: no data loading (datasets.py) and no execution (execution.py).
"""

from __future__ import annotations

from codegen2.eval import plus
from codegen2.eval.datasets import SOURCES, Problem
from codegen2.infill import Infill

TASKS = tuple(SOURCES)
HUMANEVAL_STOPS = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]
MBPP_STOPS = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"]
TIMEOUT = 3.0  # seconds per program: human-eval's, human-eval-infilling's and bigcode-evaluation-harness's default
PRELOAD = {"humaneval-plus": ("numpy",)}  # plus.py's checks use numpy: import it once per worker
MEMORY_MB = {"humaneval-plus": 4096}  # EvalPlus's limit; the others' harnesses set none, ours is 2 GB


def is_infill(task: str) -> bool:
    return task.startswith("humaneval-infill")


def is_mbpp(task: str) -> bool:
    return task.startswith("mbpp")


def prompt(task: str, problem: Problem) -> str | Infill:
    return Infill(problem.prompt, problem.suffix or "") if is_infill(task) else problem.prompt


def stops(task: str) -> list[str]:
    """Stop strings for generation (infill tasks stop at <eom>, which the engine adds itself)."""
    return [] if is_infill(task) else MBPP_STOPS if is_mbpp(task) else HUMANEVAL_STOPS


def postprocess(task: str, completion: str) -> str:
    """Cut a raw completion the way generation does; idempotent."""
    if task == "humaneval-infill-single-line":
        end = completion.find("\n")
        return completion if end < 0 else completion[:end + 1]
    cut = len(completion)
    for s in stops(task):
        if (i := completion.find(s)) >= 0:
            cut = min(cut, i)
    return completion[:cut]


def program(task: str, problem: Problem, completion: str) -> str:
    """The one program that checks a completion (every task but humaneval-plus); it passes if it runs to its end."""
    if is_mbpp(task):
        return problem.prompt + completion + "\n" + problem.test + "\n"
    middle = completion + (problem.suffix or "") if is_infill(task) else completion
    return problem.prompt + middle + "\n" + problem.test + "\n" + f"check({problem.entry_point})\n"


def checks(task: str, problem: Problem, completion: str, oracle: dict | None = None,
           timeout: float | None = None) -> list[tuple[str, str, float, str | None]]:
    """(part, program, seconds, stdin file) to run in turn, stopping at the first that does not pass; the sample
    passes if all do. HumanEval+ has a "base" and a "plus" part (``oracle``: plus.oracles' entry for the problem)."""
    if task == "humaneval-plus":
        return [(part, *plus.program(problem, completion, oracle[part])) for part in plus.PARTS]
    return [("", program(task, problem, completion), timeout or TIMEOUT, None)]
