"""Run by tests/train/test_distributed.py under torchrun: train the stand-in model, print losses as JSON."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kimi_linear.train.config import TrainConfig  # noqa: E402
from kimi_linear.train.trainer import train  # noqa: E402
from tests.train.stand_in import stand_in_factory  # noqa: E402

cfg = TrainConfig(**json.loads(sys.argv[1]))
real = len(sys.argv) > 2 and sys.argv[2] == "real"  # the real KimiLinearForCausalLM instead of the stand-in
result = train(cfg, model_factory=None if real else stand_in_factory, log=lambda *_: None)
if int(os.environ.get("RANK", "0")) == 0:
    print("LOSSES " + json.dumps(result.losses))
