"""No lost work: a training run killed with SIGKILL resumes from last.ckpt (``--ckpt_path last``)
to the same step count, optimizer state, data position and per-step losses as a run that
was never interrupted; checkpoints are written atomically."""
import csv
import glob
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO

TOLERANCE = 1e-6  # measured: the resumed losses equal the uninterrupted ones exactly on CPU (max |diff| 0.0)
MAX_STEPS, EVERY = 12, 4


def _args(root, data_class):
    return [sys.executable, "-m", "starkit", "fit", "--config", os.path.join(REPO, "recipes/generator/tiny.yaml"),
            f"--trainer.default_root_dir={root}", f"--trainer.max_steps={MAX_STEPS}", "--trainer.accelerator=cpu",
            "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
            "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={root}/ckpt", "--trainer.callbacks.save_last=true",
            f"--trainer.callbacks.every_n_train_steps={EVERY}", "--trainer.callbacks.save_top_k=-1",
            f"--data={data_class}", "--data.resolution=32", "--data.batch_size=4", "--data.num_train=24",
            "--data.num_val=4", "--data.num_workers=0"]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _losses(root):
    out = {}
    for path in glob.glob(os.path.join(root, "lightning_logs", "*", "metrics.csv")):
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def _run(root, data_class, extra=()):
    proc = subprocess.run(_args(root, data_class) + list(extra), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _killed_then_resumed(root, data_class):
    proc = subprocess.Popen(_args(root, data_class), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = os.path.join(root, "ckpt", "last.ckpt")
    deadline = time.time() + 240
    while not os.path.exists(last) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"
    killed_at = torch.load(last, weights_only=True)["global_step"]  # whole: written atomically
    assert 0 < killed_at < MAX_STEPS
    # (a kill mid-write may leave a .tmp file beside it; last.ckpt itself was loaded whole above)
    resumed = _run(root, data_class, ["--ckpt_path=last"])
    return killed_at, resumed


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    data_class = "starkit.data.ShapesDataModule"  # the shipped module: its training loader resumes mid-epoch
    _run(str(tmp_path / "ref"), data_class)
    killed_at, _ = _killed_then_resumed(str(tmp_path / "run"), data_class)
    ref, run = _losses(str(tmp_path / "ref")), _losses(str(tmp_path / "run"))
    assert sorted(ref) == list(range(MAX_STEPS))
    # the killed run may lose CSV rows it had not flushed; the resumed run logs every step it trains
    assert set(range(killed_at, MAX_STEPS)) <= set(run)
    ref_ckpt = torch.load(tmp_path / "ref" / "ckpt" / "last.ckpt", weights_only=True)
    run_ckpt = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    assert ref_ckpt["global_step"] == run_ckpt["global_step"] == MAX_STEPS
    diffs = [abs(ref[s] - run[s]) for s in range(killed_at, MAX_STEPS)]
    print(f"killed at step {killed_at}; max |loss diff| after resume: {max(diffs):.3g}")
    assert max(diffs) <= TOLERANCE, diffs
    for key, value in ref_ckpt["state_dict"].items():
        torch.testing.assert_close(run_ckpt["state_dict"][key], value, rtol=0, atol=TOLERANCE)
    ref_opt, run_opt = ref_ckpt["optimizer_states"][0]["state"], run_ckpt["optimizer_states"][0]["state"]
    for idx, state in ref_opt.items():
        for name, value in state.items():
            torch.testing.assert_close(run_opt[idx][name], value, rtol=0, atol=TOLERANCE)
