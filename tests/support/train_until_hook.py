"""Run a trainer on the run described by a JSON file, and after step HANG_STEP (its checkpoint, if
any, written) write MARKER and wait to be killed.

    python tests/support/train_until_hook.py generator|tokenizer RUN.json HANG_STEP MARKER

generator: RUN.json holds GeneratorTrainingConfig fields; tokenizer: {"source", "losses",
"settings"}, the arguments of read_training_config.
"""
import json
import sys
import time
from pathlib import Path


def main() -> None:
    trainer, run = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    hang_step, marker = int(sys.argv[3]), Path(sys.argv[4])

    def hang(step: int) -> None:
        if step == hang_step:
            marker.write_text(str(step))
            time.sleep(600)

    if trainer == "generator":
        from softvq_fast.training.generator import GeneratorTrainingConfig, train_generator

        train_generator(GeneratorTrainingConfig(**run), hooks=[hang])
    else:
        from softvq_fast.training.tokenizer import read_training_config, train_tokenizer

        train_tokenizer(read_training_config(run["source"], losses=run.get("losses"), **run["settings"]), hooks=[hang])


if __name__ == "__main__":
    main()
