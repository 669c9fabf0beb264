import sys

from regbench.workflow.cli import main

sys.exit(main())
