"""``python -m codegen2.train`` and ``torchrun --nproc-per-node N -m codegen2.train``: see cli.py."""

from codegen2.train.cli import main

if __name__ == "__main__":
    main()
