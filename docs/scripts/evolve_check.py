"""Score an evolution run's starting NAMM and its current CMA-ES mean on every item of the run's fitness pool.

The log of `namm evolve` holds the members' fitness on each generation's items only,
and the items change between generations, so it cannot say whether the mean got
better. Here both vectors are scored with the run's own fitness (its options, its
template's settings and key probe) on the same items.

    python docs/scripts/evolve_check.py RUN START_NAMM OUT.json
"""

import json
import sys
import time

import numpy as np

from namm_mlx.evolve import load_run
from namm_mlx.evolve.fitness import make_fitness
from namm_mlx.namm import NAMM


def main(run: str, start_dir: str, out_path: str) -> None:
    state = load_run(run)
    options = json.loads(state.run["metadata"]["objective_args"])
    fitness = make_fitness(state.run["metadata"]["objective"], state.es.n, options=options)
    start = NAMM.load(start_dir)
    fitness.adopt((np.asarray(state.norm_mean), np.asarray(state.norm_var)), state.namm_config(), state.key_probe)
    out = {"run": run, "generation": state.generation, "options": options, "items": [i["_id"] for i in fitness.pool]}
    for name, vector in (("start", start.to_flat().astype(np.float64)), ("mean", state.es.mean)):
        began = time.time()
        rows = [fitness.evaluate(vector, [item]) for item in fitness.pool]
        out[name] = {
            "per_item": [r["quality"] for r in rows],
            "quality": float(np.mean([r["quality"] for r in rows])),
            "kept": float(np.mean([r["kept_fraction"] for r in rows])),
            "seconds": time.time() - began,
        }
        print(name, round(out[name]["quality"], 4), flush=True)
    with open(out_path, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
