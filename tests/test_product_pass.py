"""The new-user pass (issue #29): what a user meets first says what it is and writes what it should."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest


def test_version_flag_prints_the_installed_version(capsys):
    from importlib.metadata import version

    from diffalign.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffalign {version('diffalign')}"


def _modes(root):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*.safetensors")}


def test_tiny_model_weights_are_world_readable(tmp_path):
    """safetensors writes through a private 0600 temporary file; our weights get the mode of every
    other file we write (issue #29, item 8)."""
    from diffalign.cli import main

    assert main(["-q", "tiny-model", "pickscore", str(tmp_path / "ps")]) == 0
    modes = _modes(tmp_path / "ps")
    assert modes and all(m & 0o044 == 0o044 for m in modes.values()), modes


def test_train_reward_weights_are_world_readable(tmp_path):
    from diffalign.rewards.tiny import build_pickscore, write_toy_pairs
    from diffalign.trainers.reward_model import RewardTrainConfig, train_reward

    model = build_pickscore(tmp_path / "init")
    write_toy_pairs(tmp_path / "train.parquet", 16, seed=0)
    write_toy_pairs(tmp_path / "val.parquet", 8, seed=1)
    cfg = RewardTrainConfig(model=str(model), data=str(tmp_path / "train.parquet"), val_data=str(tmp_path / "val.parquet"),
                            output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=4, warmup_steps=0, eval_every=1,
                            device="cpu")
    train_reward(cfg, log=lambda *_: None)
    modes = _modes(tmp_path / "rm")
    assert modes and all(m & 0o044 == 0o044 for m in modes.values()), modes


def test_a_lora_of_another_base_is_an_error_not_a_no_op(tiny_model, toy_pairs, tmp_path):
    """An SD1.5 LoRA evaluated on an SD3 model: one clear error naming the base it was trained on,
    instead of images identical to the base's (issue #29, item 1); on its own base it loads."""
    from pathlib import Path

    from diffalign.config import load_config
    from diffalign.errors import UserError
    from diffalign.eval.generate import load_pipeline
    from diffalign.trainers import train

    root = Path(__file__).resolve().parents[1]
    sd15, sd3 = tiny_model("sd15"), tiny_model("sd3")
    out = tmp_path / "run"
    train(load_config(root / "diffalign/configs/tiny/sft.yaml",
                      [f"model={sd15}", f"data={toy_pairs}", f"output_dir={out}", "max_steps=1"]))
    load_pipeline(str(sd15), lora=str(out))
    with pytest.raises(UserError, match=rf"no place in {sd3}.*trained on {sd15}"):
        load_pipeline(str(sd3), lora=str(out))


def _one_line_error(capsys, argv) -> str:
    from diffalign.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# str keys whose values are names the user chooses (paths, hub ids, dataset columns): anything goes
# until the file or column is looked up. Every other str key of every trainer config is a choice
# among known values and must be checked before any work starts.
FREE_FORM_KEYS = {"model", "data", "output_dir", "resume", "eval.data", "model_opts.revision", "model_opts.variant",
                  "model_opts.vae", "data_opts.split", "data_opts.cache_dir", "data_opts.caption_column",
                  "data_opts.image_column", "data_opts.label_column", "data_opts.rejected_caption_column"}


def _str_keys(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _str_keys(tp, f"{prefix}{f.name}.")
        elif tp is str or str in typing.get_args(tp):
            yield prefix + f.name


def test_every_enum_like_key_is_one_line_before_any_work(tmp_path, capsys):
    """Values validation missed used to surface as 19-35 line tracebacks (issue #29, item 2:
    report_to=tensorbored, optim.lr_scheduler=bogus): every str key of every trainer config that
    is not a free-form name gets a bad value and must be refused in one line naming it, exit 2."""
    import diffalign.trainers  # noqa: F401 - registers the trainer configs
    from diffalign.config import CONFIG_CLASSES

    checked = set()
    for cls in {c: None for c in CONFIG_CLASSES.values()}:  # one packaged tiny config per trainer
        method = next(m for m, c in sorted(CONFIG_CLASSES.items()) if c is cls)
        for key in _str_keys(cls):
            if key in FREE_FORM_KEYS or key == "method":
                continue
            out = tmp_path / "o"
            err = _one_line_error(capsys, ["-q", "train", f"tiny/{method}", "model=M", "data=D", f"output_dir={out}",
                                           f"{key}=bogus_value"])
            assert f"'{key}'" in err, (method, key, err)
            assert not out.exists()  # nothing was started
            checked.add(key)
    # the keys of the original reproductions, and the window/tree keys once only checked for their own kind
    assert {"report_to", "optim.lr_scheduler", "lora.init", "model_opts.attention", "schedule.window.mode",
            "schedule.tree.width_pruning", "sampler.step"} <= checked
    assert len(checked) >= 35


def test_a_tracker_that_is_not_installed_is_an_error(tmp_path, capsys, monkeypatch):
    """report_to=tensorboard without tensorboard: accelerate only warns and the run logs nothing (item 3)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    err = _one_line_error(capsys, ["-q", "train", "tiny/dpo", "model=M", "data=D", f"output_dir={tmp_path / 'o'}",
                                   "report_to=tensorboard"])
    assert "tensorboard is not installed" in err and "diffalign[tracking]" in err


def test_lora_targets_that_match_no_layer_are_one_line(tiny_model, toy_pairs, tmp_path, capsys):
    err = _one_line_error(capsys, ["-q", "train", "tiny/dpo", f"model={tiny_model('sd15')}", f"data={toy_pairs}",
                                   f"output_dir={tmp_path / 'o'}", "max_steps=1",
                                   "lora.target_modules=[to_q, nonexistent_layer]"])
    assert "'lora.target_modules': nonexistent_layer match no layer" in err and "to_k" in err


def test_a_reward_server_that_is_down_is_one_line(tmp_path, capsys):
    import socket

    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "p.txt").write_text("a red circle\n")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _one_line_error(capsys, ["-q", "score", "--reward", f"remote=http://127.0.0.1:{port}", "--images",
                                   str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s.csv")])
    assert f"reward server http://127.0.0.1:{port}" in err and "no answer" in err


@pytest.mark.parametrize("model", ["./NoSuchModel", "outputs/tiny/no-such-model"])
def test_a_missing_local_model_is_a_missing_directory_not_a_hub_lookup(model, tmp_path, capsys):
    """A path that does not exist is not looked up on the hub (31 s of retries offline, and an error
    about connecting to the hub; issue #29, item 7)."""
    import time

    t0 = time.perf_counter()
    err = _one_line_error(capsys, ["-q", "train", "tiny/dpo", f"model={model}", "data=D", f"output_dir={tmp_path / 'o'}"])
    assert f"model='{model}': no such directory" in err and "hub" in err
    assert time.perf_counter() - t0 < 20  # no network retries (a generous bound: the failure is a stat call)


def test_the_first_line_of_a_run_states_the_costly_defaults(tiny_model, toy_pairs, tmp_path, capsys, monkeypatch):
    """A minimal config silently trained at 512 px (issue #29, item 9): the run's first line says the
    resolution and which key sets it, the steps, device, processes, precision and threads."""
    from pathlib import Path

    from diffalign.config import load_config
    from diffalign.trainers import train

    monkeypatch.delenv("DIFFALIGN_QUIET", raising=False)  # another test's `diffalign -q` sets it for the process
    root = Path(__file__).resolve().parents[1]
    train(load_config(root / "diffalign/configs/tiny/sft.yaml",
                      [f"model={tiny_model('sd15')}", f"data={toy_pairs}", f"output_dir={tmp_path / 'o'}", "max_steps=1"]))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("sft:"))
    assert "1 steps at 32 px (data_opts.resolution), device cpu, 1 process(es), mixed precision no" in line


def test_print_config_shows_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    """``--print-config``: the config a run would use, after the recipe, the defaults and the
    overrides, validated; no model is loaded and no output directory is made (issue #29, item 10)."""
    import yaml

    from diffalign.cli import main

    assert main(["-q", "train", "tiny/dpo", "model=M", "data=D", f"output_dir={tmp_path / 'o'}", "loss.beta=123",
                 "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"] == "dpo" and cfg["loss"]["beta"] == 123 and cfg["data_opts"]["resolution"] == 32
    assert not (tmp_path / "o").exists()
    _one_line_error(capsys, ["-q", "train", "tiny/dpo", "model=M", "optim.lr_scheduler=bogus", "--print-config"])


def test_quiet_silences_the_libraries_warnings():
    """``-q`` printed transformers' "requires torchvision" notice on every model load (issue #29,
    item 6): in quiet mode the libraries log errors only."""
    import subprocess
    import sys

    code = ("from diffalign.logging import configure\n"
            "configure(quiet={q})\n"
            "from transformers.utils import logging as tl\n"
            "from diffusers.utils import logging as dl\n"
            "tl.get_logger('transformers.x').warning('LIBRARY-NOTICE')\n"
            "dl.get_logger('diffusers.x').warning('LIBRARY-NOTICE')\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_VERBOSITY") and k != "DIFFALIGN_QUIET"}
    loud = subprocess.run([sys.executable, "-c", code.format(q=False)], capture_output=True, text=True, env=env)
    quiet = subprocess.run([sys.executable, "-c", code.format(q=True)], capture_output=True, text=True, env=env)
    assert loud.stderr.count("LIBRARY-NOTICE") == 2  # the test can see the notice when it is there
    assert "LIBRARY-NOTICE" not in quiet.stderr + quiet.stdout


def test_model_card_names_directories_absolutely(tiny_model, toy_pairs, tmp_path, monkeypatch):
    """The card's ``base_model`` and usage snippet used the relative path the user typed, which
    means nothing once the card is read from elsewhere (issue #29)."""
    import os
    from pathlib import Path

    from diffalign.config import load_config
    from diffalign.trainers import train

    root = Path(__file__).resolve().parents[1]
    model = Path(tiny_model("sd15"))
    monkeypatch.chdir(model.parent)
    train(load_config(root / "diffalign/configs/tiny/sft.yaml",
                      [f"model={model.name}", f"data={toy_pairs}", f"output_dir={os.path.relpath(tmp_path / 'o')}", "max_steps=1"]))
    card = (tmp_path / "o" / "README.md").read_text()
    assert f"base_model: {model.resolve()}" in card
    assert f'DiffusionPipeline.from_pretrained("{model.resolve()}")' in card
    assert f'load_lora_weights("{(tmp_path / "o").resolve()}")' in card


@pytest.mark.parametrize("key, value", [("model", "org/NoSuchModel"), ("data", "org/no-such-pairs")])
def test_a_mistyped_hub_name_offline_is_one_line_at_once(key, value, tiny_model, toy_pairs, tmp_path, capsys, monkeypatch):
    """Offline, a hub id that is not in the cache cost 31 s and 12 lines of hub retries (item 7): the
    hub is probed once (one connect) and the library is never asked."""
    import diffusers

    from diffalign import hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)

    def asked(*a, **k):
        raise AssertionError("the hub library was asked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", asked)
    args = {"model": str(tiny_model("sd15")), "data": toy_pairs, key: value}
    if key == "data":
        monkeypatch.undo()  # the model is local: its config must load; the data check comes first anyway
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _one_line_error(capsys, ["-q", "train", "tiny/dpo", f"model={args['model']}", f"data={args['data']}",
                                   f"output_dir={tmp_path / 'o'}", "max_steps=1"])
    assert f"{key}='{value}': no such directory" in err and "hub cache" in err
    assert ("huggingface.co cannot be reached" if key == "model" else "HF_HUB_OFFLINE is set") in err


def test_a_name_in_the_hub_cache_is_not_refused_offline(tmp_path, monkeypatch):
    from diffalign import hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models--org--cached" / "snapshots").mkdir(parents=True)
    hub.check_hub_name("org/cached", "model")  # cached: the library reads it offline
    with pytest.raises(hub.UserError, match="HF_HUB_OFFLINE is set"):
        hub.check_hub_name("org/other", "model")


def test_resuming_a_finished_run_reports_its_metrics(tiny_model, toy_pairs, tmp_path, capsys):
    """resume=latest with checkpoints at max_steps printed `done:` and nothing else (item 5)."""
    from diffalign.cli import main

    argv = ["-q", "train", "tiny/dpo", f"model={tiny_model('sd15')}", f"data={toy_pairs}", f"output_dir={tmp_path / 'o'}",
            "max_steps=2", "checkpoint_every=1"]
    assert main(argv) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert main([*argv, "resume=latest"]) == 0
    out = capsys.readouterr().out
    assert "already at max_steps=2, nothing to train" in out
    done = out.strip().splitlines()[-1]
    assert done.startswith("done:") and "step=2 loss=" in done and done == first


def test_eval_reports_progress_to_a_log_file_and_leaves_nothing_when_it_fails(tiny_model, tmp_path, capsys, monkeypatch):
    """`eval` was silent with its output in a log file (item 10); a failed eval left an empty
    output directory (smaller items)."""
    from diffalign.cli import main
    from diffalign.eval import generate

    for var in ("DIFFALIGN_QUIET", "TQDM_DISABLE"):  # other tests' -q sets them in this process
        monkeypatch.delenv(var, raising=False)
    model = str(tiny_model("sd15"))
    assert main(["eval", "--model", model, "--prompts", "testbed_heldout:3", "--reward", "jpeg", "--seeds", "2",
                 "--out", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err  # captured: not a terminal, as a log file is not
    assert "eval ev: 100%" in err and "6/6" in err

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generate, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["-q", "eval", "--model", model, "--prompts", "testbed_heldout:3", "--reward", "jpeg", "--out", str(tmp_path / "ev2")])
    assert not (tmp_path / "ev2").exists()
    # a directory the user already had is left alone
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError):
        main(["-q", "eval", "--model", model, "--prompts", "testbed_heldout:3", "--reward", "jpeg", "--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine").is_dir()


def test_score_reads_the_per_image_csv_that_eval_writes(tiny_model, tmp_path, capsys):
    import csv

    from diffalign.cli import main

    ev = tmp_path / "ev"
    assert main(["-q", "eval", "--model", str(tiny_model("sd15")), "--prompts", "testbed_heldout:2", "--reward", "jpeg",
                 "--out", str(ev)]) == 0
    assert main(["-q", "score", "--reward", "jpeg", "--images", str(ev / "images"), "--prompts", str(ev / "per_image.csv"),
                 "--out", str(tmp_path / "s.csv")]) == 0
    evals = {Path(r["image"]).name: float(r["jpeg"]) for r in csv.DictReader(open(ev / "per_image.csv"))}
    scored = {Path(r["image"]).name: float(r["jpeg"]) for r in csv.DictReader(open(tmp_path / "s.csv"))}
    assert scored == pytest.approx(evals) and len(scored) == 4  # 2 prompts x the default 2 seeds


def test_reward_server_logs_each_request_and_says_which_method_a_path_takes():
    """The reward server wrote no access log and answered GET /score with 404 "unknown path"."""
    import http.client

    import torch

    from diffalign.rewards import FunctionReward
    from diffalign.rewards.server import RewardServer

    lines: list[str] = []
    reward = FunctionReward(lambda images, prompts, metadata: torch.stack([i.mean() for i in images]), "brightness")
    with RewardServer(reward, "127.0.0.1", 0, log=lines.append) as server:
        host, port = server.address
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/score")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 405 and resp.getheader("Allow") == "POST" and "takes POST" in body
        conn.close()
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    lines = [line for line in lines if line.startswith('127.0.0.1 "')]  # access lines; a closing client may add a "dropped" one
    assert len(lines) == 2
    assert lines[0].startswith('127.0.0.1 "GET /score" 405 ') and "takes POST" in lines[0]
    assert lines[1].startswith('127.0.0.1 "GET /health" 200 ')
    quiet: list[str] = []
    with RewardServer(reward, "127.0.0.1", 0, log=quiet.append, access_log=False) as server:
        conn = http.client.HTTPConnection(*server.address, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    assert quiet == []
