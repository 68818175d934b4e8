"""python -m benchmarks: see benchmarks/harness.py (benchmarks/run runs this as root)."""
import sys

from .harness import main

sys.exit(main())
