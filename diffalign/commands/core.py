"""Core commands: ``train``, ``cache``, ``recipes``, ``tiny-model``, ``toy-data``; config help (``--help-keys``)."""

from __future__ import annotations

import argparse
import os
import time


def cmd_train(args) -> int:
    from ..config import load_config
    from ..trainers import train

    cfg = load_config(args.config, args.overrides)
    if args.help_keys is not None:  # every key with its help, type, default and resolved value; nothing runs
        print_key_help(cfg, args.config, args.overrides, prefix=args.help_keys)
        return 0
    if args.print_config:  # the resolved config (defaults, recipe, overrides), validated; nothing runs
        import yaml

        from ..config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    result = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # torchrun / accelerate launch: the main process reports the run
        return 0
    final = {k: v for k, v in result["final"].items() if isinstance(v, (int, float))}
    print(f"done: {cfg.output_dir} " + " ".join(f"{k}={v:.4g}" for k, v in final.items() if k in ("step", "loss", "implicit_acc", "reward_mean")))
    return 0


def flat_keys(data: dict, prefix: str = "") -> set[str]:
    """The dotted keys a YAML mapping sets (lists are values, not blocks)."""
    keys: set[str] = set()
    for k, v in data.items():
        keys |= flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return keys


def _yaml_value(value) -> str:
    """``value`` as one line of YAML (blocks in a list, such as ``rewards``' items, as mappings)."""
    import dataclasses

    import yaml

    if isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def print_key_help(cfg, config: str | None, overrides: list[str], prefix: str = "", only_set: bool = False) -> int:
    """Print each config key (under ``prefix``): its resolved value, type and default, where the
    value comes from (the config file, an override, or the default), the field's help, and the
    file's own comment on the key (its "why"). Returns how many keys were printed."""
    import textwrap

    from .. import recipes
    from ..config import config_keys, load_yaml, parse_overrides, yaml_key_comments

    source = recipes.resolve_config(config) if config else None
    file_keys = flat_keys(load_yaml(config)) if config else set()
    override_keys = flat_keys(parse_overrides(overrides))
    comments = yaml_key_comments(source.read_text(encoding="utf-8")) if source is not None else {}
    name = source.name if source is not None else ""
    rows = [r for r in config_keys(cfg) if r.key == prefix.rstrip(".") or r.key.startswith(prefix)]
    if only_set:
        rows = [r for r in rows if r.key in file_keys | override_keys]
    for r in rows:
        item = "[]" in r.key  # a key of each item of a list of blocks (rewards[].name)
        by = ("command line" if r.key in override_keys else name if r.key in file_keys
              else "each item" if item else "")
        where = f"{r.type}; {by}; default {_yaml_value(r.default)}" if by else f"{r.type}; default"
        print(f"{r.key}  ({where})" if item else f"{r.key} = {_yaml_value(r.value)}  ({where})")
        for line in textwrap.wrap(r.help, 96):
            print(f"    {line}")
        # the file's comment on this key, else on its block (``lora: {rank: 32}  # why``)
        parts = r.key.split(".")
        why = next((comments[k] for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if k in comments), None)
        if why and r.key in file_keys:
            for line in textwrap.wrap(f"{name}: {why}", 96):
                print(f"    {line}")
    if not rows:
        from ..errors import ConfigError

        raise ConfigError(f"no config key starts with '{prefix}'; top-level keys: "
                          + ", ".join(sorted({r.key.split(".")[0] for r in config_keys(cfg) if "[]" not in r.key})))
    return len(rows)


def cmd_recipes(args) -> int:
    from .. import recipes

    if args.show:  # one recipe: its description and every key it sets, with help and its own comments
        from .. import trainers  # noqa: F401  registers the trainer configs load_config picks from
        from ..config import config_keys, load_config

        source = recipes.resolve_config(args.show)
        header = []
        for line in source.read_text(encoding="utf-8").splitlines():
            if not line.lstrip().startswith("#"):
                break
            header.append(line.lstrip("# ").rstrip())
        print(f"{args.show}: {recipes.as_path(source)}")
        print("\n".join(header) + "\n")
        cfg = load_config(args.show)
        shown = print_key_help(cfg, args.show, [], only_set=True)
        print(f"\nthe other {len(config_keys(cfg)) - shown} keys keep their defaults: "
              f"diffalign train {args.show} --help-keys [PREFIX]")
        return 0
    if args.path:  # one config's file path, for tools that want a file (accelerate --config_file)
        print(recipes.as_path(recipes.resolve_config(args.path)))
        return 0
    names = recipes.recipe_names()
    aliases = recipes.recipe_aliases(list(names))
    for kind, heading, usage in recipes.KINDS:
        found = recipes.packaged_files(kind)
        if not found:
            continue
        rows = []
        for f in found:
            if kind == "recipes":
                name = next(n for n, g in names.items() if g.name == f.name)
                short = [a for a, full in aliases.items() if full == name]
                label = name + (f" ({', '.join(short)})" if short else "")
            else:
                label = f"{kind}/{f.name.rsplit('.', 1)[0]}"
            rows.append((label, recipes.description(f)))
        width = max(len(label) for label, _ in rows)
        print(f"{heading} ({usage}):")
        for label, desc in rows:
            print(f"  {label:<{width}}  {desc}")
    return 0


def cmd_tiny_model(args) -> int:
    from ..api import tiny_model
    from ..models.tiny import dir_size_mb

    t0 = time.perf_counter()
    path = tiny_model(args.kind, args.dir, seed=args.seed)
    print(f"wrote tiny {args.kind} to {path} ({dir_size_mb(path):.1f} MB, {time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_toy_data(args) -> int:
    from ..api import toy_data

    path = toy_data(args.dir, args.n, size=args.size, seed=args.seed)
    print(f"wrote {args.n} Pick-a-Pic-schema rows to {path}")
    return 0


def cmd_cache(args) -> int:
    import torch

    from .. import trainers  # noqa: F401  registers the trainer configs load_config picks from
    from ..config import load_config
    from ..data.cache import build_cache, check_cache, load_cache_encoders, resolve_cache_dir

    cfg = load_config(args.config, args.overrides)
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch: each process encodes its share
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        device = accelerator.device
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    main = accelerator is None or accelerator.is_main_process
    # the VAE and text encoders only, in the run's dtypes (load_cache_encoders), not the whole
    # pipeline in fp32: FLUX.1's would be ~67 GB on one GPU before the first VAE encode
    adapter = load_cache_encoders(cfg, device)
    cache_dir = resolve_cache_dir(cfg, adapter)  # data_opts.cache_dir, or the one training would pick
    current = check_cache(cfg, adapter, cache_dir=cache_dir, announce=main) is not None
    if accelerator is not None:  # one decision for all processes
        from accelerate.utils import gather_object

        current = all(gather_object([current]))
    if current and not args.force:
        if main:
            print(f"cache at {cache_dir} is up to date")
        return 0
    t0 = time.perf_counter()
    path = build_cache(cfg, adapter, batch_size=args.batch_size, cache_dir=cache_dir, accelerator=accelerator)
    if main:
        print(f"wrote latent cache to {path} in {time.perf_counter() - t0:.1f}s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="precompute VAE latents + text embeddings for a pair config "
                                     "(under torchrun / accelerate launch every process encodes a share)")
    p.add_argument("config", help="pair-method config: YAML file, packaged config (tiny/dpo) or recipe name")
    p.add_argument("overrides", nargs="*", default=[], help="e.g. model=DIR data=DIR [data_opts.cache_dir=CACHE]")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per VAE/text-encoder forward pass (default 16)")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching cache exists")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="train with a config: diffalign train CONFIG [key=value ...]")
    p.add_argument("config", help="YAML file, packaged config (tiny/dpo.yaml) or recipe name (sd15-dpo); "
                                  "see diffalign recipes")
    # default=[]: argparse otherwise lists an empty "*" positional as required ("required: config, overrides")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. model=DIR data=DIR max_steps=3 loss.beta=2000")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved, validated config as YAML and exit (nothing is loaded or trained)")
    p.add_argument("--help-keys", nargs="?", const="", metavar="PREFIX",
                   help="print every config key (or those under PREFIX, e.g. sampler) with its value, type, default, "
                        "help and the config file's comment on it, and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="list the packaged recipes and tiny/reward/accelerate configs")
    p.add_argument("--show", metavar="NAME", help="print one recipe: its description and every key it sets, "
                                                    "with the key's help and the recipe's comment on it")
    p.add_argument("--path", metavar="CONFIG", help="print the file path of one config (recipe name or tiny/dpo, accelerate/ddp ...)")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("tiny-model", help="write a tiny random-init model in diffusers format (offline)")
    p.add_argument("kind", metavar="KIND", help="sd15, sd21, sdxl, sd3, flux, flux-schnell, flux2, flux2-klein, or a reward model kind (clip, pickscore, ...)")
    p.add_argument("dir", metavar="DIR", help="output directory (created)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (default 0)")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("toy-data", help="write toy data offline: diffalign toy-data pickapic DIR --n N")
    p.add_argument("kind", choices=["pickapic"], help="data schema (pickapic: Pick-a-Pic v2 pairs)")
    p.add_argument("dir", metavar="DIR", help="output directory (a parquet file is written in it)")
    p.add_argument("--n", type=int, default=64, help="number of rows (default 64)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy images and labels (default 0)")
    p.set_defaults(func=cmd_toy_data)
