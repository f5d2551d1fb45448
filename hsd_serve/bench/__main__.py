import sys

from hsd_serve.bench.cli import main

sys.exit(main())
