"""Run `train_generator` from a JSON file of GeneratorTrainingConfig fields, and after step
HANG_STEP (its checkpoint, if any, written) write MARKER and wait to be killed.

    python tests/support/train_until_hook.py CONFIG.json HANG_STEP MARKER
"""
import json
import sys
import time
from pathlib import Path

from softvq_fast.training.generator import GeneratorTrainingConfig, train_generator


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    hang_step, marker = int(sys.argv[2]), Path(sys.argv[3])

    def hang(step: int) -> None:
        if step == hang_step:
            marker.write_text(str(step))
            time.sleep(600)

    train_generator(GeneratorTrainingConfig(**settings), hooks=[hang])


if __name__ == "__main__":
    main()
