"""Two-process (gloo, CPU) MoCo-v2 training with shuffle-BN under ``torchrun``, against one process.

The criterion, and why it is sound without being flaky. Both runs see the same global batches
(the sampler deals the same shuffled indices to the ranks), start from the same weights and queue
(rank 0's, broadcast), and follow the same schedule. What legitimately differs is BatchNorm: each
rank normalises over its own 8 images (keys over a shuffled 8 drawn from both ranks) instead of
16, and that changes the losses a little from step 1 on. So we check

* exactly: the same steps, epochs and learning rates (step accounting, sampler, schedule);
* exactly: both ranks start from the same state, queue included, and end with the same
  parameters and queue (gradient all-reduce, key all-gather); only the BatchNorm running
  statistics may differ at the end (each rank keeps its own);
* within a band: at step 1, where only the BN batch differs, the losses agree within 5%
  (measured: under 1%); at every step within 15% (measured: at most 5%), and both curves move
  in the same direction from the first to the last step (a young queue of random keys is easy,
  so the loss rises towards log(K + 1) as real keys replace them).

The runs are deterministic (one thread, fp32, seeded), so the bands only absorb platform
differences, not randomness.
"""

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from objcrop.data.synth import synthesize
from objcrop.ssl.config import load_config
from objcrop.ssl.trainer import Trainer
from tests.conftest import as_overrides

pytestmark = pytest.mark.slow

SCRIPT = """
import os, sys, torch
from objcrop.ssl.config import load_config
from objcrop.ssl.trainer import Trainer

config = load_config(None, sys.argv[1:])
out, rank = config["train"]["out"], int(os.environ.get("RANK", "0"))
trainer = Trainer(config)
os.makedirs(out, exist_ok=True)
torch.save(trainer.method.state_dict(), os.path.join(out, f"init{rank}.pt"))
trainer.fit()
torch.save(trainer.method.state_dict(), os.path.join(out, f"rank{rank}.pt"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _settings(tmp_path: Path) -> dict:
    synthesize(tmp_path / "scenes", num_images=64, seed=0, size=40, progress=False)
    return {
        "data.annotations": str(tmp_path / "scenes" / "train.json"),
        "data.images": str(tmp_path / "scenes" / "images"),
        "crops.size": 32,
        "method.backbone": "resnet18",
        "method.dim": 16,
        "method.hidden_dim": 32,
        "method.queue_size": 64,
        "method.shuffle_bn": True,
        "optim.batch_size": 16,
        "optim.lr_reference_batch": 16,
        "optim.epochs": 2,
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.workers": 0,
        "train.threads": 1,
        "train.deterministic": True,
        "train.log_every_steps": 1,
        "train.checkpoint_every_steps": 100,
        "train.tensorboard": False,
        "train.progress": False,
    }


def _torchrun(script: str, tmp_path: Path, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``script`` under ``torchrun --nproc_per_node 2`` (gloo on the CPU) with ``args``."""
    path = tmp_path / f"script-{abs(hash(script))}.py"
    path.write_text(textwrap.dedent(script), encoding="utf-8")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(path)]
    return subprocess.run(
        [*launch, *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_two_gloo_processes_with_shuffle_bn_track_one_process(tmp_path):
    overrides = as_overrides(_settings(tmp_path))
    ddp_out = tmp_path / "ddp"
    done = _torchrun(SCRIPT, tmp_path, [*overrides, f"train.out={ddp_out}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        single_out = tmp_path / "single"
        Trainer(load_config(None, [*overrides, f"train.out={single_out}"])).fit()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)

    ddp, single = rows(ddp_out), rows(single_out)
    assert len(single) == 6  # 51 images // 16 = 3 steps per epoch, 2 epochs
    for key in ("step", "epoch", "lr"):
        assert [r[key] for r in ddp] == [r[key] for r in single], key
    ddp_loss = torch.tensor([float(r["loss"]) for r in ddp])
    single_loss = torch.tensor([float(r["loss"]) for r in single])
    assert torch.isfinite(ddp_loss).all() and torch.isfinite(single_loss).all()
    relative = (ddp_loss - single_loss).abs() / single_loss
    assert relative[0] < 0.05, (ddp_loss, single_loss)
    assert (relative < 0.15).all(), (ddp_loss, single_loss)
    assert torch.sign(ddp_loss[-1] - ddp_loss[0]) == torch.sign(single_loss[-1] - single_loss[0])

    init0, init1 = (torch.load(ddp_out / f"init{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(init0[k], init1[k]) for k in init0)  # the random initial queue too
    rank0, rank1 = (torch.load(ddp_out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    running = ("running_mean", "running_var", "num_batches_tracked")
    differ = [k for k in rank0 if not k.endswith(running) and not torch.equal(rank0[k], rank1[k])]
    assert not differ, differ[:5]
    assert any(not torch.equal(rank0[k], rank1[k]) for k in rank0 if k.endswith("running_mean"))


# Each rank records, at the start of every step, a digest of its global torch and numpy generators, and can be
# interrupted (KeyboardInterrupt on both ranks, before the step's first collective) when INTERRUPT_AT steps are done.
RESUME_SCRIPT = """
import hashlib, json, os, sys
import numpy as np, torch
from objcrop.ssl.config import load_config
from objcrop.ssl.trainer import Trainer

config = load_config(None, sys.argv[1:])
out, rank = config["train"]["out"], int(os.environ["RANK"])
interrupt_at = int(os.environ.get("INTERRUPT_AT", "-1"))
digests = {}
step = Trainer.train_step

def recording_step(self, batch):
    if self.step == interrupt_at:
        raise KeyboardInterrupt
    state = torch.get_rng_state().numpy().tobytes() + np.random.get_state()[1].tobytes()
    digests[self.step + 1] = hashlib.sha256(state).hexdigest()
    return step(self, batch)

Trainer.train_step = recording_step
trainer = Trainer(config)
try:
    result = trainer.fit()
finally:
    with open(os.path.join(out, f"rng-{os.environ['RUN']}-rank{rank}.json"), "w") as f:
        json.dump(digests, f)
torch.save(trainer.method.state_dict(), os.path.join(out, f"final-rank{rank}.pt"))
with open(os.path.join(out, f"resumed-rank{rank}.txt"), "w") as f:
    f.write(result.resumed_from)
"""


def test_two_processes_interrupted_and_resumed_equal_the_uninterrupted_run_rank_by_rank(tmp_path):
    """Every rank's RNG state is saved and given back to that rank: after a resume, each rank's global generators
    are where they were in the uninterrupted run at the same step, and each rank ends tensor-equal to it (BN
    running statistics included, which differ between the ranks)."""
    settings = {**_settings(tmp_path), "optim.max_steps": 5, "train.checkpoint_every_steps": 2, "train.keep_last": 9}
    reference, run = tmp_path / "reference", tmp_path / "run"
    done = _torchrun(RESUME_SCRIPT, tmp_path, [*as_overrides(settings), f"train.out={reference}"], {"RUN": "ref"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stopped = _torchrun(
        RESUME_SCRIPT, tmp_path, [*as_overrides(settings), f"train.out={run}"], {"RUN": "first", "INTERRUPT_AT": "2"}
    )
    assert stopped.returncode != 0 and "KeyboardInterrupt" in stopped.stderr
    assert not (run / "final-rank0.pt").exists()
    done = _torchrun(RESUME_SCRIPT, tmp_path, [*as_overrides(settings), f"train.out={run}"], {"RUN": "resumed"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    checkpoint = torch.load(run / "checkpoints" / "ckpt-00000002.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])  # seeded seed + rank
    own = checkpoint["rank_buffers"]  # each rank's BN running statistics (the model holds rank 0's)
    assert own[0].keys() == own[1].keys() and any("running_mean" in k for k in own[0])
    assert all(torch.equal(v, checkpoint["model"][k]) for k, v in own[0].items())
    assert any(not torch.equal(v, own[0][k]) for k, v in own[1].items())
    for rank in (0, 1):
        assert Path((run / f"resumed-rank{rank}.txt").read_text()).name == "ckpt-00000002.pt"
        uninterrupted = json.loads((reference / f"rng-ref-rank{rank}.json").read_text())
        first = json.loads((run / f"rng-first-rank{rank}.json").read_text())
        resumed = json.loads((run / f"rng-resumed-rank{rank}.json").read_text())
        assert sorted(first) == ["1", "2"] and sorted(resumed) == ["3", "4", "5"]  # resumed mid-epoch (3 steps each)
        assert {**first, **resumed} == uninterrupted, rank
        ref_state = torch.load(reference / f"final-rank{rank}.pt", weights_only=True)
        run_state = torch.load(run / f"final-rank{rank}.pt", weights_only=True)
        assert [k for k in ref_state if not torch.equal(ref_state[k], run_state[k])] == [], rank

    def logged(out: Path) -> list[dict]:  # all but the throughput, a timing
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows(out)]

    assert logged(run) == logged(reference)  # steps 1-5: losses, accuracies, lr, momentum
