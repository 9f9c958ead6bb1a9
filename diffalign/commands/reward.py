"""Reward subcommands: ``score``, ``relabel``, ``filter-pairs``, ``train-reward``, ``serve-reward``.

    diffalign score --reward pickscore [--reward aesthetic=DIR ...] --images DIR --prompts FILE --out scores.csv
    diffalign score --reward pickscore --pairs test.parquet [--tie-tol 0] [--out pairs.csv]
    diffalign relabel --reward pickscore --pairs in.parquet --out relabelled.parquet
    diffalign filter-pairs --reward pickscore --pairs in.parquet --out kept.parquet --keep-fraction 0.5
    diffalign train-reward configs/reward/tiny_pickscore.yaml model=DIR data=pairs.parquet
    diffalign serve-reward --reward pickscore --host 127.0.0.1 --port 8000

Each command parses, calls the work and prints: scoring, pairs and the server are in
:mod:`diffalign.rewards`, reward-model training in :mod:`diffalign.trainers.reward_model`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from ..data.prompts import read_prompt_file, read_prompts
from ..errors import UserError


def _make_rewards(specs: list[str], args) -> dict:
    from ..rewards.compose import unique_names
    from ..rewards.registry import get_reward

    kwargs = {}
    if getattr(args, "device", None):
        kwargs["device"] = args.device
    if getattr(args, "batch_size", None):
        kwargs["batch_size"] = args.batch_size
    rewards = [get_reward(s, **kwargs) for s in specs]
    return dict(zip(unique_names([r.name for r in rewards]), rewards))


def _load_all(rewards: dict) -> None:
    for r in rewards.values():
        r.ensure_loaded()


def read_image_prompts(path: str | Path, images_dir: Path, image_files: list[Path]) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs: a .txt prompt file (one prompt a line, matched to the sorted
    images), or a .csv/.json/.jsonl file with ``image`` and ``prompt`` fields (any subset and
    order of the images; a relative image path is looked up under ``images_dir``, then beside the
    file, so ``eval``'s own ``per_image.csv`` works). Read by :func:`diffalign.data.prompts.read_prompt_file`."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".jsonl", ".json"):
        rows = read_prompt_file(path, required=("image", "prompt")).rows or []
        out = []
        for i, row in enumerate(rows, 1):
            img = Path(str(row["image"]))
            # relative to --images, else to the prompts file itself: `diffalign eval` writes
            # per_image.csv beside its images/ folder with paths like images/0000_0.png
            candidates = [img] if img.is_absolute() else [images_dir / img, path.parent / img]
            full = next((c for c in candidates if c.is_file()), None)
            if full is None:
                raise UserError(f"prompts file '{path}' row {i}: image '{row['image']}' not found in '{images_dir}'"
                                + ("" if img.is_absolute() else f" or '{path.parent}'"))
            out.append((full, str(row["prompt"] or "")))
        return out
    lines = read_prompts(path)
    if len(lines) != len(image_files):
        raise UserError(f"prompts file '{path}' has {len(lines)} lines but '{images_dir}' has {len(image_files)} "
                        "images (one prompt per image, in sorted file-name order)")
    return list(zip(image_files, lines))


def cmd_score(args) -> int:
    if args.pairs:
        if args.images:
            raise UserError("use either --images (with --prompts) or --pairs, not both")
        return _score_pairs(args)
    if not args.images:
        raise UserError("give --images DIR (with --prompts FILE) or --pairs FILE.parquet")
    if not args.out:
        raise UserError("--out FILE.csv is required with --images")
    from ..rewards.base import list_image_files, load_image

    images_dir = Path(args.images)
    if not images_dir.is_dir():
        raise UserError(f"images directory '{images_dir}' does not exist")
    files = list_image_files(images_dir)
    rewards = _make_rewards(args.reward, args)
    if args.prompts:
        items = read_image_prompts(args.prompts, images_dir, files)
    else:
        needing = [k for k, r in rewards.items() if r.needs_prompt]
        if needing:
            raise UserError(f"reward(s) {', '.join(needing)} need prompts: pass --prompts FILE")
        items = [(f, "") for f in files]
    if not items:
        raise UserError(f"no images found in '{images_dir}'")
    _load_all(rewards)
    columns: dict[str, list[float]] = {k: [] for k in rewards}
    seconds = dict.fromkeys(rewards, 0.0)
    chunk = 64
    for s in range(0, len(items), chunk):
        part = items[s:s + chunk]
        try:
            images = [load_image(p) for p, _ in part]
        except OSError as e:
            raise UserError(f"cannot read image: {e}") from None
        prompts = [t for _, t in part]
        for key, reward in rewards.items():
            t0 = time.perf_counter()
            out = reward(images, prompts if reward.needs_prompt or args.prompts else None)
            columns[key].extend(out.scores.detach().float().cpu().tolist())
            seconds[key] += time.perf_counter() - t0
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "prompt", *rewards])
        for i, (p, prompt) in enumerate(items):
            name = p.relative_to(images_dir) if p.is_relative_to(images_dir) else p
            w.writerow([str(name), prompt, *(repr(columns[k][i]) for k in rewards)])
    for key in rewards:
        n = len(items)
        mean = sum(columns[key]) / n
        print(f"{key}: mean {mean:.4f} over {n} images; {n / max(seconds[key], 1e-9):.1f} images/s")
    print(f"wrote {out_path} ({len(items)} rows)")
    return 0


def _score_pairs(args) -> int:
    from ..rewards.pairs import describe_bad, pairwise_accuracy, score_pairs

    rewards = _make_rewards(args.reward, args)
    _load_all(rewards)
    ps = score_pairs(rewards, args.pairs, batch_rows=64)
    print(f"{len(ps.rows)} pairs from {args.pairs}; {describe_bad(ps.bad)}")
    if len(ps.rows) == 0:
        raise UserError(f"no decodable pairs in '{args.pairs}'")
    for key, reward in rewards.items():
        s0, s1 = ps.scores[key]
        m = pairwise_accuracy(s0, s1, ps.label_0, ps.label_1, args.tie_tol, reward.higher_is_better)
        print(f"{key}: pairwise accuracy {m['accuracy']:.4f} (ties as 0.5, tie_tol={args.tie_tol:g}); "
              f"{m['accuracy_strict']:.4f} on {m['pairs'] - m['human_ties']} non-tied pairs; "
              f"{m['human_ties']} human ties, {m['predicted_ties']} predicted ties")
    print(f"{ps.images * len(rewards) / max(ps.seconds, 1e-9):.1f} images/s "
          f"({ps.images} images x {len(rewards)} reward(s), decoding included)")
    if args.out:
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["row", "caption", "label_0", "label_1", *(f"{k}_{i}" for k in rewards for i in (0, 1))])
            for j, row in enumerate(ps.rows):
                vals = [repr(float(ps.scores[k][i][j])) for k in rewards for i in (0, 1)]
                w.writerow([int(row), ps.captions[j], ps.label_0[j], ps.label_1[j], *vals])
        print(f"wrote {out_path}")
    return 0


def cmd_relabel(args) -> int:
    from ..rewards.pairs import describe_bad, relabel

    (reward,) = _make_rewards([args.reward], args).values()
    reward.ensure_loaded()
    t0 = time.perf_counter()
    s = relabel(reward, args.pairs, args.out, tie_tol=args.tie_tol)
    dt = time.perf_counter() - t0
    print(f"relabelled {s['pairs']} pairs with {reward.name}: agreement with human labels "
          f"{s['agree_with_human']:.4f}, {s['ai_ties']} AI ties; {describe_bad(s['bad'])}")
    print(f"{2 * s['pairs'] / max(dt, 1e-9):.1f} images/s; wrote {s['out']}")
    return 0


def cmd_filter_pairs(args) -> int:
    from ..rewards.pairs import describe_bad, filter_pairs

    (reward,) = _make_rewards([args.reward], args).values()
    reward.ensure_loaded()
    s = filter_pairs(reward, args.pairs, args.out, keep_fraction=args.keep_fraction,
                     require_agreement=args.require_agreement)
    agreement = f"; {s['ineligible']} contradicted human labels" if args.require_agreement else ""
    print(f"kept {s['kept']} of {s['pairs']} pairs (|margin| >= {s['min_kept_margin']:.4g}){agreement}; "
          f"{describe_bad(s['bad'])}")
    print(f"wrote {s['out']}")
    return 0


def cmd_train_reward(args) -> int:
    from ..trainers.reward_model import load_train_config, train_reward

    cfg = load_train_config(args.config, args.overrides)
    metrics = train_reward(cfg)
    print(f"validation accuracy {metrics['val_accuracy_initial']:.4f} -> {metrics['val_accuracy']:.4f} "
          f"over {metrics['val_pairs']} pairs (a human tie counts 0.5); final {metrics['val_accuracy_strict']:.4f} "
          f"over the {metrics['history'][-1]['pairs'] - metrics['history'][-1]['human_ties']} pairs without a human tie")
    return 0


def cmd_serve_reward(args) -> int:
    from ..rewards.server import RewardServer

    (reward,) = _make_rewards([args.reward], args).values()
    reward.ensure_loaded()  # fail before binding the port if weights are missing
    try:
        server = RewardServer(reward, args.host, args.port, max_body_bytes=int(args.max_body_mb * 2**20),
                              max_images=args.max_images, max_pixels=args.max_pixels, request_timeout=args.timeout,
                              access_log=not args.no_access_log)
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    print(f"serving {reward.name} at {server.url} (POST /score, GET /health); Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.httpd.server_close()
    return 0


# --------------------------------------------------------------------------------------------


def _add_reward_args(p: argparse.ArgumentParser, multiple: bool) -> None:
    if multiple:
        p.add_argument("--reward", action="append", required=True, metavar="NAME[=PATH]",
                       help="reward to compute (repeatable), e.g. pickscore, aesthetic=/models/aes")
    else:
        p.add_argument("--reward", required=True, metavar="NAME[=PATH]", help="reward, e.g. pickscore or pickscore=DIR")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="score images (or preference pairs) with one or more rewards",
                              description="Score a directory of images against prompts, writing one CSV row per "
                                          "image; or, with --pairs, report each reward's pairwise accuracy "
                                          "against human labels.")
    _add_reward_args(p, multiple=True)
    p.add_argument("--images", metavar="DIR", help="directory of images (scored in sorted name order)")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompts: .txt (one line per image, matched to the sorted image names) or .csv/.jsonl "
                        "with columns image,prompt (an eval run's per_image.csv works)")
    p.add_argument("--pairs", metavar="FILE.parquet", help="Pick-a-Pic-schema pairs: report pairwise accuracy")
    p.add_argument("--tie-tol", type=float, default=0.0,
                   help="--pairs: the reward predicts a tie when |s0-s1| <= this (default 0)")
    p.add_argument("--out", metavar="FILE.csv", help="output CSV (required with --images)")
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser("relabel", help="replace human pair labels by a reward's preference (AI feedback)")
    _add_reward_args(p, multiple=False)
    p.add_argument("--pairs", required=True, metavar="IN.parquet", help="Pick-a-Pic-schema pairs")
    p.add_argument("--out", required=True, metavar="OUT.parquet", help="the pairs with the reward's labels")
    p.add_argument("--tie-tol", type=float, default=0.0, help="label a tie (0.5/0.5) when |s0-s1| <= this")
    p.set_defaults(func=cmd_relabel)

    p = subparsers.add_parser("filter-pairs", help="keep the pairs with the largest reward margin (FiFA-style)")
    _add_reward_args(p, multiple=False)
    p.add_argument("--pairs", required=True, metavar="IN.parquet", help="Pick-a-Pic-schema pairs")
    p.add_argument("--out", required=True, metavar="OUT.parquet", help="the kept pairs")
    p.add_argument("--keep-fraction", type=float, default=0.5, help="fraction of pairs to keep (default 0.5)")
    p.add_argument("--require-agreement", action="store_true",
                   help="drop pairs whose (non-tie) human label the reward contradicts before ranking")
    p.set_defaults(func=cmd_filter_pairs)

    p = subparsers.add_parser("train-reward", help="fine-tune a CLIP reward model on preference pairs (PickScore objective)")
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/reward/tiny_pickscore.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. max_steps=100")
    p.set_defaults(func=cmd_train_reward)

    from ..rewards.server import DEFAULT_MAX_IMAGES, DEFAULT_MAX_PIXELS

    p = subparsers.add_parser("serve-reward", help="serve a reward over HTTP (JSON, base64 images)",
                              description="Serve one reward over HTTP for training jobs elsewhere "
                                          "(client: --reward remote=http://HOST:PORT).",
                              epilog=_serve_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_reward_args(p, multiple=False)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; the server has no "
                        "authentication, so other addresses log a warning)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (413 above; default 64)")
    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                   help=f"most images per request (413 above; default {DEFAULT_MAX_IMAGES})")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image, width*height, checked from the header before decoding "
                        f"(413 above; default {DEFAULT_MAX_PIXELS} = 4096x4096)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a request is answered 504 (default 120)")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not log a line per request (client, method, path, status, seconds)")
    p.set_defaults(func=cmd_serve_reward)


def _serve_epilog() -> str:
    """The /score request and response schemas, as the server's OpenAPI document has them."""
    from ..rewards.server import openapi_spec

    schemas = openapi_spec()["components"]["schemas"]

    def block(name: str) -> str:
        # one line per property: the indent=2 dump of a schema is four screens long
        schema = dict(schemas[name])
        props = schema.pop("properties")
        head = json.dumps(schema)[:-1]
        lines = [f'    {json.dumps(k)}: {json.dumps(v)},' for k, v in props.items()]
        lines[-1] = lines[-1].rstrip(",")
        return "\n".join([f'  {head}, "properties": {{', *lines, "  }}"])

    return (
        "API (OpenAPI 3; the full document is served at GET /openapi.json):\n"
        "  GET  /health -> reward name, higher_is_better, needs_prompt and the limits below\n"
        "  POST /score  (Content-Type: application/json), request body schema:\n"
        f"{block('ScoreRequest')}\n"
        "  200 response schema:\n"
        f"{block('ScoreResponse')}\n"
        '  errors: {"error": "one line"} with 400 malformed request or undecodable image, 411 no\n'
        "  Content-Length, 413 over --max-body-mb / --max-images / --max-pixels, 500 reward failure,\n"
        "  504 not scored within --timeout.\n"
        "example:\n"
        "  curl -s localhost:8000/score -H 'Content-Type: application/json' \\\n"
        "       -d '{\"images\": [\"'$(base64 -w0 a.png)'\"], \"prompts\": [\"a cat\"]}'"
    )
