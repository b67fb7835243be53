"""One training process of several, as `accelerate launch` starts it (loraflow/training/distributed.py):

    python -m loraflow.training.worker <step dir>/worker_inputs.json

It trains with `train_here`, the function in-process training runs; rank 0 writes the result for the launcher.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from loraflow.env import configure_environment

configure_environment()  # an entry point like the CLI's: before the libraries load and log their notices

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from loraflow.training.distributed import RESULT_FILE, WorkerInputs  # noqa: E402
from loraflow.training.train import train_here  # noqa: E402

LAUNCHER_POLL_S = 1.0


def exit_with_launcher() -> None:
    """torchrun starts each worker in a session of its own: a launcher killed outright (a crashed flow run) would
    leave its workers training on, racing the retry over the checkpoints. A worker whose launcher is gone exits."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(LAUNCHER_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


@record  # a failure's message and traceback go to torchrun's summary of failed ranks, which the launcher logs
def main(inputs_file: str) -> None:
    exit_with_launcher()
    logging.basicConfig(level=logging.INFO, format=f"rank {os.environ.get('RANK', '0')}: %(name)s: %(message)s")
    inputs = WorkerInputs.model_validate_json(Path(inputs_file).read_text())
    out_dir = Path(inputs.out_dir)
    result = train_here(inputs.chat, inputs.model, inputs.lora, inputs.quant, inputs.training, out_dir,
                        inputs.key, inputs.tracking, inputs.parent)
    if result is not None:
        tmp = out_dir / f".{RESULT_FILE}"
        tmp.write_text(result.model_dump_json(indent=2))
        tmp.replace(out_dir / RESULT_FILE)  # whole or absent: the launcher reads it after every worker exited


if __name__ == "__main__":
    main(*sys.argv[1:])
