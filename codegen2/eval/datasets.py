"""The evaluation data sets: where each file comes from, its checksum, and how it becomes a list of ``Problem``.

A file is taken from ``--data`` (the file itself, or a directory holding it under its usual relative path or its
name), else from the copy bundled in ``codegen2/data/eval`` (with its license), else from the cache
``~/.cache/codegen2/data``, downloading it there on first use from its canonical public location. Bundled and
downloaded files are checked against their sha256; a file given with ``--data`` is the user's to vouch for.

What this is not: no prompt formatting beyond MBPP's (tasks.py does the rest) and no harness code from the
source repositories. Notes per set:
- HumanEval-Infill: the upstream harness names the random-span files ``HumanEval-RandomSpan(Light).jsonl.gz``;
  the real files are ``HumanEval-RandomSpanInfilling(Light).jsonl.gz``, which is what we use.
- MBPP: ``mbpp`` is full MBPP's test split (task_ids 11-510, 500 problems, the ``text`` description), what
  bigcode-evaluation-harness's ``mbpp`` task and the leaderboards score; ``mbpp-sanitized`` is the hand-checked
  subset's test split (257 problems, the cleaned-up ``prompt`` and its ``test_imports``). Both get
  bigcode-evaluation-harness's zero-shot prompt: the description and the first assert in a docstring.
- HumanEval+: EvalPlus v0.1.10's main file: per problem the ``base_input`` (HumanEval's) and ``plus_input``
  argument lists and an ``atol``; no expected outputs (plus.py computes them from ``canonical_solution``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "eval"


@dataclass
class Problem:
    task_id: str
    prompt: str  # what the model continues; for infill tasks the prefix
    test: str  # test code run after the solution (HumanEval: defines check(candidate); MBPP: asserts)
    entry_point: str
    canonical_solution: str  # the reference completion (infill: the middle; MBPP: the whole function)
    suffix: str | None = None  # infill tasks only: the code after the hole
    inputs: dict[str, list] | None = None  # HumanEval+ only: "base" and "plus" lists of argument lists
    atol: float = 0.0  # HumanEval+ only: the tolerance for float outputs


@dataclass(frozen=True)
class Source:
    path: str  # relative path in BUNDLED and in the cache
    url: str
    sha256: str


_INFILL = "https://raw.githubusercontent.com/openai/human-eval-infilling/88062ff9859c875d04db115b698ed4b0f0395170/data/"
_MBPP = "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/"
_FILES = {  # task: (relative path, canonical URL, sha256)
    "humaneval": ("humaneval/HumanEval.jsonl.gz",
                  "https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz",
                  "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"),
    "humaneval-infill-single-line": ("humaneval-infill/HumanEval-SingleLineInfilling.jsonl.gz", _INFILL,
                                     "1277073e7ddce163ef68598c2bca777f688a53df99422f097e37362090f88e1f"),
    "humaneval-infill-multi-line": ("humaneval-infill/HumanEval-MultiLineInfilling.jsonl.gz", _INFILL,
                                    "2f341612eee1d35da1357a4f365e0c0b3ba6e2b62eb491e88aaefa4855af0349"),
    "humaneval-infill-random-span": ("humaneval-infill/HumanEval-RandomSpanInfilling.jsonl.gz", _INFILL,
                                     "b4f330d8a8ff97bf85d9def497dffcae4d741e506449386a877236e422e33e8d"),
    "humaneval-infill-random-span-light": ("humaneval-infill/HumanEval-RandomSpanInfillingLight.jsonl.gz", _INFILL,
                                           "1432250ecac0cb56e6f97f8faf0970419ef892a98fda7e1f5aa4c4b87209b760"),
    "mbpp": ("mbpp/mbpp.jsonl", _MBPP, "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"),
    "mbpp-sanitized": ("mbpp/sanitized-mbpp.json", _MBPP,
                       "ca95deaa9a01ef0a6f439f88bcf0dd3db3563d22f22aad6cae04ebb9a8d8c8e9"),
    "humaneval-plus": ("humanevalplus/HumanEvalPlus.jsonl.gz", "https://raw.githubusercontent.com/"
                       "evalplus/humanevalplus_release/200defce9e3429d28ca215b6dd061c0f7f31c18b/",
                       "272720b90ac375502c8ed23cd791c2a93dfb22a911641a494da74a426c09f101"),
}
# A URL ending in "/" is a directory: the file keeps its name there.
SOURCES = {task: Source(path, url + Path(path).name if url.endswith("/") else url, sha)
           for task, (path, url, sha) in _FILES.items()}
MBPP_TEST_IDS = range(11, 511)


class DatasetError(ValueError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "codegen2" / "data"


def locate(task: str, data: str | Path | None = None) -> Path:
    """The local file for ``task``: from ``data``, the bundled copy, or the cache (downloaded if missing)."""
    if task not in SOURCES:
        raise DatasetError(f"unknown task {task!r}; choose one of {', '.join(SOURCES)}")
    source = SOURCES[task]
    if data is not None:
        data = Path(data).expanduser()
        for candidate in (data, data / source.path, data / Path(source.path).name):
            if candidate.is_file():
                return candidate
        raise DatasetError(f"--data {data}: no {Path(source.path).name} there (looked for the file itself, "
                           f"{source.path} and {Path(source.path).name} inside it)")
    for candidate in (BUNDLED / source.path, cache_dir() / source.path):
        if candidate.is_file():
            _verify(candidate, source.sha256)
            return candidate
    return _download(source, cache_dir() / source.path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify(path: Path, sha256: str) -> None:
    if (got := _sha256(path)) != sha256:
        raise DatasetError(f"{path} has sha256 {got}, expected {sha256}; delete it to download it again")


def _download(source: Source, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(source.url, timeout=60) as r:
            tmp.write_bytes(r.read())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"cannot download {source.url} ({e}). Without internet, download that file elsewhere "
                           f"and pass it (or a directory holding it) with --data PATH") from None
    try:
        _verify(tmp, source.sha256)
    except DatasetError:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"{source.url} did not match sha256 {source.sha256}; the upstream file changed") from None
    tmp.replace(dest)
    return dest


def load(task: str, data: str | Path | None = None) -> list[Problem]:
    path = locate(task, data)
    if task == "mbpp-sanitized":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    try:
        if task.startswith("mbpp"):
            return _mbpp(rows, "prompt" if task == "mbpp-sanitized" else "text")
        problems = [Problem(r["task_id"], r["prompt"], r.get("test", "") if task == "humaneval-plus" else r["test"],
                            r["entry_point"], r["canonical_solution"]) for r in rows]  # HumanEval+ needs no test
        for p, r in zip(problems, rows):
            if task.startswith("humaneval-infill"):
                p.suffix = r["suffix"]
            elif task == "humaneval-plus":
                p.inputs, p.atol = {"base": r["base_input"], "plus": r["plus_input"]}, float(r["atol"])
        return problems
    except KeyError as e:
        raise DatasetError(f"{path}: a record has no field {e} (is it the {task} file?)") from None


def _mbpp(rows: list[dict], description: str) -> list[Problem]:
    problems = []
    for r in sorted(rows, key=lambda r: r["task_id"]):
        if r["task_id"] not in MBPP_TEST_IDS:
            continue
        # bigcode-evaluation-harness's zero-shot `mbpp` prompt: the description and the first test in a docstring
        # (the test tells the model the function's name). Its check is the asserts alone: full MBPP's
        # test_setup_code is left out (only task 367 of the test split has one, so no sample passes it there).
        prompt = f'"""\n{r[description]}\n{r["test_list"][0]}\n"""\n'
        called = re.findall(r"(\w+)\s*\(", r["test_list"][0])
        defined = re.findall(r"^def\s+(\w+)", r["code"], re.M)
        entry = next((name for name in called if name in defined), defined[0] if defined else "")
        test = "\n".join(r.get("test_imports", []) + r["test_list"])
        problems.append(Problem(f"Mbpp/{r['task_id']}", prompt, test, entry, r["code"]))
    return problems
