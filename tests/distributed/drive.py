"""Run several posttrain command lines in one (torchrun) process group: `drive.py JOBS.json`.

Each job is the argument list of one `posttrain ...` command; starting the
processes once for all of them keeps the distributed tests short.
"""

from __future__ import annotations

import json
import sys

from posttrain import cli, distributed

if __name__ == "__main__":
    jobs = json.loads(open(sys.argv[1]).read())
    with distributed.process_group():
        for argv in jobs:
            code = cli.main(argv)
            if code:
                sys.exit(code)
