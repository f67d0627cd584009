"""`train_stream` entry point: parse, set up, run, and turn user errors into one line."""
from __future__ import annotations

import json
import logging
import sys

from common.errors import DataLoadingError, UserError, user_message

from .config import parse_args
from .data import make_data
from .dist import setup_distributed, shutdown
from .runtime import configure_torch
from .trainer import Trainer


def run(args) -> dict:
    """Train (or, with --performance, measure) as the flags say; returns the summary or result."""
    d = setup_distributed(args.device, args.device_id, args.local_rank)
    configure_torch()
    trainer = Trainer(args, d, make_data(args, d))
    if args.performance:
        result = trainer.benchmark()
        if d.main:
            print(json.dumps(result), flush=True)
        return result
    return trainer.fit()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(parse_args(argv))
        return 0
    except UserError as e:
        prefix = "data loading failed: " if isinstance(e, DataLoadingError) else ""
        print(f"train_stream: error: {prefix}{user_message(e)}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("train_stream: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        shutdown()
