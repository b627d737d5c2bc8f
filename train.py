#!/usr/bin/env python
"""Headless DiffuMatting trainer: fine-tune a Stable Diffusion UNet to paint objects on a flat green
canvas (green-background control loss + transition-boundary detail loss) and train the matting head on
the VAE decoder. Loads the base checkpoint with ComfyUI's own loaders; writes files the pack's nodes load.

  python train.py --preset tiny --out runs/tiny                  # CPU demo on generated data, minutes
  python train.py --config configs/default.toml --checkpoint sd15.safetensors --data my_pngs/ --out runs/a
  python train.py --out runs/a --resume                          # continue exactly where it stopped
  torchrun --nproc_per_node 2 train.py --config my.toml          # DistributedDataParallel

Every config key (see configs/default.toml) can be set with --set SECTION.KEY=VALUE.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _package  # this script's folder is on sys.path (Python puts it there), see _package.py

_package.register()


def build_parser() -> argparse.ArgumentParser:
    import typing

    from diffumatting.training import config as train_config

    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Precedence: defaults < --preset < --config < flags and --set.")
    p.add_argument("--config", help="TOML config file (see configs/default.toml for every key)")
    p.add_argument("--preset", choices=list(train_config.PRESETS), help="tiny: tiny random SD1.5-shaped model + generated data, "
                                                       "both stages on the CPU in minutes")
    p.add_argument("--out", help="output folder (run.out): checkpoints/, samples/, log.csv, trained files")
    p.add_argument("--checkpoint", help="base SD1.x/SD2/SDXL checkpoint .safetensors (model.checkpoint)")
    p.add_argument("--data", help="data folder (data.path): RGBA PNGs, or image/ + alpha/ pairs")
    p.add_argument("--stages", help="comma list of stages to run: unet,head (run.stages)")
    p.add_argument("--mode", choices=list(typing.get_args(train_config.UnetMode)), help="UNet fine-tune mode (unet.mode)")
    p.add_argument("--unet-steps", type=int, help="UNet stage steps (unet.steps)")
    p.add_argument("--head-steps", type=int, help="matting head stage steps (head.steps)")
    p.add_argument("--batch-size", type=int, help="global batch size of both stages")
    p.add_argument("--seed", type=int, help="run seed (run.seed)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (run.device)")
    p.add_argument("--comfyui", help="ComfyUI folder (with main.py); default: auto-detect")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in <out>/checkpoints (or the given folder)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any config key, e.g. --set loss.green=0.2 (repeatable)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop cleanly after N steps in this session, writing a checkpoint (as Ctrl-C does); "
                        "for time-limited jobs: continue with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (run.progress = false)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--print-default-config", action="store_true",
                   help="print every key with its default and documentation (configs/default.toml) and exit")
    return p


def overrides_from_args(args) -> dict:
    from diffumatting.training import config as train_config

    o = train_config.parse_set(args.set)

    def put(section, key, value):
        if value is not None:
            o.setdefault(section, {})[key] = value

    put("run", "out", args.out)
    put("model", "checkpoint", args.checkpoint)
    if args.data is not None:
        put("data", "path", args.data)
        put("data", "source", "folder")
    put("run", "stages", args.stages)
    put("unet", "mode", args.mode)
    put("unet", "steps", args.unet_steps)
    put("head", "steps", args.head_steps)
    if args.batch_size is not None:
        put("unet", "batch_size", args.batch_size)
        put("head", "batch_size", args.batch_size)
    put("run", "seed", args.seed)
    put("run", "device", args.device)
    put("run", "comfyui", args.comfyui)
    if args.no_progress:
        put("run", "progress", False)
    return o


def _error(message: str, code: int) -> int:
    print(f"train.py: error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    from diffumatting.training import config as train_config
    from diffumatting.training import distributed

    args = build_parser().parse_args(argv)
    if args.print_default_config:
        print(train_config.default_toml(), end="")
        return 0
    try:
        if args.stop_after is not None and args.stop_after < 1:
            raise train_config.ConfigError(f"--stop-after {args.stop_after}: give a number of steps >= 1")
        overrides = overrides_from_args(args)
        base = None
        if args.resume and not args.config and not args.preset:
            # Resuming without a config: start from the run's own config.toml.
            out = overrides.get("run", {}).get("out")
            if not out:
                raise train_config.ConfigError("--resume needs --out (the run folder to continue)")
            saved = Path(out) / "config.toml"
            if saved.is_file():
                base = train_config.apply_dict(train_config.TrainConfig(), train_config.load_toml(saved), str(saved))
        cfg = train_config.build(args.preset, args.config, overrides, base=base)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        train_config.validate(cfg, world_size=world)
    except train_config.ConfigError as e:
        return _error(str(e), 2)
    if args.print_config:
        print(train_config.to_toml(cfg))
        return 0
    from diffumatting.training.session import TrainError

    try:
        dist = distributed.setup(cfg.run.device)
    except (RuntimeError, ValueError) as e:
        return _error(f"could not join the torchrun process group ({e}); check the torchrun arguments", 2)
    try:
        from diffumatting.training.loop import Trainer

        return Trainer(cfg, dist, resume=args.resume, stop_after=args.stop_after).run()
    except train_config.ConfigError as e:
        return _error(str(e), 2)
    except TrainError as e:
        return _error(str(e), 1)
    except OSError as e:
        return _error(f"{e.strerror or e} ({e.filename or cfg.run.out}); check the folder exists and is writable, "
                      f"and that the disk has space", 1)
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
