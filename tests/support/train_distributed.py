"""Under torchrun: join one gloo process group, then run `softvq-fast` once per argument list of
the JSON file (the trainer uses the group it finds; torch cannot start a second default group
in one torchrun process).

    torchrun --nproc_per_node 2 tests/support/train_distributed.py RUNS.json
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from softvq_fast import cli


def main() -> None:
    dist.init_process_group("gloo")
    try:
        for argv in json.loads(Path(sys.argv[1]).read_text()):
            cli.main(argv)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
