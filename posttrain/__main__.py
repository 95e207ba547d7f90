"""`python -m posttrain` and `torchrun -m posttrain` enter here."""

from posttrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
