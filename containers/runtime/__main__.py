"""`python -m containers.runtime`: the runtime container's entry point."""

import sys

from containers.runtime.process import main

# vLLM spawns processes that re-import the main module: only the parent may serve.
if __name__ == "__main__":
    sys.exit(main())
