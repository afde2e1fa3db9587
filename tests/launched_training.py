"""`train_student` as one process of an `accelerate launch`, logging which rows this process trained on.

    launched_training.py CACHE STUDENT_CONFIG OUT LOG SETTINGS_JSON

Appends "epoch sample_id" lines to LOG.rank<N> through the `on_batch` hook, so tests can check that
the processes share each epoch's rows exactly.
"""

import json
import os
import sys

from kdcache import TrainHooks, TrainSettings, train_student

cache, student_config, out, log, settings = sys.argv[1:]
with open(f"{log}.rank{os.environ['RANK']}", "a") as trained:  # set by the torchrun launcher
    train_student(cache, out, student_config=student_config, progress=False,
                  settings=TrainSettings(**json.loads(settings)),
                  hooks=TrainHooks(on_batch=lambda epoch, ids: trained.writelines(f"{epoch} {i}\n" for i in ids)))
