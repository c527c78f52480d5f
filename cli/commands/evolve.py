"""``namm evolve``: evolve a NAMM with the reference CMA-ES, resumable and distributed.

Thin wrapper over :mod:`namm_mlx.evolve`. Several processes (one or more machines) share
each population when started under ``mlx.launch``, e.g.::

    mlx.launch -n 2 --backend ring -- namm evolve --out runs/a --fitness synthetic

Only rank 0 prints and writes the run folder.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import List, Optional

import typer

import namm_mlx.evolve as ev
from cli import errors
from namm_mlx.config import NAMMConfig



def _options(pairs: List[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ev.FitnessError(f"--fitness-arg expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def evolve(
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Run folder: checkpoint, log.jsonl and the current NAMM (DIR/namm).",
        show_default=False,
    ),
    generations: Optional[int] = typer.Option(
        None, "--generations", "-g", min=0, metavar="N",
        help="Total generations to reach (default 100; when resuming, the run's target).", show_default=False,
    ),
    pop_size: Optional[int] = typer.Option(
        None, "--pop-size", min=4, metavar="N", help="Population size (default 16; the paper used 32).",
        show_default=False,
    ),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Random seed (default 0).", show_default=False),
    separable: Optional[bool] = typer.Option(
        None, "--separable/--full-covariance",
        help="Diagonal covariance (sep-CMA-ES, O(n)) instead of the reference's full one (default: full).",
        show_default=False,
    ),
    sigma: Optional[float] = typer.Option(
        None, "--sigma", min=0.0, help="Initial step size (default 0.065, the reference's).", show_default=False
    ),
    eig_every: Optional[int] = typer.Option(
        None, "--eig-every", min=1, metavar="K",
        help="Full covariance: eigendecompose every K generations (default 1, like the reference; "
        "~10 s each for 4,172 parameters).", show_default=False,
    ),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", metavar="PATH",
        help="Start from a NAMM folder or a reference ckpt.pt (its mean and normalisation buffers; "
        "the CMA-ES state starts fresh).", show_default=False,
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last generation."),
    export: Optional[Path] = typer.Option(
        None, "--export", metavar="DIR", help="Write the run's current mean as a NAMM folder to DIR and exit.",
        show_default=False,
    ),
    fitness: Optional[str] = typer.Option(
        None, "--fitness", metavar="NAME",
        help="Objective: 'likelihood' (answer likelihood under the evicted cache minus a memory "
        "penalty; fast on a CPU; see --fitness-arg), 'generation' (task scores of greedy answers "
        "relative to the full cache, minus the penalty) or 'synthetic' (smoke test, no model). "
        "Default when resuming: the run's.", show_default=False,
    ),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="M", help="Language model the fitness evaluates with.", show_default=False
    ),
    fitness_arg: List[str] = typer.Option(
        [], "--fitness-arg", metavar="KEY=VALUE", help="Option for the fitness function (repeatable).",
        show_default=False,
    ),
    stage: List[str] = typer.Option(
        [], "--stage", metavar="NAME:GENS[:KEY=VALUE...]",
        help="A curriculum stage (repeatable, in order): GENS generations with the --fitness-arg options "
        "overridden by the stage's KEY=VALUE pairs, e.g. --stage s1:20:length=1024 --stage s2:20:length=2048. "
        "One CMA-ES run continues across stages. Replaces --generations; when resuming: the run's.",
        show_default=False,
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress line."),
) -> None:
    """Evolve a NAMM with CMA-ES; every generation is checkpointed (resume with --resume)."""
    with errors.user_errors():
        if export is not None:
            _export(out, export)
            return
        _run(out, generations, pop_size, seed, separable, sigma, eig_every, init_from, resume,
             fitness, model, fitness_arg, stage, quiet)


def _parse_stages(specs: List[str]) -> list[tuple[str, int, dict[str, str]]]:
    """``NAME:GENS[:KEY=VALUE...]`` strings -> ``(name, generations, options)``."""
    stages = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        gens, _, pairs = rest.partition(":")
        if not name.strip() or not gens.strip().isdigit():
            raise ev.FitnessError(f"--stage expects NAME:GENERATIONS[:KEY=VALUE...], got {spec!r}")
        stages.append((name.strip(), int(gens), _options([p for p in pairs.split(":") if p.strip()])))
    names = [s[0] for s in stages]
    if len(set(names)) != len(names):
        raise ev.FitnessError(f"stage names must differ, got {', '.join(names)}")
    return stages


class _StageFitness:
    """One stage's fitness function, built on first use so only the running
    stage holds a language model; stages share one set of normalisation buffers."""

    live: list["_StageFitness"] = []

    def __init__(self, objective: str, model: Optional[str], options: dict[str, str]) -> None:
        self.objective, self.model, self.options = objective, model, options
        self.fn = None
        self.template = None

    def build(self):
        if self.fn is None:
            for other in _StageFitness.live:
                other.fn = None
            _StageFitness.live[:] = [self]
            self.fn = ev.make_fitness(self.objective, NAMMConfig().param_size, model=self.model, options=self.options)
            if self.template is not None:
                self.fn.adopt(*self.template)
        return self.fn

    def __call__(self, members, member_ids, *, context=None):
        fn = self.build()
        if "context" in inspect.signature(fn).parameters:
            return fn(members, member_ids, context=context)
        return fn(members, member_ids)


def _export(run_dir: Path, target: Path) -> None:
    if not ev.Collective().is_root:
        return
    namm = ev.export_run(run_dir, target)
    meta = namm.metadata
    fitness = f", fitness {meta['fitness']}" if "fitness" in meta else ""
    print(f"wrote {target} from {run_dir}: generation {meta['generation']}{fitness}")


def _run(out, generations, pop_size, seed, separable, sigma, eig_every, init_from, resume,
         fitness, model, fitness_arg, stage, quiet) -> None:
    collective = ev.Collective()
    config = NAMMConfig()
    stored, error = None, None
    if resume and collective.is_root and (out / "state.npz").is_file():
        try:
            stored = ev.load_run(out).run.get("metadata", {})
        except ev.EvolveError as err:
            error = err
    # Every rank needs the objective and its options; a resumed run's are stored on rank 0 only.
    if resume and collective.size > 1:
        payload = json.dumps(stored).encode() if collective.is_root else None
        raw = collective.share_from_root(payload, str(error) if error is not None else None)
        if not collective.is_root:
            stored = json.loads(raw.decode())
    if error is not None:
        raise error
    has_run = stored is not None
    init = None
    if init_from is not None and not has_run:
        init = ev.load_init(init_from, config)  # a bad NAMM fails before any model loads
        if init.key_probe is not None and collective.is_root:
            typer.echo(f"note: {init_from}'s key probe and settings are kept as they are; only its BAM's weights "
                       "are evolved", err=True)
    stored = stored or {}
    options = _options(fitness_arg)
    if fitness is None:
        fitness = stored.get("objective")
        if fitness is None:
            raise ev.FitnessError(f"choose an objective with --fitness (available: {', '.join(sorted(ev.FITNESS))})")
        if not fitness_arg and stored.get("objective_args"):
            options = json.loads(stored["objective_args"])
        if model is None:
            model = stored.get("model") or None
    if stage:
        stages = _parse_stages(stage)
    else:
        stages = [tuple(s) for s in json.loads(stored["stages"])] if stored.get("stages") else None
    if stages and generations is not None:
        raise ev.FitnessError("give either --generations or --stage (a curriculum's length is its stages')")
    metadata = {"objective": fitness, "objective_args": _json(options)}
    if model:
        metadata["model"] = model
    if stages:
        metadata["stages"] = json.dumps(stages)
        stage_fns = [_StageFitness(fitness, model, {**options, **overrides}) for _, _, overrides in stages]
        first = stage_fns[0].build()
        norm = _share_template(first, out, init, has_run)
        template = _template_of(first)
        del first  # a later stage's build drops stage 1's model; no local reference may keep it
        for fn in stage_fns:
            fn.template = template
        plan = [ev.Stage(name, gens, fn) for (name, gens, _), fn in zip(stages, stage_fns)]
    else:
        fitness_fn = ev.make_fitness(fitness, config.param_size, model=model, options=options)
        norm = _share_template(fitness_fn, out, init, has_run)
        if generations is None and not has_run:
            generations = 100
        plan = [ev.Stage(fitness, generations, fitness_fn)]
    world = f" on {collective.size} processes" if collective.size > 1 else ""
    result = ev.evolve(
        stages=plan,
        out_dir=out,
        pop_size=pop_size,
        seed=seed,
        init_from=init_from,
        norm=norm,
        separable=separable,
        resume=resume,
        progress=not quiet,
        sigma=sigma,
        eig_every=eig_every,
        group=collective,
        metadata=metadata,
        namm_config=config,
    )
    if collective.is_root:
        last = result.last
        summary = f"best {last['best']:.6g}, mean {last['mean']:.6g}, " if last else ""
        print(
            f"{out}: generation {result.generation}/{result.generations}{world}, {summary}"
            f"sigma {result.sigma:.4g}; NAMM at {result.namm_dir}"
        )


def _share_template(fitness_fn, out: Path, init: Optional[ev.InitSource], has_run: bool):
    """Make a model-based fitness score members as the exported NAMMs are: with
    the resumed run's or the --init-from NAMM's normalisation buffers, settings
    and key probe, or (fresh run) the reference settings and the fitness's own
    calibration, which is then handed to the trainer. None for others."""
    if not hasattr(fitness_fn, "calibrate"):
        return None
    if has_run:
        state = ev.load_run(out)
        fitness_fn.adopt((state.norm_mean, state.norm_var), state.namm_config(), state.key_probe)
        return None
    if init is not None:
        fitness_fn.adopt((init.norm_mean, init.norm_var), init.config or NAMMConfig(), init.key_probe)
        return None
    mean, var, _ = fitness_fn.calibrate()  # deterministic: every rank gets the same
    return mean, var


def _template_of(fitness_fn):
    """What :func:`_share_template` gave a stage's fitness, for the later stages."""
    if not hasattr(fitness_fn, "adopt"):
        return None
    mean, var, _ = fitness_fn.norm
    return (mean, var), fitness_fn.config, fitness_fn.key_probe


def _json(options: dict[str, str]) -> str:
    return json.dumps(options, sort_keys=True)
