"""What :func:`~lrprune_caffe.train.finetune.finetune` runs on: data loaders, processes, checkpoints.

* **Batches.** :class:`EpochBatches` is a torch batch sampler. Epoch ``e`` visits
  the ``e``-th permutation drawn from ``numpy.random.default_rng(seed)``
  (replayed on resume), cut into *global* batches of ``batch_size x world``;
  process ``rank`` takes its contiguous slice of each. So ``world`` processes
  at ``batch_size`` see, step by step, exactly the samples one process sees at
  ``batch_size x world``, and (DistributedDataParallel averaging the processes'
  mean-loss gradients) take the same steps, up to float summation order. A last
  global batch not divisible by ``world`` is topped up from the permutation's
  start, as torch's DistributedSampler pads.
* **Loaders.** :func:`train_loader`: a ``torch.utils.data.DataLoader`` over a
  :class:`~lrprune_caffe.data.stream.StreamDataset` with ``workers`` decoding
  processes (spawned, persistent); memory holds a few batches, not the dataset.
  The sampler yields ``(epoch, index)`` pairs, so a TRAIN crop/mirror depends on
  the sample and the epoch only, not on which process decodes it. A LevelDB (one
  opener per database) is read in the main process by :class:`RawBatches`, raw
  records only; the workers decode them.
* **Processes.** :func:`dist_context` joins the process group torchrun set up
  (``WORLD_SIZE``/``RANK`` in the environment): gloo on CPU, NCCL on CUDA
  (:func:`backend_for`); :meth:`Dist.share` hands rank 0's objects to the others.
  :func:`launch_local` starts the processes on one machine as ``torchrun
  --standalone`` does (``--nproc-per-node``), with the CLI's exit statuses.
* **Checkpoints.** :func:`save_checkpoint` writes parameters, solver history,
  iteration, epoch, RNG state and the history so far, atomically (a kill during
  the write leaves the previous checkpoint); :func:`load_checkpoint` checks that
  it belongs to the same run settings. :class:`RunCheckpoint` is one file holding a
  caller's state beside finetune's (the pipeline: its rounds, the round's net and masks).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from lrprune_caffe.errors import BadFileError, UserError
from . import require_torch


class EpochBatches:
    """Batch sampler: this process's index lists of one epoch (see the module doc)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = int(n), int(batch_size), int(seed), rank, world
        self.epoch = 1
        self._rng, self._drawn, self._perm = None, 0, None

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def permutation(self) -> np.ndarray:
        if self._rng is None or self._drawn > self.epoch:
            self._rng, self._drawn = np.random.default_rng(self.seed), 0
        while self._drawn < self.epoch:
            self._perm = self._rng.permutation(self.n)
            self._drawn += 1
        return self._perm

    def __len__(self):
        return math.ceil(self.n / (self.batch_size * self.world))

    def __iter__(self):
        perm = self.permutation()
        gb = self.batch_size * self.world
        for s in range(0, self.n, gb):
            chunk = perm[s:s + gb]
            if len(chunk) % self.world:
                need = self.world - len(chunk) % self.world
                chunk = np.concatenate([chunk, np.resize(perm, need)])
            k = len(chunk) // self.world
            yield [(self.epoch, int(i)) for i in chunk[self.rank * k:(self.rank + 1) * k]]


def collate(samples):
    torch = require_torch()
    xs, ys = zip(*samples)
    return torch.from_numpy(np.stack(xs).astype(np.float32, copy=False)), torch.from_numpy(np.asarray(ys, np.int64))


class RawBatches:
    """A batch sampler for a source only this process may open (LevelDB): it runs here, in the
    DataLoader's main process, reads each sample's raw record (bytes, no decoding) and hands
    ``(epoch, index, record)`` to the workers, which decode and transform it without opening the
    database. The loader's prefetch bounds how far it reads ahead (a few batches)."""

    def __init__(self, sampler: EpochBatches, ds):
        self.sampler, self.ds = sampler, ds

    def set_epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        raw = self.ds.records.raw
        for batch in self.sampler:
            yield [(e, i, raw(i)) for e, i in batch]


def train_loader(ds, sampler: EpochBatches, workers: int = 0):
    """A DataLoader over ``ds`` with ``sampler``; ``workers`` processes decode (0: this process).
    A source that one process alone may open (LevelDB) is read here and decoded by the workers
    (:class:`RawBatches`)."""
    torch = require_torch()
    if not workers:
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=0, collate_fn=collate)
    if not ds.multiprocess:
        if not hasattr(ds.records, "raw"):
            raise UserError(f"{ds.source}: this source can be read in one process only; run with --workers 0")
        sampler = RawBatches(sampler, ds)
    # spawned, not forked: LMDB environments and HDF5 files must not cross a fork; kept for the whole
    # run (the sampler hands each index with its epoch, so the workers need no other state)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=int(workers), collate_fn=collate,
                                       persistent_workers=True, multiprocessing_context="spawn")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    backend: str = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values):
        """Sum of a list of numbers over the processes."""
        if self.world == 1:
            return list(values)
        torch = require_torch()
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device="cuda" if self.backend == "nccl" else "cpu")
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        return bool(self.all_sum([1.0 if flag else 0.0])[0] > 0)

    def close(self):
        """Leave the process group (every process together): a process that then ends with an
        error exits as it says, not aborted by the group's threads at interpreter exit."""
        if self.world > 1:
            torch = require_torch()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def share(self, obj):
        """Rank 0's ``obj`` (any picklable value), on every process."""
        if self.world == 1:
            return obj
        torch = require_torch()
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0,
                                                device=torch.device(self.device) if self.backend == "nccl" else None)
        return box[0]


def process_rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", "0") or 0)


#: how long a process waits for the others at a collective: the pipeline's rank 0 compresses
#: (and evaluates, writes) alone while the others wait, which may take longer than torch's 30 minutes
DIST_TIMEOUT_S = 6 * 3600


def backend_for(device: str) -> str:
    """The process group's backend for a device: NCCL for cuda, gloo for cpu."""
    device = device or "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: choose cpu or cuda")
    return "nccl" if device.startswith("cuda") else "gloo"


def check_device(device: str = "cpu") -> str:
    """``device`` (cpu or cuda), or a one-line UserError when cuda is asked for and torch sees no GPU."""
    torch = require_torch()
    device = device or "cpu"
    backend_for(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                        "use --device cpu")
    return device


def dist_context(device: str = "cpu") -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    torch = require_torch()
    device = check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist(0, 1, device)
    dist = torch.distributed
    backend = backend_for(device)
    if not dist.is_initialized():
        import datetime
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))
    rank = dist.get_rank()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return Dist(rank, dist.get_world_size(), device, backend)


def launch_local(argv, nproc: int, poll_s: float = 0.1) -> int:
    """Run ``python -m lrprune_caffe ARGV`` in ``nproc`` processes on this machine, set up as
    ``torchrun --standalone`` sets them up (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT on a
    free local port). Rank 0 talks to the console; the others' stderr is kept and shown only when
    one of them fails alone. When any process fails the others are stopped (they would wait for
    it at the next collective) and its exit status is returned: a bad input still ends with one
    line and status 2."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK="0", ROLE_WORLD_SIZE=str(nproc))
    procs, logs = [], []
    try:
        for rank in range(int(nproc)):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
            log = None if rank == 0 else tempfile.TemporaryFile("w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "lrprune_caffe", *argv], env=env,
                                          stdout=None if rank == 0 else subprocess.DEVNULL, stderr=log))
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is None:
                time.sleep(poll_s)
        if failed is None:
            failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
        if failed is None:
            return 0
        if failed != 0:  # rank 0 may be failing on the same input: its message is the one shown
            try:
                procs[0].wait(timeout=5)
            except subprocess.TimeoutExpired:  # waiting for the failed rank at a collective: stop it first,
                procs[0].terminate()            # so that nothing it prints can follow the failed rank's lines
                procs[0].wait()
            if procs[0].returncode > 0:
                failed = 0
        if failed != 0 and logs[failed] is not None:
            logs[failed].seek(0)
            sys.stderr.write("".join(logs[failed].readlines()[-20:]))
        code = procs[failed].returncode
        return code if code > 0 else 128 - code  # killed by a signal: 128 + its number, as a shell says
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            if log is not None:
                log.close()


def wrap_ddp(model, d: Dist):
    """The module to call for training: DistributedDataParallel over ``model`` with several processes."""
    if d.world == 1:
        return model
    import warnings
    torch = require_torch()
    with warnings.catch_warnings():  # newer torch renames broadcast_buffers; the old name keeps its meaning
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if d.backend == "gloo" else [torch.device(d.device).index],
            broadcast_buffers=False, find_unused_parameters=True)


# ---- checkpoints -------------------------------------------------------------

def run_key(**settings) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    return {k: settings[k] for k in sorted(settings)}


FINETUNE_FORMAT = "lrprune-caffe finetune checkpoint 1"
RUN_FORMAT = "lrprune-caffe pipeline checkpoint 1"


class RunCheckpoint:
    """A checkpoint file that carries a caller's state beside finetune's: the pipeline's rounds.

    Passed to :func:`~lrprune_caffe.train.finetune.finetune` as its ``checkpoint`` (it is used
    as a path, ``str()``), it makes :func:`save_checkpoint` write ``{"run": self.run, "finetune":
    <finetune's state>}`` into one file and :func:`load_checkpoint` return the finetune part. The
    caller sets :attr:`run` before each write (:meth:`save` writes it without a finetune part).
    ``key``: the run's fingerprint (:func:`run_key`), checked by :meth:`load`; ``loaded``: the state
    read by :meth:`load` (or handed over by rank 0), from which finetune's resume takes its part.
    """

    def __init__(self, path, key: dict):
        self.path, self.key, self.run, self.loaded = str(path), key, None, None

    def __str__(self):
        return self.path

    __fspath__ = __str__

    def save(self, finetune_state=None):
        _write_atomic(self.path, {"format": RUN_FORMAT, "key": self.key, "run": self.run,
                                  "finetune": finetune_state})

    def load(self) -> dict:
        """The state in the file (``None`` when there is none), checked to be of this run."""
        if not os.path.exists(self.path):
            return None
        self.loaded = _read(self.path, RUN_FORMAT, "a pipeline checkpoint")
        _check_key(self.path, self.loaded["key"], self.key)
        return self.loaded


def _write_atomic(path, state):
    """torch.save to ``path`` through a temporary file beside it: a kill leaves the previous file."""
    torch = require_torch()
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path, fmt, what):
    torch = require_torch()
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise BadFileError(f"cannot read the checkpoint: {e}", path=path) from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise BadFileError(f"not {what}", path=path)
    return state


def _check_key(path, have: dict, key: dict):
    diff = [k for k in key if have.get(k) != key[k]]
    if diff:
        was = ", ".join(f"{k} {have.get(k)!r} (now {key[k]!r})" for k in diff)
        raise UserError(f"{path}: the checkpoint is of another run: {was}")


def save_checkpoint(path, model, opt, it, epoch, history, key: dict):
    torch = require_torch()
    state = {"format": FINETUNE_FORMAT, "key": key, "iteration": int(it),
             "epoch": int(epoch), "params": [p.detach().cpu() for p in model.params],
             "history": [h.detach().cpu() for h in opt.history],
             "history2": None if opt.history2 is None else [h.detach().cpu() for h in opt.history2],
             "torch_rng": torch.get_rng_state(), "log": history}
    if isinstance(path, RunCheckpoint):
        path.save(state)
    else:
        _write_atomic(path, state)


def load_checkpoint(path, key: dict) -> dict:
    if isinstance(path, RunCheckpoint):
        state = (path.loaded or {}).get("finetune")
        if state is None:
            raise BadFileError("the checkpoint holds no fine-tuning state to resume", path=path)
    else:
        state = _read(path, FINETUNE_FORMAT, "a finetune checkpoint")
    _check_key(path, state["key"], key)
    return state


def restore(state, model, opt):
    torch = require_torch()
    with torch.no_grad():
        for p, v in zip(model.params, state["params"]):
            p.copy_(v.to(p.device))
        for h, v in zip(opt.history, state["history"]):
            h.copy_(v.to(h.device))
        if opt.history2 is not None and state["history2"] is not None:
            for h, v in zip(opt.history2, state["history2"]):
                h.copy_(v.to(h.device))
    torch.set_rng_state(state["torch_rng"])


__all__ = ["EpochBatches", "RawBatches", "train_loader", "backend_for", "check_device",
           "collate", "Dist", "dist_context", "launch_local", "wrap_ddp", "process_rank",
           "save_checkpoint", "load_checkpoint", "restore", "run_key", "RunCheckpoint"]
