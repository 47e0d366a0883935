"""`python -m sentijax.compare RUN [RUN ...] [--out DIR] [--baseline 0]`: SentiBench runs side by
side with deltas and paired-bootstrap 95% CIs (see sentijax/eval/compare.py)."""
import sys

from sentijax.eval.compare import main

if __name__ == "__main__":
  sys.exit(main())
