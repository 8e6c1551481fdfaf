"""``python -m codegen2.train`` and ``torchrun --nproc-per-node N -m codegen2.train``: see loop.py."""

from codegen2.train.loop import main

if __name__ == "__main__":
    main()
