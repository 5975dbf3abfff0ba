"""`python -m hmamba.eval ARGS`: lm-eval's command line with `--model hmamba` registered and hmamba's offline
tasks (hmamba_lastword, hmamba_arc_easy, hmamba_sonnets; tag hmamba_offline) on the include path."""

import sys

from .harness import lm_eval_main

if __name__ == "__main__":
    sys.exit(lm_eval_main(sys.argv[1:]))
