#!/usr/bin/env python3
"""Benchmark of the lanes (DESIGN.md §8): interactive latency during a 20,000-job bulk backlog
next to idle, and the bulk rate with interactive jobs next to alone; a fresh stack per round,
medians of ROUNDS (default 3). The scenario is tests/integration/lanes.py.

    PQ_BIN_DIR=build/bin python3 tests/bench/lanes.py
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
import lanes  # noqa: E402


def one_round(n):
    with harness.Stack("bench-lanes-%d" % n) as st:
        idle, lat, rate_alone, rate_loaded = lanes.scenario(st)
        fig = {"idle_ms": idle, "loaded_median_ms": statistics.median(lat),
               "loaded_max_ms": max(lat), "bulk_alone": round(rate_alone),
               "bulk_loaded": round(rate_loaded), "load": os.getloadavg()[0]}
        print("ROUND %d %s" % (n, json.dumps(fig)), flush=True)
        return fig


if __name__ == "__main__":
    rounds = [one_round(i + 1) for i in range(int(os.environ.get("ROUNDS", "3")))]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print("MEDIAN %s" % json.dumps(med))
    print("interactive under load / idle: %.2fx (target <= 2x); bulk with probes / alone: "
          "%.2f (target >= 0.5)" % (med["loaded_median_ms"] / med["idle_ms"],
                                    med["bulk_loaded"] / med["bulk_alone"]))
