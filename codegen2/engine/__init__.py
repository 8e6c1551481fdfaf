"""The generation engine: prompt path, scheduler, runner, sampling, text; see engine.py."""
