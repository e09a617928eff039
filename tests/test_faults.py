"""Reliability: numeric faults skip steps; too many in a row stop the run with the last good
state saved. Process faults: SIGKILL at seeded points (one in the middle of writing a checkpoint),
SIGTERM, a damaged checkpoint, a hung rank and ranks launched with different flags — on real
`torchrun` jobs of the training CLI, with the fault injection of megalong/faults.py."""

import json
import math
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from megalong.errors import MegalongError
from megalong.runtime import free_port
from megalong.spawn import run_on_ranks
from test_training import ENTRY, train_args, train_layouts
from megalong.config.parallel import ParallelConfig


@pytest.mark.slow
def test_non_finite_loss_skips_the_step_and_too_many_stop_the_run(tiny_megatron_ckpt, corpus,
                                                                  sp_model, tmp_path):
    base = train_args(tiny_megatron_ckpt, corpus, sp_model, "--lr-warmup-iters", "0")
    (clean,), = run_on_ranks(train_layouts, 1, [base])
    (with_nan,), = run_on_ranks(train_layouts, 1, [base], env={"MEGALONG_FAULT_NAN_LOSS": "2"})
    assert math.isnan(with_nan[2]) and not any(math.isnan(x) for x in with_nan[:2] + with_nan[3:])
    assert with_nan[:2] == clean[:2]
    # The skipped step left the weights alone: step 3 sees the weights after step 1, so it
    # differs from the clean run, which has taken one more update by then.
    assert with_nan[3] != clean[3]

    save = str(tmp_path / "stopped")
    with pytest.raises(MegalongError, match="3 steps in a row had a non-finite loss"):
        run_on_ranks(train_layouts, 1, [base + ["--max-skipped-steps", "2", "--save", save]],
                     env={"MEGALONG_FAULT_NAN_LOSS": "1,2,3"})
    from megalong.config.checkpoint import latest_iteration

    assert latest_iteration(save) == 4


# ---------------------------------------------------------------- launching real jobs


@dataclass
class Job:
    returncode: int
    stderr: str
    losses: dict  # iteration -> exact loss (MEGALONG_TEST_LOSS_LOG)


def launch(argv, tmp_path, name, *, nproc=2, env=None, timeout=420) -> Job:
    """The training CLI under torchrun (nproc ranks, gloo on CPU), in its own session. Output
    goes to files, not pipes, and the session is killed afterwards, so nothing a killed rank
    left behind can keep the test waiting."""
    losses_path, log_path = tmp_path / f"{name}.losses", tmp_path / f"{name}.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), ENTRY, *argv]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGALONG_DEVICE": "cpu",
                "MEGALONG_TEST_LOSS_LOG": str(losses_path), **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            _kill_session(proc.pid)
    losses = {}
    if losses_path.exists():
        for line in losses_path.read_text().splitlines():
            record = json.loads(line)
            losses.setdefault(record["iteration"], []).append(record["loss"])
    return Job(returncode, log_path.read_text(), losses)


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tracker(root) -> int:
    from megalong.config.checkpoint import latest_iteration

    return latest_iteration(str(root))


def _weights_equal_then_damage_is_caught(reference, resumed, damaged_file):
    """On one rank: the final weights of two checkpoints are bitwise equal; then a flipped byte
    in the resumed run's latest checkpoint is an error naming the file, and fallback=True loads
    the previous iteration; a truncated file is caught the same way."""
    import torch

    from megalong import runtime
    from megalong.checkpoint import load_checkpoint
    from megalong.build import load_model
    from megalong.source import resolve_model_source

    runtime.init_distributed(ParallelConfig())
    models = [load_model(resolve_model_source(load=path)) for path in (reference, resumed)]
    a, b = (m.state_dict() for m in models)
    tensors = [k for k in a if isinstance(a[k], torch.Tensor) and not k.endswith("_extra_state")]
    unequal = [k for k in tensors if not torch.equal(a[k], b[k])]
    outcome = {"compared": len(tensors), "unequal": unequal, "keys_match": set(a) == set(b)}

    with open(damaged_file, "r+b") as handle:  # flip one byte in the middle
        handle.seek(os.path.getsize(damaged_file) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    try:
        load_checkpoint([models[1]], resumed)
        outcome["flipped"] = "loaded"
    except MegalongError as err:
        outcome["flipped"] = str(err)
    outcome["fallback_iteration"] = load_checkpoint([models[1]], resumed, fallback=True)[0]
    with open(damaged_file, "r+b") as handle:
        handle.truncate(os.path.getsize(damaged_file) - 10)
    try:
        load_checkpoint([models[1]], resumed)
        outcome["truncated"] = "loaded"
    except MegalongError as err:
        outcome["truncated"] = str(err)
    return outcome


# ---------------------------------------------------------------- SIGKILL, SIGTERM, resume

ITERS, INTERVAL = 10, 2


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tiny_megatron_ckpt, corpus, sp_model,
                                                            tmp_path):
    """Three SIGKILLs at seeded points (after a step; in the middle of writing a checkpoint;
    after another step), each on a seeded rank or on both, then a SIGTERM with
    --exit-signal-handler, and a last resume from a damaged checkpoint with --load-fallback: every
    loss ever logged and the final weights equal the uninterrupted run's bit for bit."""
    rng = random.Random(9)
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    flags = ["--save-interval", str(INTERVAL), "--exit-signal-handler"]
    reference = launch([*train_args(tiny_megatron_ckpt, corpus, sp_model, *flags, iters=ITERS),
                        "--save", str(reference_dir)], tmp_path, "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert sorted(reference.losses) == list(range(1, ITERS + 1))
    expected = {i: values[0] for i, values in reference.losses.items()}
    final_files = sorted(os.listdir(reference_dir / f"iter_{ITERS:07d}"))
    assert "manifest.json" in final_files

    def start_args():  # from the base model at first, then resuming from run_dir
        load = str(run_dir) if (run_dir / "latest_checkpointed_iteration.txt").exists() \
            else tiny_megatron_ckpt
        return [*train_args(load, corpus, sp_model, *flags, iters=ITERS), "--save", str(run_dir)]

    def rank_choice():
        return rng.choice(["0", "1", ""])  # "" = every rank

    seen = {}
    jobs = []

    def run(name, env, extra=()):
        job = launch([*start_args(), *extra], tmp_path, name, env=env)
        jobs.append((name, env, job))
        for iteration, values in job.losses.items():
            seen.setdefault(iteration, []).extend(values)
        return job

    def killed_after(job, iteration):
        # The killed rank says so itself. (Rank 0, which records the losses, may be stopped by
        # torchrun before it records the last step when rank 1 is the one killed.)
        return (f"after iteration {iteration}\n" in job.stderr and "fault injection: SIGKILL"
                in job.stderr and max(job.losses, default=0) <= iteration)

    def describe():
        return "; ".join(f"{name} {env} rc={job.returncode}" for name, env, job in jobs)

    # 1. SIGKILL after a step between two checkpoints.
    kill = rng.randint(INTERVAL + 1, 2 * INTERVAL)
    job = run("kill-1", {"MEGALONG_FAULT_KILL_AT_ITER": str(kill), "MEGALONG_FAULT_RANK": rank_choice()})
    assert job.returncode != 0 and killed_after(job, kill), (describe(), job.stderr[-3000:])
    assert _tracker(run_dir) == (kill - 1) // INTERVAL * INTERVAL

    # 2. SIGKILL in the middle of writing a checkpoint: after k of its writes (its files, then
    #    the manifest, the rename), before the tracker names it.
    resumed = _tracker(run_dir)
    at = rng.randrange(resumed + INTERVAL, ITERS - INTERVAL + 1, INTERVAL)
    writes = rng.randint(1, len(final_files) + 1)
    # Rank 0 makes every write after the shards, so the fault acts on it (or on every rank).
    job = run("kill-in-checkpoint", {"MEGALONG_FAULT_KILL_AFTER_CKPT_FILES": f"{writes}@{at}",
                                     "MEGALONG_FAULT_RANK": rng.choice(["0", ""])})
    half_written = [p for p in (run_dir / f"iter_{at:07d}.tmp", run_dir / f"iter_{at:07d}")
                    if p.exists()]
    assert job.returncode != 0 and max(job.losses) == at, (describe(), job.stderr[-3000:])
    assert "fault injection: SIGKILL" in job.stderr and half_written, describe()
    assert _tracker(run_dir) == at - INTERVAL, describe()

    # 3. SIGKILL after another step.
    resumed = _tracker(run_dir)
    kill = rng.randint(resumed + 1, ITERS - 1)
    job = run("kill-2", {"MEGALONG_FAULT_KILL_AT_ITER": str(kill), "MEGALONG_FAULT_RANK": rank_choice()})
    assert job.returncode != 0 and killed_after(job, kill), (describe(), job.stderr[-3000:])

    # 4. SIGTERM on one rank: every rank saves at that step and the job exits with 0.
    resumed = _tracker(run_dir)
    stop = rng.randint(resumed + 1, ITERS - 1)
    job = run("sigterm", {"MEGALONG_FAULT_SIGTERM_AT_ITER": str(stop),
                          "MEGALONG_FAULT_RANK": rng.choice(["0", "1"])})
    assert job.returncode == 0, (describe(), job.stderr[-3000:])
    assert f"exiting at iteration {stop} as requested" in job.stderr
    assert _tracker(run_dir) == stop and max(job.losses) == stop

    # 5. A byte of the latest checkpoint flips on disk: --load-fallback resumes from the one before.
    names = sorted(n for n in os.listdir(run_dir / f"iter_{stop:07d}") if n != "megalong.json"
                   and n != "manifest.json")
    flipped = run_dir / f"iter_{stop:07d}" / rng.choice(names)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01
    flipped.write_bytes(bytes(data))
    job = run("fallback", {}, ["--load-fallback"])
    assert job.returncode == 0, (describe(), job.stderr[-3000:])
    assert str(flipped) in job.stderr and "trying an older checkpoint" in job.stderr, job.stderr[-3000:]
    assert min(job.losses) <= stop, "resumed from an older checkpoint"

    assert sorted(seen) == list(range(1, ITERS + 1)), describe()
    different = {i: (values, expected[i]) for i, values in seen.items()
                 if any(v != expected[i] for v in values)}
    assert not different, (different, describe())
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]

    damaged = run_dir / f"iter_{ITERS:07d}" / "__0_0.distcp"
    (outcome,) = run_on_ranks(_weights_equal_then_damage_is_caught, 1, str(reference_dir),
                              str(run_dir), str(damaged))
    assert outcome["keys_match"] and outcome["compared"] > 10 and not outcome["unequal"], outcome
    assert str(damaged) in outcome["flipped"] and "CRC-32" in outcome["flipped"], outcome
    assert "--load-fallback" in outcome["flipped"]
    assert outcome["fallback_iteration"] == ITERS - INTERVAL
    assert str(damaged) in outcome["truncated"] and "truncated" in outcome["truncated"], outcome


# ---------------------------------------------------------------- distributed hygiene


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_hung_rank_times_out_and_brings_the_job_down(tiny_megatron_ckpt, corpus, sp_model,
                                                       tmp_path):
    argv = [*train_args(tiny_megatron_ckpt, corpus, sp_model, iters=6),
            "--distributed-timeout-minutes", "0.25"]  # short, yet above start-up skews
    job = launch(argv, tmp_path, "hang", env={"MEGALONG_FAULT_HANG_AT_ITER": "2",
                                              "MEGALONG_FAULT_RANK": "1"})
    assert job.returncode != 0, job.stderr[-3000:]  # instead of waiting an hour for rank 1
    assert "rank 1 hangs after iteration 2" in job.stderr
    errors = [line for line in job.stderr.splitlines() if line.startswith("error: rank 0")]
    assert errors and "a collective operation failed" in errors[0], job.stderr[-3000:]
    assert "--distributed-timeout-minutes 0.25" in errors[0]
    assert max(job.losses) == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ranks_launched_with_different_flags_stop_with_a_clear_message(tiny_megatron_ckpt, corpus,
                                                                      sp_model, tmp_path):
    """Two nodes of one job (one process each, as srun or two torchrun calls start them) whose
    command lines differ in --lr: both stop at start-up, naming the flag, instead of training
    different things or hanging in mismatched collectives."""
    port = str(free_port())
    procs = []
    for rank, lr in enumerate(["2e-4", "3e-4"]):
        argv = train_args(tiny_megatron_ckpt, corpus, sp_model)
        argv[argv.index("--lr") + 1] = lr
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGALONG_DEVICE": "cpu", "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        log = open(tmp_path / f"node{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, ENTRY, *argv], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    for proc, log in procs:
        try:
            assert proc.wait(timeout=300) == 2
        finally:
            _kill_session(proc.pid)
            log.close()
    for rank in (0, 1):
        lines = (tmp_path / f"node{rank}.log").read_text().strip().splitlines()
        assert lines[-1].startswith("error: the ranks disagree on the configuration: --lr "
                                    "0.0002 on rank 0 but 0.0003 on rank 1"), lines[-5:]
        assert not any("Traceback" in line for line in lines)
