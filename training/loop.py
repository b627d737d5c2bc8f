"""The DiffuMatting trainer's run and resume: the stages (training/unet_stage.py, training/head_stage.py)
behind one interface (training/stage.py), sharing one session (training/session.py), reported by
training/report.py.

Everything random is a pure function of (run.seed, stage, step, sample position): the data order, the
augmentations, the noise, the timesteps and caption dropout. A checkpoint therefore only needs the
weights, the optimizer state and the step to continue exactly; torchrun ranks each compute their own
share of the same global batch.

A non-finite loss (or gradient, or weights before a checkpoint) stops the run with a TrainError before
anything non-finite is written: the last good checkpoint stays the newest.
"""
from __future__ import annotations

import math
import resource
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..models.atomic import atomic_path
from . import config
from . import report
from . import state
from .head_stage import HeadStage
from .session import Session, TrainError
from .stage import Stage
from .unet_stage import UnetStage

STAGES: dict[str, type[Stage]] = {"unet": UnetStage, "head": HeadStage}


class Interrupt:
    """First Ctrl-C: finish the current step, write a checkpoint, exit. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)
        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:   # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class Trainer:
    def __init__(self, cfg: config.TrainConfig, dist, resume: str | None = None, log=None,
                 stop_after: int | None = None):
        self.cfg = cfg
        self.dist = dist
        self.session = Session(cfg, dist, log)
        self.out = Path(cfg.run.out)
        self.ckpt_root = self.out / "checkpoints"
        self.resume_path = resume
        self.stop_after = stop_after
        self.session_steps = 0
        self.stopped_early = False
        self.interrupt = Interrupt()
        self.measures: dict = {}
        self.final_losses: dict = {}
        self.timing: dict = {}
        self.files: dict = {}
        self.csv = report.CsvLog(self.out / "log.csv", enabled=dist.is_main)

    def log(self, *msg):
        self.session.log(*msg)

    # ------------------------------------------------------------------ checkpoints
    def save(self, stage: Stage, step: int, done: bool):
        tensors = stage.trainable_state()
        if not all_finite(tensors.values()):
            raise TrainError(f"the {stage.name} weights became non-finite by step {step}; nothing was written for "
                             f"it. {self._resume_hint(stage)}")
        run_state = {"done": done, "measures": self.measures, "final_losses": self.final_losses,
                     "config": self.cfg.to_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}
        if self.dist.is_main:
            path = state.save_checkpoint(self.ckpt_root, stage.name, step, tensors, stage.optimizer, run_state,
                                         self.cfg.run.keep_checkpoints)
            self.log(f"checkpoint {path}")
        self.dist.barrier()

    def _resume_hint(self, stage: Stage) -> str:
        last = state.latest_checkpoint(self.ckpt_root)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (f"Stopped: {where}. Lower {stage.name}.lr (now {stage.section.lr:g}) or the loss weights, then "
                f"{'continue with --resume' if last else 'start again'}.")

    def announce_checkpoint_size(self, stage: Stage):
        weights, opt = state.checkpoint_bytes(stage.trainable_state(), stage.params)
        keep = self.cfg.run.keep_checkpoints
        total = weights * keep + opt
        self.log(f"checkpoints of the {stage.name} stage: about {report.human_bytes(weights + opt)} each "
                 f"({report.human_bytes(weights)} weights + {report.human_bytes(opt)} optimizer state, kept in the "
                 f"newest only); with run.keep_checkpoints = {keep}: about {report.human_bytes(total)} on disk")
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.out).free
            if free < total:
                self.log(f"warning: only {report.human_bytes(free)} free in {self.out}: the checkpoints need about "
                         f"{report.human_bytes(total)}; free space or lower run.keep_checkpoints")

    def resume_point(self):
        """(((stage, checkpoint contents) to continue or None, [stages already done]), (stage, step) or None)."""
        if not self.resume_path:
            return (None, []), None
        if self.resume_path == "auto":
            path = state.latest_checkpoint(self.ckpt_root)
            if path is None:
                raise config.ConfigError(f"--resume: no checkpoint in {self.ckpt_root}; start without --resume")
        else:
            path = Path(self.resume_path)
        try:
            mt, ot, rng, st = state.read_checkpoint(path)
            old = config.from_dict(st["config"])
            stage, step = st["stage"], int(st["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise config.ConfigError(str(e) if isinstance(e, ValueError) else
                                     f"--resume {str(path)!r}: state.json lacks {e}; not a checkpoint of this "
                                     f"trainer") \
                from None
        changed = config.changed_identity(old, self.cfg)
        if changed:
            raise config.ConfigError(f"--resume {path.name}: these settings differ from the run being resumed and "
                                     f"would change its data or model: {', '.join(changed)}; resume with the same "
                                     f"values (or start a new run in another --out)")
        self.measures = dict(st.get("measures") or {})
        self.final_losses = dict(st.get("final_losses") or {})
        done = [s for s in self.cfg.run.stages if state.STAGE_ORDER[s] < state.STAGE_ORDER[stage]]
        if st.get("done"):
            done.append(stage)
            return (None, done), (stage, step)
        return ((stage, (mt, ot, rng, st)), done), (stage, step)

    # ------------------------------------------------------------------ one stage
    def _restore(self, stage: Stage, resume_state) -> int:
        mt, ot, rng, st = resume_state
        stage.load_trainable(mt)
        if ot is None:
            self.log(f"the checkpoint has no optimizer state (only the newest one keeps it): continuing "
                     f"{stage.name} with a fresh AdamW state (not bit-identical to an uninterrupted run)")
        else:
            state.load_optimizer(stage.optimizer, ot, st["optimizer"])
        state.restore_rng(rng)
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        start = int(st["step"])
        self.log(f"resumed {stage.name} at step {start}")
        return start

    def _check_finite_loss(self, stage: Stage, step: int, total, parts):
        bad = not math.isfinite(float(total.detach()))
        if self.dist.any_flag(bad):
            vals = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise TrainError(f"non-finite {stage.name} loss at step {step + 1} (total={float(total.detach()):.4g}, "
                             f"{vals}) on some rank; the step was not applied and nothing was written for it. "
                             f"{self._resume_hint(stage)}")

    def _optimizer_step(self, stage: Stage, step: int, total):
        opt, sc = stage.optimizer, stage.section
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(opt)
        else:
            total.backward()
        norm = None
        if sc.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(stage.params, sc.grad_clip)
        if self.scaler is not None:       # fp16: the scaler skips steps with inf gradients and lowers its scale
            self.scaler.step(opt)
            self.scaler.update()
        else:
            if norm is not None and self.dist.any_flag(not math.isfinite(float(norm))):
                raise TrainError(f"non-finite {stage.name} gradient at step {step + 1}; the step was not applied. "
                                 f"{self._resume_hint(stage)}")
            opt.step()
        opt.zero_grad(set_to_none=True)

    def _memory_start(self):
        if self.session.device.type == "cuda":
            torch.cuda.synchronize(self.session.device)
            torch.cuda.reset_peak_memory_stats(self.session.device)

    def _timing(self, times: list[float]) -> dict:
        dev = self.session.device
        if dev.type == "cuda":
            peak, where = torch.cuda.max_memory_allocated(dev) / 2**30, "GPU"
        else:
            peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU (process RSS)"
        return {"steps": len(times), "median_step_s": statistics.median(times) if times else float("nan"),
                "peak_mem_gib": peak, "device": where}

    def run_stage(self, name: str, resume_state) -> bool:
        cfg, s = self.cfg, self.session
        stage = STAGES[name](s)
        stage.setup()
        sc = stage.section
        self.scaler = torch.amp.GradScaler("cuda") if s.amp_dtype == torch.float16 else None
        self.announce_checkpoint_size(stage)
        start = self._restore(stage, resume_state) if resume_state is not None else 0
        if f"{name}_measured_before" not in self.measures and self.dist.is_main:
            got = stage.measure("before")
            self.measures.update(got)
            self.measures[f"{name}_measured_before"] = 1.0
            self.log(" ".join(f"{k} = {v:.4f}" for k, v in got.items()))
        data = s.step_data(name, sc.batch_size, stage.variants())
        bar = self._progress(name, start, sc.steps)
        recent: dict[str, list] = {}
        step, interrupted, times = start, False, []
        t0 = time.time()
        if self.stop_after is not None and self.session_steps >= self.stop_after and step < sc.steps:
            self.stopped_early = True      # the previous stage used up this session's steps
            return False
        self._memory_start()
        while step < sc.steps:
            ts = time.perf_counter()
            lr = stage.lr_at(step)
            for g in stage.optimizer.param_groups:
                g["lr"] = lr
            total, parts = stage.step(step, data.batch(step))
            self._check_finite_loss(stage, step, total, parts)
            self._optimizer_step(stage, step, total)
            step += 1
            vals = self.dist.mean([float(total.detach()), *[float(v) for v in parts.values()]])
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            times.append(time.perf_counter() - ts)
            row = dict(zip(["loss", *parts.keys()], vals))
            for k, v in row.items():
                recent[k] = (recent.get(k, []) + [v])[-20:]
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in row.items()}, refresh=False)
            if step % cfg.run.log_every == 0 or step == sc.steps:
                self.csv.append({"time": round(time.time() - t0, 3), "stage": name, "step": step, "lr": lr, **row})
            if cfg.run.sample_every and step % cfg.run.sample_every == 0 and step < sc.steps:
                stage.sample(step)
                self.dist.barrier()
            self.session_steps += 1
            limit = self.stop_after is not None and self.session_steps >= self.stop_after and step < sc.steps
            self.stopped_early = self.stopped_early or limit
            stop = self.dist.any_flag(self.interrupt.requested or limit)
            if stop or step % cfg.run.checkpoint_every == 0 or step == sc.steps:
                self.final_losses[name] = {k: float(np.mean(v)) for k, v in recent.items()}
                if step < sc.steps:
                    self.save(stage, step, done=False)
            if stop:
                interrupted = True
                break
        if bar is not None:
            bar.close()
        self.timing[name] = self._timing(times)
        s.runtime_bad.update(data.bad)
        if interrupted:
            return False
        if recent:
            self.final_losses[name] = {k: float(np.mean(v)) for k, v in recent.items()}
        if self.dist.is_main:
            got = stage.measure("after")
            self.measures.update(got)
            self.log(" ".join(f"{k} = {v:.4f}" for k, v in got.items()))
        self.save(stage, step, done=True)        # checks the weights are finite before the export
        if self.dist.is_main:
            path = stage.export()
            self.log(f"wrote {path}")
            self.files[name] = str(path)
            stage.sample(step)
        self.dist.barrier()
        stage.teardown()
        return True

    def _progress(self, stage: str, start: int, total: int):
        if not (self.dist.is_main and self.cfg.run.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True, file=sys.stderr)

    # ------------------------------------------------------------------ run
    def write_summary(self, complete: bool, error: str | None = None):
        if self.dist.is_main:
            report.write_summary(self.out / "summary.json", complete, self.measures, self.final_losses, self.files,
                                 self.session.bad_samples(), self.timing, error)

    def run(self) -> int:
        """Run the configured stages; returns the process exit code (0 done, 130 interrupted).

        Raises ConfigError (a setting or run folder to change) or TrainError (the run cannot go on)."""
        cfg = self.cfg
        # Check the resume point BEFORE writing config.toml: a refused --resume must leave the run folder as
        # it was, so a later plain --resume (which reads config.toml) still works.
        (resume, done), at = self.resume_point()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "config.toml") as tmp:
                tmp.write_text(config.to_toml(cfg), encoding="utf-8")
            if at is not None:
                self.csv.truncate(*at)
        self.dist.barrier()
        s = self.session
        s.load_models()
        s.build_items()
        try:
            with self.interrupt:
                for name in cfg.run.stages:
                    if name in done:
                        self.log(f"stage {name}: already complete in the checkpoint")
                        continue
                    rs = resume[1] if resume is not None and resume[0] == name else None
                    if not self.run_stage(name, rs):
                        self.write_summary(complete=False)
                        if self.stopped_early and not self.interrupt.requested:
                            self.log(f"stopped after {self.session_steps} steps (--stop-after); checkpoint "
                                     f"written; continue with --resume")
                            return 0
                        self.log("interrupted: checkpoint written; continue with --resume")
                        return 130
        except TrainError as e:
            self.write_summary(complete=False, error=str(e))
            raise
        self.write_summary(complete=True)
        if self.dist.is_main:
            for line in report.final_lines(self.measures, self.final_losses, self.timing, s.bad_samples()):
                s._print(line)
        return 0
