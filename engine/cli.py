"""`train_stream` entry point: parse and check the flags before anything slow loads, set up, run,
and turn user errors into one line."""
from __future__ import annotations

import errno
import json
import logging
import os
import sys

from common.errors import PREEMPTED_EXIT, DataLoadingError, Preempted, UserError, user_message

from .flags import parse_args
from .wording import flag_wording


def run(config) -> dict:
    """Train (or, with --performance, measure) as a Config or Resolved says; returns the summary
    or the measurement."""
    from .builder import build  # torch, timm and the loaders load only now: a bad flag is refused at once
    from .trainer import Trainer

    trainer = Trainer(build(config))
    if trainer.config.run.performance:
        result = trainer.benchmark()
        if trainer.d.main:
            print(json.dumps(result), flush=True)
        return result
    return trainer.fit()


class _Wording(logging.Filter):
    """The library's warnings in the command line's words (loader workers inherit it by fork)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = flag_wording(record.getMessage()), None
        return True


def install_log_wording() -> None:
    for name in ("pipeline", "model"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _Wording) for f in log.filters):
            log.addFilter(_Wording())


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_wording()
    try:
        from .guards import guard_run
        from .precheck import check_paths
        resolved = parse_args(argv)
        check_paths(resolved)  # a missing --data_path or a file as --output: refused before torch loads
        with guard_run(resolved):  # the run folder's lock, write probe and free space, before set-up
            run(resolved)
        return 0
    except UserError as e:
        prefix = "data loading failed: " if isinstance(e, DataLoadingError) else ""
        print(f"train_stream: error: {prefix}{flag_wording(user_message(e))}", file=sys.stderr, flush=True)
        return e.exit_code
    except RuntimeError as e:  # a loader worker or another rank died: not a bug here, one line
        from pipeline.loader import worker_failure

        from .dist import peer_failure
        reason = worker_failure(e) or peer_failure(e)
        if reason is None:
            raise
        if "DataLoader" in reason:
            reason = flag_wording(f"data loading failed: {reason}; resume from the last checkpoint to continue")
        print(f"train_stream: error: {reason}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:  # a full disk anywhere in a write (checkpoints say more themselves)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"train_stream: error: {e.strerror} writing {e.filename or 'the run files'}; the checkpoints "
              "written before are kept: free space and resume", file=sys.stderr, flush=True)
        return 1
    except Preempted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train_stream: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:  # during the set-up (or after the loop): training stops at a step instead
        if int(os.environ.get("RANK", "0")) == 0:
            print("train_stream: interrupted outside the training loop: no checkpoint written by this stop",
                  file=sys.stderr, flush=True)
        return 130
    finally:
        if "torch.distributed" in sys.modules:
            from .dist import shutdown
            shutdown()
