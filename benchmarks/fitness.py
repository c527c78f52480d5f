"""Seconds per member of the likelihood fitness, online vs replayed, in one run.

    python benchmarks/fitness.py [--length 1024] [--items 2] [--members 2]

Builds both fitness functions on the default model with the same items and
normalisation, scores the same random members with each (recordings and
full-cache references are made first and not counted), and prints the time per
member, the ratio, and both fitness values side by side.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from namm_mlx.evolve.fitness import make_fitness

TEXT = str(Path(__file__).resolve().parents[1] / "tests" / "data" / "pride_and_prejudice.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--items", type=int, default=2)
    parser.add_argument("--members", type=int, default=2)
    args = parser.parse_args()
    options = {"text": TEXT, "length": str(args.length), "pool": str(args.items), "items": str(args.items),
               "calibration_items": "1", "tasks": "passkey"}
    online = make_fitness("likelihood", 4172, options=options)
    replay = make_fitness("replay", 4172, options=options)
    replay.norm = online.calibrate()
    items = online.items_for(1)
    for item in items:  # references and recordings: paid once per item in a run
        online.full_logprob(item)
        replay.full_logprob(item)
    rng = np.random.default_rng(0)
    members = [rng.normal(0, 0.065, 4172) for _ in range(args.members)]
    timings = {}
    results = {}
    for name, fn in (("online", online), ("replay", replay)):
        start = time.perf_counter()
        results[name] = [fn.evaluate(m, items) for m in members]
        timings[name] = (time.perf_counter() - start) / len(members)
    print(f"{args.items} passkey items of {args.length} tokens, {args.members} members")
    print(f"seconds per member: online {timings['online']:.2f}, replay {timings['replay']:.2f}, "
          f"ratio replay/online {timings['replay'] / timings['online']:.3f}")
    for i, (a, b) in enumerate(zip(results["online"], results["replay"])):
        print(f"member {i}: fitness online {a['fitness']:.4f} replay {b['fitness']:.4f}, "
              f"kept online {a['kept_fraction']:.3f} replay {b['kept_fraction']:.3f}")


if __name__ == "__main__":
    main()
