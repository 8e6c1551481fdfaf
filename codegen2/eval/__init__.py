"""Evaluation: HumanEval, HumanEval-Infill, MBPP and HumanEval+ through our engine, in a process sandbox.

datasets.py (files, checksums, Problems) -> tasks.py (prompts, stops, programs; plus.py: HumanEval+ checked as
EvalPlus checks it) -> execution.py (the sandbox) -> passk.py (the estimator); run.py ties them to the engine and
the output directory; cli.py is ``codegen2 eval``.
"""
