"""Local evolution: the reference CMA-ES, the resumable trainer, distributed scoring, CLI.

Everything is checked against outcomes that a broken implementation would miss:
convergence on benchmark functions, the spec §7.1 coefficient table, bitwise equality of
interrupted/resumed and distributed runs with an uninterrupted single-process run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REFERENCE
from typer.testing import CliRunner

from cli.main import app
from namm_mlx import NAMM
from namm_mlx.evolve import (
    CMAES,
    CMAESError,
    Collective,
    DistributedError,
    EvolveError,
    FitnessError,
    cma_params,
    evolve,
    load_run,
    make_fitness,
    read_log,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_CKPT = REFERENCE / "checkpoint_tiny.pt"


# ------------------------------------------------------------------ CMA-ES itself

# namm-spec §7.1, "Values [C] for n = 4172".
SPEC_TABLE = {
    32: dict(
        mu_eff=9.1788288, mu_eff_minus=12.6768503, c_1=1.148e-07, c_mu=8.366e-07, alpha_min=1.1372621,
        w=(0.197672, 0.148796, 0.120206), w_tail=(0.0021698, -0.0056281, -0.1248762), w_sum=-0.1372621,
        c_sigma=0.0026704136, d_sigma=1.0026704136, c_c=0.0009583802, chi_n=64.5871507,
    ),
    16: dict(
        mu_eff=4.8409145, mu_eff_minus=6.3507200, c_1=1.148e-07, c_mu=3.498e-07, alpha_min=1.3282493,
        w=(0.328436, 0.222059, 0.159832), w_tail=(0.0093041, -0.0257644, -0.2851121), w_sum=-0.3282493,
        c_sigma=0.0016358620, d_sigma=1.0016358620, c_c=0.0009581317, chi_n=64.5871507,
    ),
}


@pytest.mark.parametrize("pop_size", [32, 16])
def test_coefficients_match_spec_table(pop_size):
    p = cma_params(4172, pop_size)
    want = SPEC_TABLE[pop_size]
    assert p.mu == pop_size // 2
    for key in ("mu_eff", "mu_eff_minus", "c_sigma", "d_sigma", "c_c", "chi_n", "alpha_min"):
        assert getattr(p, key) == pytest.approx(want[key], rel=1e-4), key
    # the table prints c_1/c_mu with 4 significant digits
    assert p.c_1 == pytest.approx(want["c_1"], rel=5e-4)
    assert p.c_mu == pytest.approx(want["c_mu"], rel=5e-4)
    assert p.weights[:3] == pytest.approx(want["w"], rel=1e-4)
    tail = (p.weights[p.mu - 1], p.weights[p.mu], p.weights[-1])
    assert tail == pytest.approx(want["w_tail"], rel=1e-4)
    assert p.weights.sum() == pytest.approx(want["w_sum"], rel=1e-4)
    assert p.weights[p.weights > 0].sum() == pytest.approx(1.0, abs=1e-6)
    assert (p.weights_truncated[: p.mu] == p.weights[: p.mu]).all() and not p.weights_truncated[p.mu :].any()
    assert p.c_m == 1.0
    assert CMAES(4172, pop_size).sigma == 0.065


def _optimize(f, n, *, separable, pop_size=16, x0=1.0, sigma=0.5, max_gens=3000, target=1e-10, seed=0):
    es = CMAES(n, pop_size, sigma=sigma, mean=np.full(n, x0), seed=seed, separable=separable)
    for _ in range(max_gens):
        es.tell([f(x) for x in es.ask()])
        if -f(es.mean) < target:
            break
    return es, -f(es.mean)


def _rotated_ellipsoid(n, condition=1e3, rotate=True, seed=1):
    scales = condition ** (np.arange(n) / (n - 1))
    Q = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0] if rotate else np.eye(n)
    return lambda x: -float(scales @ (Q @ x) ** 2)


def sphere(x):
    return -float(x @ x)


@pytest.mark.parametrize("separable", [False, True])
def test_converges_on_50d_sphere(separable):
    es, err = _optimize(sphere, 50, separable=separable, max_gens=800)
    assert err < 1e-10, f"sphere not solved after {es.generation} generations: {err}"
    assert es.generation < 800
    assert es.best_fitness > -1e-8 and es.best_fitness == max(es.best_fitness, sphere(es.best_member))


def test_full_covariance_learns_a_rotated_ellipsoid():
    f = _rotated_ellipsoid(20)
    es, err = _optimize(f, 20, separable=False, max_gens=1500)
    assert err < 1e-10, f"rotated ellipsoid not solved after {es.generation} generations: {err}"
    # the learned covariance is anisotropic (condition ~1e3 of the Hessian's inverse)
    evals = np.linalg.eigvalsh(es.covariance)
    assert evals.max() / evals.min() > 100
    # a diagonal model cannot follow the rotation: it is still far off with the same budget
    _, sep_err = _optimize(f, 20, separable=True, max_gens=es.generation)
    assert sep_err > 1e3 * max(err, 1e-12)


def test_separable_converges_on_axis_aligned_ellipsoid():
    es, err = _optimize(_rotated_ellipsoid(30, rotate=False), 30, separable=True, max_gens=1500)
    assert err < 1e-10, f"axis-aligned ellipsoid not solved after {es.generation} generations: {err}"
    c = es.covariance
    assert c.shape == (30,) and c[0] / c[-1] > 100  # learned the axis scaling


def _run_gens(es, gens, f=sphere):
    for _ in range(gens):
        es.tell([f(x) for x in es.ask()])


def _json_roundtrip(state):
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.items() if k not in arrays}
    return json.loads(json.dumps(scalars)) | arrays  # scalars incl. the RNG state are JSON-able


def _assert_same_es(a, b):
    assert a.generation == b.generation and a.sigma == b.sigma
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.covariance, b.covariance)
    assert np.array_equal(a.best_member, b.best_member) and a.best_fitness == b.best_fitness


@pytest.mark.parametrize("separable,eig_every", [(False, 1), (False, 3), (True, 1)])
def test_state_dict_resumes_bit_for_bit(separable, eig_every):
    a = CMAES(12, 8, sigma=0.3, mean=np.ones(12), seed=7, separable=separable, eig_every=eig_every)
    _run_gens(a, 4)
    b = CMAES.from_state_dict(_json_roundtrip(a.state_dict()))
    _run_gens(a, 5)
    _run_gens(b, 5)
    _assert_same_es(a, b)
    # a state taken between ask and tell continues that population
    population = a.ask()
    c = CMAES.from_state_dict(_json_roundtrip(a.state_dict()))
    fitness = [sphere(x) for x in population]
    a.tell(fitness)
    c.tell(fitness)
    _assert_same_es(a, c)
    assert np.array_equal(a.ask(), c.ask())
    assert not np.array_equal(a.mean, np.ones(12))


def _spec_ask(state, p):
    """namm-spec §7.1 ``ask``, transcribed literally."""
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state["rng"]
    if p.separable:
        D, B = np.sqrt(state["C"]), np.eye(p.n)
    else:
        C = state["C"] + (1e-6 if state["generation"] == 0 else 0.0)
        C = (C + C.T) / 2
        d2, B = np.linalg.eigh(C)
        D = np.sqrt(np.where(d2 <= 0, 1e-20, d2))
    z = rng.standard_normal((p.pop_size, p.n))
    y = z @ np.diag(D) @ B.T
    return state["mean"] + state["sigma"] * y, y, B, D


def _spec_tell(state, f, p, x, y, B, D):
    """namm-spec §7.1 ``tell``, transcribed literally (full matrices even when separable)."""
    n, lam = p.n, p.pop_size
    C = np.diag(state["C"]) if p.separable else state["C"]
    g = state["generation"] + 1
    order = np.argsort(-np.asarray(f), kind="stable")
    xs, ys = x[order], y[order]
    y_w = sum(p.weights_truncated[i] * ys[i] for i in range(lam))
    mean = state["mean"] + p.c_m * state["sigma"] * y_w
    Cinvsqrt = B @ np.diag(1 / D) @ B.T
    cs, cc = p.c_sigma, p.c_c
    ps = (1 - cs) * state["p_sigma"] + np.sqrt(cs * (2 - cs) * p.mu_eff) * (Cinvsqrt @ y_w)
    h = 1.0 if np.linalg.norm(ps) / np.sqrt(1 - (1 - cs) ** (2 * g)) < (1.4 + 2 / (n + 1)) * p.chi_n else 0.0
    pc = (1 - cc) * state["p_c"] + h * np.sqrt(cc * (2 - cc) * p.mu_eff) * y_w
    w = p.weights
    w_o = [w[i] if w[i] > 0 else w[i] * n / (np.linalg.norm(Cinvsqrt @ ys[i]) ** 2 + 1e-20) for i in range(lam)]
    delta = (1 - h) * cc * (2 - cc)
    C = (1 + p.c_1 * delta - p.c_1 - p.c_mu * w.sum()) * C + p.c_1 * np.outer(pc, pc) + p.c_mu * sum(
        w_o[i] * np.outer(ys[i], ys[i]) for i in range(lam)
    )
    sigma = state["sigma"] * np.exp((cs / p.d_sigma) * (np.linalg.norm(ps) / p.chi_n - 1))
    return dict(mean=mean, sigma=sigma, C=np.diag(C) if p.separable else C, p_sigma=ps, p_c=pc, h=h,
                best=xs[0], best_fitness=f[order[0]])


@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("stalled", [False, True])
def test_ask_and_tell_follow_the_spec_formulas(separable, stalled):
    """Every term of §7.1 (w° rescaling, C^-1/2 in p_sigma, h_sigma, rank-one/rank-mu,
    step size) against a literal transcription, from generation 0 (shifted decomposition)
    and from a skewed state."""
    n, lam = 7, 10
    es = CMAES(n, lam, sigma=0.2, mean=np.linspace(-1, 1, n), seed=11, separable=separable)
    p = es.params
    rng = np.random.default_rng(0)
    ellipsoid = _rotated_ellipsoid(n, condition=100)
    for gen in range(3):
        state = es.state_dict()
        if gen == 2:  # skew the state: a correlated C, non-zero paths, maybe a stalled step size path
            A = rng.standard_normal((n, n)) * 0.3 + np.eye(n)
            state["C"] = np.abs(np.diag(A @ A.T)) if separable else A @ A.T
            state["p_c"] = rng.standard_normal(n) * 0.1
            state["p_sigma"] = rng.standard_normal(n) * (50.0 if stalled else 0.5)
            es.load_state_dict(state)
        x_spec, y_spec, B, D = _spec_ask(state, p)
        x = es.ask()
        assert np.allclose(x, x_spec, rtol=0, atol=1e-12)
        f = np.array([ellipsoid(m) for m in x])
        want = _spec_tell(state, f, p, x, y_spec, B, D)
        es.tell(f)
        got = es.state_dict()
        for key in ("mean", "C", "p_sigma", "p_c"):
            assert np.allclose(got[key], want[key], rtol=1e-9, atol=1e-13), (gen, key)
        assert got["sigma"] == pytest.approx(want["sigma"], rel=1e-12)
        if gen == 2:
            assert want["h"] == (0.0 if stalled else 1.0)
    assert es.best_fitness >= want["best_fitness"]


def test_same_seed_same_run_and_bad_inputs():
    a, b = CMAES(10, 8, seed=3), CMAES(10, 8, seed=3)
    _run_gens(a, 3)
    _run_gens(b, 3)
    assert np.array_equal(a.mean, b.mean)
    assert not np.array_equal(CMAES(10, 8, seed=4).ask(), CMAES(10, 8, seed=3).ask())
    with pytest.raises(CMAESError, match="ask"):
        CMAES(10, 8).tell(np.zeros(8))
    es = CMAES(10, 8)
    es.ask()
    with pytest.raises(CMAESError, match="8 fitness"):
        es.tell(np.zeros(7))
    with pytest.raises(CMAESError, match="finite"):
        es.tell([0.0] * 7 + [math.nan])
    with pytest.raises(CMAESError, match="pop_size"):
        CMAES(10, 3)
    with pytest.raises(CMAESError, match="shape"):
        CMAES(10, 8).load_state_dict({**CMAES(10, 8).state_dict(), "C": np.eye(9)})


# ---------------------------------------------------------------------- the trainer


def quadratic_fitness(target_seed=0, n=12):
    target = np.random.default_rng(target_seed).normal(0, 0.3, n)

    def fitness(members, member_ids):
        return [{"fitness": -float(np.sum((m - target) ** 2)), "kept_fraction": float(i) / 10} for m, i in
                zip(members, member_ids)]

    return fitness


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _assert_same_run(a: Path, b: Path):
    sa, sb = load_run(a), load_run(b)
    assert sa.generation == sb.generation
    assert np.array_equal(sa.es.mean, sb.es.mean)
    assert sa.es.sigma == sb.es.sigma
    assert np.array_equal(sa.es.covariance, sb.es.covariance)
    assert np.array_equal(sa.es.best_member, sb.es.best_member)
    la, lb = _strip(read_log(a)), _strip(read_log(b))
    assert len(la) == sa.generation and la == lb


def test_resume_equals_uninterrupted_run_with_curriculum(tmp_path):
    f1, f2 = quadratic_fitness(0), quadratic_fitness(1)
    plan = [("easy", 5, f1), ("hard", 7, f2)]
    kw = dict(n=12, pop_size=8, seed=5, progress=False, group=Collective.single())
    full = evolve(out_dir=tmp_path / "full", stages=plan, **kw)
    assert full.generation == 12 and full.namm_dir is None  # 12 parameters: no NAMM folder
    # k = 7 (inside stage 2), then resume to N = 12
    part = evolve(out_dir=tmp_path / "part", stages=[("easy", 5, f1), ("hard", 2, f2)], **kw)
    assert part.generation == 7
    with pytest.raises(EvolveError, match="--resume"):
        evolve(out_dir=tmp_path / "part", stages=plan, **kw)
    # a kill can leave a torn line, or a line of a generation whose checkpoint never landed
    with open(tmp_path / "part" / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"generation": 8, "stage": "hard", "best": 1.0}) + "\n" + '{"generation": 9, "be')
    resumed = evolve(out_dir=tmp_path / "part", stages=plan, resume=True, **kw)
    assert resumed.start_generation == 7 and resumed.generation == 12
    _assert_same_run(tmp_path / "full", tmp_path / "part")
    stages = [r["stage"] for r in read_log(tmp_path / "part")]
    assert stages == ["easy"] * 5 + ["hard"] * 7
    assert read_log(tmp_path / "part")[0]["kept_fraction"] == pytest.approx(np.mean(np.arange(8)) / 10)
    assert read_log(tmp_path / "part")[0]["kept"] == pytest.approx(np.arange(8) / 10)  # each member's, in order
    # one CMA-ES run across stages: sigma/paths/C carry over (generation counter continues)
    assert load_run(tmp_path / "part").es.generation == 12
    # changing a stage already run is refused; extending the last one is fine
    with pytest.raises(EvolveError, match="stage"):
        evolve(out_dir=tmp_path / "part", stages=[("other", 5, f1), ("hard", 9, f2)], resume=True, **kw)
    more = evolve(out_dir=tmp_path / "part", stages=[("easy", 5, f1), ("hard", 9, f2)], resume=True, **kw)
    assert more.generation == 14 and len(read_log(tmp_path / "part")) == 14
    with pytest.raises(EvolveError, match="pop_size"):
        evolve(out_dir=tmp_path / "part", stages=plan, resume=True, **{**kw, "pop_size": 16})


def test_trainer_exports_namm_and_rejects_bad_fitness(tmp_path):
    fn = make_fitness("synthetic", 4172)
    r = evolve(fn, tmp_path / "run", generations=3, pop_size=8, separable=True, seed=2, progress=False,
               group=Collective.single(), metadata={"objective": "synthetic"})
    namm = NAMM.load(r.namm_dir)
    assert np.array_equal(namm.to_flat(), r.mean.astype(np.float32))
    meta = namm.metadata
    assert meta["generation"] == meta["iteration"] == "3" and meta["seed"] == "2"
    assert float(meta["fitness"]) == read_log(tmp_path / "run")[-1]["mean"] and meta["objective"] == "synthetic"
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["generation"] == 3 and state["pop_size"] == 8
    # the fitness curve is redrawn from the log: three generations, three lines
    from matplotlib.image import imread

    from namm_mlx.eval.plot import FITNESS_RGB

    rgb_pixels = (imread(tmp_path / "run" / "fitness.png")[..., :3] * 255).round().astype(np.uint8)
    assert rgb_pixels.shape == (440, 800, 3)
    plot_area = rgb_pixels[:, :555]  # left of the legend
    for name, rgb in FITNESS_RGB.items():
        assert np.all(plot_area == np.array(rgb, np.uint8), axis=-1).sum() >= 3 * 40, name  # three markers at least

    def broken(members, ids):
        return [{"fitness": math.nan}] * len(ids)

    with pytest.raises(EvolveError, match="finite"):
        evolve(broken, tmp_path / "b", generations=2, n=5, pop_size=4, progress=False, group=Collective.single())
    with pytest.raises(EvolveError, match="2 results for 4"):
        evolve(lambda m, i: [{"fitness": 0.0}] * 2, tmp_path / "c", generations=1, n=5, pop_size=4,
               progress=False, group=Collective.single())
    assert load_run(tmp_path / "c").generation == 0  # nothing half-done was recorded


def test_fitness_gets_context_and_members_are_independent(tmp_path):
    seen = []

    def fn(members, member_ids, *, context):
        seen.append((context.generation, context.stage, context.seed, tuple(member_ids)))
        return [{"fitness": -float(m @ m)} for m in members]

    evolve(fn, tmp_path / "r", generations=2, n=4, pop_size=6, seed=9, progress=False, group=Collective.single())
    assert seen == [(1, "main", 9, tuple(range(6))), (2, "main", 9, tuple(range(6)))]


# -------------------------------------------------------- distributed (in threads)


class ThreadCollective(Collective):
    """W ranks as threads: all_sum through a barrier (exercises the exchange logic)."""

    def __init__(self, rank, size, board):
        self.group, self.rank, self.size, self.board = None, rank, size, board

    def sum_int64(self, values):
        values = np.ascontiguousarray(values, dtype=np.int64)
        b = self.board
        b["barrier"].wait(timeout=30)
        b["slots"][self.rank] = values
        b["barrier"].wait(timeout=30)
        total = np.sum(b["slots"], axis=0, dtype=np.int64)
        b["barrier"].wait(timeout=30)
        return total


def _threaded(size, target):
    board = {"barrier": threading.Barrier(size), "slots": [None] * size}
    results, errors = [None] * size, [None] * size

    def work(rank):
        try:
            results[rank] = target(ThreadCollective(rank, size, board))
        except BaseException as err:  # noqa: BLE001
            errors[rank] = err

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results, errors


def test_threaded_ranks_split_the_population_and_match_one_process(tmp_path):
    calls = []
    base = quadratic_fitness(3)

    def fn(members, member_ids):
        calls.append(tuple(member_ids))
        return base(members, member_ids)

    kw = dict(generations=4, n=12, pop_size=7, seed=1, progress=False)
    evolve(fn, tmp_path / "one", group=Collective.single(), **kw)
    calls.clear()
    results, errors = _threaded(3, lambda c: evolve(fn, tmp_path / "three", group=c, **kw))
    assert errors == [None] * 3
    assert sorted(set(calls)) == [(0, 3, 6), (1, 4), (2, 5)]
    _assert_same_run(tmp_path / "one", tmp_path / "three")
    assert all(np.array_equal(r.mean, results[0].mean) for r in results)
    # resume: only rank 0 reads the folder and shares the state
    _, errors = _threaded(3, lambda c: evolve(fn, tmp_path / "three", group=c, resume=True, **{**kw, "generations": 6}))
    evolve(fn, tmp_path / "one", group=Collective.single(), resume=True, **{**kw, "generations": 6})
    assert errors == [None] * 3
    _assert_same_run(tmp_path / "one", tmp_path / "three")


def test_threaded_rank_failure_stops_every_rank(tmp_path):
    def fn(members, member_ids):
        if 1 in member_ids and len(read_log(tmp_path / "r")) >= 1:
            raise RuntimeError("model crashed")
        return [{"fitness": -float(m @ m)} for m in members]

    _, errors = _threaded(2, lambda c: evolve(fn, tmp_path / "r", generations=5, n=6, pop_size=4, group=c,
                                              progress=False))
    assert isinstance(errors[1], RuntimeError) and isinstance(errors[0], DistributedError)
    assert "rank(s) 1" in str(errors[0])
    assert load_run(tmp_path / "r").generation == 1
    # rank 0 refusing to start (existing run, no resume) stops the others too
    _, errors = _threaded(2, lambda c: evolve(fn, tmp_path / "r", generations=5, n=6, pop_size=4, group=c,
                                              progress=False))
    assert isinstance(errors[0], EvolveError) and isinstance(errors[1], DistributedError)
    assert "--resume" in str(errors[1])


# --------------------------------------------------------------------------- CLI


runner = CliRunner()


def cli(*args):
    return runner.invoke(app, ["evolve", *map(str, args)])


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


SMOKE = ("--fitness", "synthetic", "--pop-size", "8", "--separable", "--seed", "4", "-q")


def test_cli_kill_9_then_resume_equals_uninterrupted(tmp_path):
    gens = 24
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "cli", "evolve", "--out", run, "-g", gens, *SMOKE, "--fitness-arg", "delay=0.01"]
    proc = subprocess.Popen(
        list(map(str, args)),
        cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while len(read_log(run)) < 4:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = load_run(run).generation
    assert 3 <= done < gens
    # resume (the simulated evaluation delay does not change any fitness value)
    res = cli("--out", run, "--resume", "--fitness-arg", "delay=0", "-q")
    assert res.exit_code == 0, res.output
    assert f"generation {gens}/{gens}" in res.output
    ref = cli("--out", tmp_path / "ref", "-g", gens, *SMOKE)
    assert ref.exit_code == 0, ref.output
    _assert_same_run(tmp_path / "ref", run)
    assert np.array_equal(NAMM.load(run / "namm").to_flat(), NAMM.load(tmp_path / "ref" / "namm").to_flat())


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def test_two_processes_under_mlx_launch_match_one_process(tmp_path):
    launcher = Path(sys.executable).with_name("mlx.launch")
    assert launcher.exists(), f"{launcher} missing (installed with mlx)"
    gens = 6
    cmd = [
        launcher, "-n", "2", "--backend", "ring", "--starting-port", _free_port_pair(), "--",
        sys.executable, "-m", "cli", "evolve", "--out", tmp_path / "two", "-g", gens, *SMOKE,
    ]
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "on 2 processes" in proc.stdout  # really one run over two ranks
    one = cli("--out", tmp_path / "one", "-g", gens, *SMOKE)
    assert one.exit_code == 0, one.output
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    fitness_two = [r["fitness"] for r in read_log(tmp_path / "two")]
    assert fitness_two == [r["fitness"] for r in read_log(tmp_path / "one")] and len(fitness_two[0]) == 8


def test_cli_export_init_from_and_errors(tmp_path):
    run = tmp_path / "run"
    r = cli("--out", run, "-g", 2, *SMOKE)
    assert r.exit_code == 0, r.output
    # one-line errors
    for args, needle in [
        (("--out", run, "-g", 2, *SMOKE), "--resume"),
        (("--out", tmp_path / "x", "--fitness", "gradient"), "unknown fitness 'gradient'"),
        (("--out", tmp_path / "x", "--fitness", "generation", "--fitness-arg", "bogus=1"), "bogus"),
        (("--out", tmp_path / "x"), "--fitness"),
        (("--out", tmp_path / "x", "--fitness", "synthetic", "--fitness-arg", "bogus=1"), "bogus"),
        (("--out", run, "--resume", "--pop-size", "16"), "pop_size"),
        (("--out", tmp_path / "x", "--export", tmp_path / "e"), "no evolution run"),
        (("--out", tmp_path / "y", *SMOKE, "--init-from", tmp_path / "missing.pt"), "not found"),
    ]:
        res = cli(*args)
        assert res.exit_code == 1, (args, res.output)
        assert "error:" in res.output and needle in res.output and "Traceback" not in res.output, res.output
        assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1
    # --export writes the current mean with provenance
    res = cli("--out", run, "--export", tmp_path / "exported")
    assert res.exit_code == 0, res.output
    exported = NAMM.load(tmp_path / "exported")
    assert np.array_equal(exported.to_flat(), load_run(run).es.mean.astype(np.float32))
    assert exported.metadata["generation"] == "2" and exported.metadata["objective"] == "synthetic"
    # --init-from a NAMM folder: the run starts at its vector with its buffers
    res = cli("--out", tmp_path / "from_namm", "-g", 0, *SMOKE, "--init-from", tmp_path / "exported")
    assert res.exit_code == 0, res.output
    start = load_run(tmp_path / "from_namm")
    assert np.array_equal(start.es.mean, exported.to_flat().astype(np.float64)) and start.es.sigma == 0.065
    assert "key probe" not in res.output
    # a probed NAMM with its own settings: the run evolves its BAM's weights and
    # every NAMM it writes keeps the probe and the settings, through a resume
    settings = dict(bam_window=128, newest_query_weight=0.3, key_probe_span=12, key_probe_share=0.3, key_probe_heads="max")
    probe = np.random.default_rng(0).normal(size=(2, 1, 33)).astype(np.float32)
    probed = NAMM(exported.weights, exported.norm_mean, exported.norm_var, exported.config,
                  key_probe=probe).with_config(**settings)
    probed.save(tmp_path / "probed")
    res = cli("--out", tmp_path / "from_probed", "-g", 1, *SMOKE, "--init-from", tmp_path / "probed")
    assert res.exit_code == 0, res.output
    assert "key probe and settings are kept" in res.output
    res = cli("--out", tmp_path / "from_probed", "-g", 2, "--resume", "-q")
    assert res.exit_code == 0, res.output
    res = cli("--out", tmp_path / "from_probed", "--export", tmp_path / "probed_export")
    assert res.exit_code == 0, res.output
    for folder in (tmp_path / "from_probed" / "namm", tmp_path / "probed_export"):
        evolved = NAMM.load(folder)
        assert evolved.config == probed.config and np.array_equal(np.array(evolved.key_probe), probe)
        assert evolved.metadata["generation"] == "2" and not np.array_equal(evolved.to_flat(), probed.to_flat())
    # --init-from a reference checkpoint: its mean and stored buffers, fresh CMA-ES state
    from namm_mlx.checkpoint import read_reference_checkpoint

    ckpt = read_reference_checkpoint(REFERENCE_CKPT)
    res = cli("--out", tmp_path / "from_ckpt", "-g", 1, *SMOKE, "--init-from", REFERENCE_CKPT)
    assert res.exit_code == 0, res.output
    state = load_run(tmp_path / "from_ckpt")
    assert np.array_equal(state.norm_mean, ckpt.norm_mean.astype(np.float64).reshape(-1))
    assert state.run["metadata"]["init_from"] == REFERENCE_CKPT.name
    first = read_log(tmp_path / "from_ckpt")[0]
    assert first["generation"] == 1 and state.es.generation == 1
    meta = NAMM.load(tmp_path / "from_ckpt" / "namm").metadata
    assert meta["init_iteration"] == str(ckpt.iter_num)


def test_fitness_registry():
    fn = make_fitness("synthetic", 100, options={"dims": "5"})
    out = fn(np.zeros((2, 100)), [0, 1])
    assert len(out) == 2 and out[0] == out[1] and out[0]["fitness"] < 0 and 0 <= out[0]["kept_fraction"] <= 1
    with pytest.raises(FitnessError, match="unknown fitness"):
        make_fitness("nope", 10)
    with pytest.raises(FitnessError, match="model"):
        make_fitness("synthetic", 10, model="some/model")


def test_cli_curriculum_stages_and_resume(tmp_path):
    run = tmp_path / "run"
    stages = ("--stage", "easy:2:dims=4", "--stage", "hard:3:dims=8:scale=0.25")
    base = ("--fitness", "synthetic", "--pop-size", "8", "--separable", "--seed", "3", "-q")
    r = cli("--out", run, *base, *stages)
    assert r.exit_code == 0, r.output
    log = read_log(run)
    assert [x["stage"] for x in log] == ["easy", "easy", "hard", "hard", "hard"]
    assert load_run(run).es.generation == 5
    stored = json.loads(load_run(run).run["metadata"]["stages"])
    assert stored == [["easy", 2, {"dims": "4"}], ["hard", 3, {"dims": "8", "scale": "0.25"}]]
    # stage 1 is exactly a plain run with its options (not the default dims=16)
    plain = tmp_path / "plain"
    assert cli("--out", plain, *base, "-g", 2, "--fitness-arg", "dims=4").exit_code == 0
    assert [x["fitness"] for x in read_log(plain)] == [x["fitness"] for x in log[:2]]
    # a same-seed run stopped inside stage 2 and resumed without repeating the stages equals it
    part = tmp_path / "part"
    r = cli("--out", part, *base, "--stage", "easy:2:dims=4", "--stage", "hard:1:dims=8:scale=0.25")
    assert r.exit_code == 0, r.output
    r = cli("--out", part, "--resume", "-q", *stages)
    assert r.exit_code == 0, r.output
    assert np.array_equal(load_run(part).es.mean, load_run(run).es.mean)
    assert [x["best"] for x in read_log(part)] == [x["best"] for x in log]
    # resuming with no flags reuses the stored curriculum (nothing left to do)
    r = cli("--out", part, "--resume", "-q")
    assert r.exit_code == 0 and load_run(part).es.generation == 5, r.output
    for args, needle in [
        (("--out", tmp_path / "x", *base, "--stage", "a:x"), "NAME:GENERATIONS"),
        (("--out", tmp_path / "x", *base, "--stage", "a:1", "--stage", "a:2"), "must differ"),
        (("--out", tmp_path / "x", *base, "--stage", "a:1", "-g", "3"), "either --generations or --stage"),
    ]:
        res = cli(*args)
        assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output, res.output
