"""The layer benchmark is now ``relibra measure`` (see docs/measure.md); this script forwards to it.

    python benchmarks/layer.py [relibra measure options]   ==   relibra measure [options]

``relibra measure`` runs a stack of ReLibraMoE layers with the Balancer, forward + backward over
the micro-batches and an AdamW step, for every policy on real ranks (gloo on CPU, one pinned core
per rank; torchrun with NCCL on GPUs), interleaved step by step, and prints the measured step
times next to the cost model's prices of the plans the Balancer ran. The earlier version of this
script ran 4 ranks on 2 cores, where a rank waiting for the busiest one gives its core away and
balance cannot show; ``relibra measure`` warns when ranks outnumber cores.
"""

from __future__ import annotations

import sys

from relibra.cli import main

if __name__ == "__main__":
    sys.exit(main(["measure", *sys.argv[1:]]))
