"""`python -m apprentice.torchrun [torchrun args]`: torchrun for a trainer spread over several nodes, ending as one
process does.

Only the several-node launch goes through torchrun (one node's ranks are started by the launcher itself:
launcher.trainer_processes). When a rank fails, torchrun's agent adds its own `ChildFailedError` traceback (20 lines
of its internals and a "Root Cause" table) under the rank's output and exits 1, so a user error such as a missing
data file ends in a traceback and the wrong exit code. This entry runs torchrun's own `run` with the same
arguments and, when a rank failed, exits with that rank's exit code and no traceback: the rank already printed
its one-line message (an `ApprenticeError`) or, for an unexpected error, its own traceback. A rank killed by a
signal (exit code -N) is named in one line and ends with exit code 1. An agent that loses the rendezvous because
the node hosting it ended first says so in one line and ends with exit code 1.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import get_args_parser, run

    # The agent's "failed (exitcode: 2) local_rank: 0 ..." line repeats what the exit code says.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except RendezvousConnectionError:
        # The node hosting the rendezvous store ended first (its rank failed, e.g. the same user error, and its
        # agent exited) while this agent was still watching its own: that node's log has the reason.
        print(f"apprentice: lost the trainer's rendezvous at {args.rdzv_endpoint}: another node's trainer ended "
              f"first; its log says why", file=sys.stderr)  # fmt: skip
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # no shutdown noise after it
        return 1
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        print(f"apprentice: trainer rank {rank} (pid {failure.pid}) was killed by signal {-failure.exitcode}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
