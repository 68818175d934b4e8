"""``python -m pbs_chroot``: the admin CLI."""
import sys

from .admin import main

sys.exit(main())
