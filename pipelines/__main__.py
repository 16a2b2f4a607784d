import sys

from fedward.pipelines.cli import main

sys.exit(main())
