"""Two processes on the CPU (gloo) train like one process with the combined batch.

What "matches" means here: under DistributedDataParallel each of the 2 ranks takes
a per-rank batch of B samples and the gradients are averaged, which is the
gradient of one process on a batch of 2B. The distributed sampler deals out one
shared shuffled order (rank r gets positions r, r+2, ...), so step i of the two
ranks together covers exactly the samples that one process with batch 2B sees at
step i. With no batch norm (its statistics would be per rank), no dropout (each
rank draws its own), float32 and equal per-rank batches, the two runs differ only
by the order of floating-point additions: weights must agree within 1e-4
(absolute) after 3 epochs, and both ranks must hold identical weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import torch

from helpers import distributed

TOLERANCE = 1e-4

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from helpers import train
    from helpers.models import build_model
    from helpers.distributed import context

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 12, 12, 12, generator=g)
        y = torch.arange(n) % 2
        x[y == 1, :, 4:7, 4:7, 4:7] += 2.0
        return train.TensorData(x, y)

    out, batch = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = build_model("cnn", 1, 2, dims=3, depth=2, width=4, norm=False, dropout=0.0)
    cfg = train.TrainConfig(epochs=3, batch_size=batch, lr=3e-3, patience=None, mixed_precision=False,
                            class_weighting=False)
    last = {}
    def keep_last(epoch, history):
        last["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train.fit(model, data(32, 1), data(8, 2), cfg, progress=False, live_plot=False, on_epoch_end=keep_last,
              device=torch.device("cpu"))
    torch.save(last["state"], f"{out}/rank{context().rank}.pt")
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, nproc: int, batch: int) -> None:
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"n{nproc}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BRAINMRI_DEVICE": "cpu"}
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out), str(batch)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(out), str(batch)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_two_cpu_processes_match_one_process_with_the_combined_batch(tmp_path):
    two = run(tmp_path, nproc=2, batch=4)
    one = run(tmp_path, nproc=1, batch=8)
    rank0 = torch.load(two / "rank0.pt", weights_only=True)
    rank1 = torch.load(two / "rank1.pt", weights_only=True)
    single = torch.load(one / "rank0.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        diff = (rank0[key] - single[key]).abs().max().item()
        print(f"{key}: largest difference 2 vs 1 process {diff:.2e}")
        assert diff < TOLERANCE, f"{key}: 2 processes differ from 1 by {diff}"
    # and training did move the weights (so the comparison means something)
    torch.manual_seed(0)
    from helpers.models import build_model

    init = build_model("cnn", 1, 2, dims=3, depth=2, width=4, norm=False, dropout=0.0).state_dict()
    assert max((init[k] - single[k]).abs().max().item() for k in init) > 10 * TOLERANCE


def test_outside_torchrun_the_context_is_a_single_process(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.local_device(torch.device("cpu"), ctx) == torch.device("cpu")
    assert distributed.broadcast_flag(True, torch.device("cpu"), ctx) is True


def test_torchrun_variables_are_read(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    ctx = distributed.context()
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.is_main) == (3, 1, 4, False)
