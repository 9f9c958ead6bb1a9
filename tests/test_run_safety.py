"""Run-directory safety and one-line errors for common training mistakes (issue 15, items 2 and 4).

Every case goes through ``diffalign.cli.main`` as a user would and checks the message, the exit
code and that no traceback reaches stderr. Training runs are tiny (SFT, LoRA rank 4, 32 px,
2-4 steps on the tiny SD1.5 model).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.errors import UserError

# One torch thread: with two on a busy 2-core machine, OpenMP spin-waits make a tiny step ~100x slower.
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = """\
method: sft
max_steps: 2
seed: 0
batch_size: 2
lora: {rank: 4}
optim: {learning_rate: 1.0e-3}
data_opts: {resolution: 32, random_flip: false}
"""


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "sft.yaml"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from diffalign.data.toy import write_toy_pickapic

    out = tmp_path_factory.mktemp("pairs16")
    write_toy_pickapic(out, n=16, size=32, seed=0)
    return str(out)


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    except KeyboardInterrupt:  # must not escape main (it would also end this pytest session)
        rc = "KeyboardInterrupt escaped diffalign.cli.main"
    out, err = capsys.readouterr()
    return rc, out, err


def train(capsys, cfg_file, model, data, out, *extra):
    return cli(capsys, "train", cfg_file, f"model={model}", f"data={data}", f"output_dir={out}", *extra)


@pytest.fixture(scope="module")
def finished_run(one_thread, tiny_model, data, cfg_file, tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint after each step (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", cfg_file, f"model={tiny_model('sd15')}", f"data={data}", f"output_dir={out}",
                 "checkpoint_every=1"]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_line_error(rc, err, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], err
    return lines[0]


# ------------------------------------------------------------------------------------ lock
def test_second_writer_gets_the_holders_pid_and_a_stale_lock_is_taken_over(tiny_model, data, cfg_file, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom diffalign.trainers.rundir import acquire_lock\n"
         "acquire_lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), data, out)
        one_line_error(rc, err, f"pid {holder.pid}", "in use by another diffalign run")
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        holder.kill()  # SIGKILL: the lock stays behind, stale
        holder.wait()
    assert (out / ".lock").read_text().split()[0] == str(holder.pid)
    rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), data, out)
    assert rc == 0, err
    # one line of ours, not a Python warning with its source line under it (issue #29)
    (warning,) = [line for line in err.splitlines() if "stale lock" in line]
    assert warning.startswith("warning: ") and "warn(" not in err and "UserWarning" not in err
    assert not (out / ".lock").exists()  # released when the run ends


# ------------------------------------------------------------------------------------ old runs
def test_fresh_run_into_a_dir_of_another_config(tiny_model, data, cfg_file, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = (out / "metrics.jsonl").read_text()
    rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), data, out, "method=dpo", "loss.beta=500")
    one_line_error(rc, err, "holds a run of a different config", 'method ("sft" -> "dpo")', "overwrite=true")
    assert (out / "metrics.jsonl").read_text() == before  # refused before touching anything
    assert "method: sft" in (out / "config.yaml").read_text()

    rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), data, out, "method=dpo", "loss.beta=500", "overwrite=true")
    assert rc == 0, err
    assert "method: dpo" in (out / "config.yaml").read_text()
    assert not (out / "checkpoints").exists()  # the sft run's checkpoints went with it
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # The same config again (overwrite is not part of a run's identity): reruns, like the testbed job does.
    rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), data, out, "method=dpo", "loss.beta=500")
    assert rc == 0, err


def test_unfinished_run_with_checkpoints_needs_resume_or_overwrite(tiny_model, data, cfg_file, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    (out / "final_state.json").unlink()  # as if killed after its last checkpoint
    rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), data, out, "checkpoint_every=1")
    one_line_error(rc, err, "unfinished run of this config", "latest step 2", "resume=latest")


# ------------------------------------------------------------------------------------ resume
def test_resume_with_a_different_config_names_the_keys(tiny_model, data, cfg_file, finished_run, tmp_path, capsys):
    model = tiny_model("sd15")
    out = copy_run(finished_run, tmp_path / "run")
    args = (cfg_file, model, data, out, "resume=latest", "max_steps=3", "lora.rank=8", "optim.learning_rate=0.01")
    rc, _, err = train(capsys, *args)
    one_line_error(rc, err, "different config", "lora.rank (4 -> 8)", "optim.learning_rate (0.001 -> 0.01)")

    (out / "config.yaml").unlink()  # the checkpoint's own config.yaml still says what it was trained with
    rc, _, err = train(capsys, *args)
    one_line_error(rc, err, "checkpoint", "step-000002", "lora.rank (4 -> 8)")

    for ckpt in (out / "checkpoints").iterdir():  # a checkpoint without any config (older diffalign)
        (ckpt / "config.yaml").unlink()
    rc, _, err = train(capsys, cfg_file, model, data, out, "resume=latest", "max_steps=3", "lora.rank=8")
    one_line_error(rc, err, "another lora.rank or base model")

    # What may differ: max_steps, checkpointing and logging.
    out2 = copy_run(finished_run, tmp_path / "run2")
    rc, out_text, err = train(capsys, cfg_file, model, data, out2, "resume=latest", "max_steps=3", "checkpoint_every=3",
                              "log_every=1", "checkpoints_keep=1")
    assert rc == 0, err
    assert "step-000002 (step 2)" in out_text
    assert [json.loads(l)["step"] for l in (out2 / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_from_a_path_that_does_not_exist(tiny_model, data, cfg_file, tmp_path, capsys):
    rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), data, tmp_path / "run", f"resume={tmp_path / 'nope'}")
    line = one_line_error(rc, err, "does not exist", str(tmp_path / "nope"))
    assert "partial" not in line


def test_every_checkpoint_corrupt_is_an_error_not_a_restart(tiny_model, data, cfg_file, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "trainable.safetensors").write_bytes(b"garbage")
    before = (out / "metrics.jsonl").read_text()
    rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), data, out, "resume=latest", "max_steps=3")
    one_line_error(rc, err, "none of the 2 checkpoint(s)", "can be loaded")
    assert sum(line.startswith("warning: skipping checkpoint") for line in err.splitlines()) == 2, err
    assert (out / "metrics.jsonl").read_text() == before  # did not start again from step 0


# ------------------------------------------------------------------------------------ mistakes
@pytest.mark.parametrize("command", ["train", "eval", "demo", "testbed-compare"])
def test_output_dir_that_is_a_file(command, cfg_file, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("not a directory")
    argv = {
        "train": ["train", cfg_file, "model=m", "data=d", f"output_dir={f}"],
        "eval": ["eval", "--model", tmp_path / "m", "--prompts", tmp_path / "p.txt", "--reward", "redness", "--out", f],
        "demo": ["demo", "--out", f, "--steps", "1"],
        "testbed-compare": ["testbed-compare", "--out", f, "--budget", "quick"],
    }[command]
    rc, _, err = cli(capsys, *argv)
    one_line_error(rc, err, str(f), "is an existing file")
    assert f.read_text() == "not a directory"


def test_debug_flag_and_env_show_the_traceback(cfg_file, tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("")
    argv = ["train", cfg_file, "model=m", "data=d", f"output_dir={f}"]
    with pytest.raises(UserError, match="is an existing file"):
        main(["--debug", *argv])
    monkeypatch.setenv("DIFFALIGN_DEBUG", "1")
    with pytest.raises(UserError, match="is an existing file"):
        main(argv)
    monkeypatch.setenv("DIFFALIGN_DEBUG", "0")
    assert main(argv) == 2


def test_train_without_arguments_asks_only_for_the_config(capsys):
    rc, _, err = cli(capsys, "train")
    assert rc == 2
    assert "required: config" in err and "overrides" not in err.splitlines()[-1], err


def test_eval_lora_of_another_base(tiny_model, finished_run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    rc, _, err = cli(capsys, "eval", "--model", tiny_model("sdxl"), "--lora", finished_run, "--prompts", prompts,
                     "--reward", "redness", "--out", tmp_path / "ev", "--steps", "1", "--seeds", "1", "--resolution", "32")
    one_line_error(rc, err, f"--lora {finished_run} does not fit --model", "trained on another base model",
                   f"trained on {tiny_model('sd15')}")
    assert "size mismatch for" not in err  # torch's multi-line state-dict dump is not shown


# ------------------------------------------------------------------------------------ Ctrl-C
@pytest.fixture
def terminal_sigint():
    """SIGINT as at a terminal. A shell starts background jobs (``cmd &``, e.g. a CI script run
    that way) with SIGINT ignored, and a run started so rightly keeps ignoring it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _sigint_at_call(monkeypatch, n: int):
    """Send this process a real SIGINT during the n-th training step (inside the loss)."""
    import diffalign.trainers.pair as pair

    calls = {"n": 0}
    real = pair.pair_loss

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, in the middle of the step
        return real(*a, **k)

    monkeypatch.setattr(pair, "pair_loss", loss)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_model, data, cfg_file, tmp_path, capsys, monkeypatch, terminal_sigint):
    model, out = tiny_model("sd15"), tmp_path / "run"
    _sigint_at_call(monkeypatch, 2)
    rc, _, err = train(capsys, cfg_file, model, data, out, "max_steps=4", "checkpoint_every=10")
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted at step 2; checkpoint saved to" in err and "rerun with resume=latest to continue" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # the step finished first
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / ".lock").exists()
    monkeypatch.undo()
    rc, out_text, err = train(capsys, cfg_file, model, data, out, "max_steps=4", "checkpoint_every=10", "resume=latest")
    assert rc == 0, err
    assert "(step 2)" in out_text
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_ctrl_c_without_checkpointing(tiny_model, data, cfg_file, tmp_path, capsys, monkeypatch, terminal_sigint):
    out = tmp_path / "run"
    _sigint_at_call(monkeypatch, 1)
    rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), data, out, "max_steps=3")
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted at step 1" in err and "resume=latest" not in err, err
    assert not (out / "checkpoints").exists()


# ------------------------------------------------------------------------------------ smaller
def test_failed_run_leaves_no_config_yaml(tiny_model, cfg_file, tmp_path, capsys):
    empty = tmp_path / "nodata"
    empty.mkdir()
    out = tmp_path / "run"
    rc, _, err = train(capsys, cfg_file, tiny_model("sd15"), empty, out)
    assert rc == 2, err
    assert not (out / "config.yaml").exists() and not (out / ".lock").exists()


def test_safetensors_we_write_are_0644(finished_run):
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    files = [finished_run / "pytorch_lora_weights.safetensors", *(finished_run / "checkpoints").rglob("*.safetensors")]
    assert len(files) >= 3
    for f in files:
        assert f.stat().st_mode & 0o777 == expected, (f, oct(f.stat().st_mode))


def test_skipped_rows_are_reported_on_the_console(tiny_model, cfg_file, tmp_path, capsys):
    import pyarrow.parquet as pq

    from diffalign.data.toy import make_toy_pickapic_rows, pickapic_table

    cols = make_toy_pickapic_rows(16, size=32, seed=0, tie_fraction=0.0)
    for i in range(0, 16, 2):
        cols["jpg_0"][i] = b"not an image"
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pickapic_table(cols), data / "p.parquet")
    out = tmp_path / "run"
    rc, out_text, err = train(capsys, cfg_file, tiny_model("sd15"), data, out, "max_steps=3")
    assert rc == 0, err
    skipped = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["skipped_rows"]
    assert skipped > 0
    assert (f"skipped {skipped} of the {skipped + 6} rows training read for its 6 pairs: undecodable image "
            "(counted in metrics.jsonl skipped_rows)") in out_text
