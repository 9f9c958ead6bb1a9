"""Issue 15, items 3/5/6: reward-server limits and broken clients, content-keyed latent cache,
quiet logs (no warnings from our own calls, no ESC[A in logs, -q), reward name aliases."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from diffalign.rewards import FunctionReward
from diffalign.rewards.server import RewardServer, encode_image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _brightness():
    return FunctionReward(lambda images, prompts, metadata: torch.stack([i.mean() for i in images]), "brightness")


def _request(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height (the IHDR rewritten, CRC fixed)."""
    data = bytearray(_png(1, 1))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _score_body(images: list[bytes]) -> bytes:
    return json.dumps({"images": [base64.b64encode(b).decode() for b in images]}).encode()


# --------------------------------------------------------------------------------------------
# reward server
# --------------------------------------------------------------------------------------------


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    with RewardServer(_brightness(), "127.0.0.1", 0, max_pixels=1000 * 1000) as server:
        # a real 2000x2000 image that compresses to a few KB: refused, not decoded
        small_file = _png(2000, 2000)
        assert len(small_file) < 100_000
        status, body = _request(server.url, "POST", "/score", _score_body([_png(8, 8), small_file]))
        assert status == 413, body
        assert "images[1] is 2000x2000 = 4000000 pixels" in body["error"] and "at most 1000000" in body["error"]
        # a 1x1 PNG whose header claims 30000x30000: decoding would need GBs; answered at once
        t0 = time.perf_counter()
        status, body = _request(server.url, "POST", "/score", _score_body([_png_claiming(30000, 30000)]))
        assert status == 413 and "pixels" in body["error"], body
        assert time.perf_counter() - t0 < 5
        # below the limit still works
        status, body = _request(server.url, "POST", "/score", _score_body([_png(1000, 1000)]))
        assert status == 200 and len(body["scores"]) == 1
        assert _request(server.url, "GET", "/health")[1]["max_pixels"] == 1000 * 1000


def test_per_request_image_cap_defaults_to_64():
    with RewardServer(_brightness(), "127.0.0.1", 0) as server:
        assert server.max_images == 64
        tiny = _png(2, 2)
        status, body = _request(server.url, "POST", "/score", _score_body([tiny] * 65))
        assert status == 413 and "at most 64 per request" in body["error"]
        status, body = _request(server.url, "POST", "/score", _score_body([tiny] * 64))
        assert status == 200 and len(body["scores"]) == 64


def test_non_image_error_names_the_image_not_a_python_object():
    with RewardServer(_brightness(), "127.0.0.1", 0) as server:
        status, body = _request(server.url, "POST", "/score", _score_body([_png(4, 4), b"this is not an image"]))
    assert status == 400
    assert body["error"].startswith("images[1]: cannot decode") and "PNG" in body["error"]
    assert "BytesIO" not in body["error"] and "0x" not in body["error"]


def test_non_loopback_bind_logs_a_warning():
    lines: list[str] = []
    RewardServer(_brightness(), "127.0.0.1", 0, log=lines.append).close()
    assert lines == []
    RewardServer(_brightness(), "0.0.0.0", 0, log=lines.append).close()
    assert len(lines) == 1 and "warning" in lines[0] and "0.0.0.0" in lines[0] and "127.0.0.1" in lines[0]


def test_broken_clients_leave_no_traceback(capfd):
    lines: list[str] = []
    with RewardServer(_brightness(), "127.0.0.1", 0, log=lines.append) as server:
        host, port = server.address
        img = base64.b64encode(_png(4, 4)).decode()
        full = json.dumps({"images": [img]}).encode()
        head = (f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(full) + 500}\r\n\r\n").encode()
        # 1) Content-Length larger than the body, then the client stops sending: a 400 that says so
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(head + full)
            s.shutdown(socket.SHUT_WR)
            answer = s.makefile("rb").read().decode()
        assert answer.startswith("HTTP/1.1 400") and f"ended after {len(full)} of the {len(full) + 500} bytes" in answer
        # 2) clients that vanish (reset) mid-body or before reading the answer
        for payload in (head + full[:10], head + full + b" " * 500):
            s = socket.create_connection((host, port), timeout=30)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            s.sendall(payload)
            s.close()
        time.sleep(0.5)
        # 3) the server still answers
        status, body = _request(server.url, "POST", "/score", full)
        assert status == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "ConnectionResetError" not in err, err
    assert all("\n" not in line for line in lines)  # one line per dropped client


def test_openapi_document_is_served_and_in_help(capsys):
    from diffalign.cli import build_parser

    with RewardServer(_brightness(), "127.0.0.1", 0, max_images=7) as server:
        status, doc = _request(server.url, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    post = doc["paths"]["/score"]["post"]
    assert {"200", "400", "413"} <= set(post["responses"])
    request = doc["components"]["schemas"]["ScoreRequest"]
    assert request["required"] == ["images"] and request["properties"]["images"]["maxItems"] == 7
    assert "scores" in doc["components"]["schemas"]["ScoreResponse"]["properties"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve-reward", "--help"])
    text = capsys.readouterr().out
    assert "GET /openapi.json" in text and '"images"' in text and '"scores"' in text and "--max-pixels" in text


# --------------------------------------------------------------------------------------------
# content-keyed latent cache
# --------------------------------------------------------------------------------------------


def test_cache_is_rebuilt_after_the_data_is_regenerated(tiny_model, tmp_path):
    from diffalign.config import load_config
    from diffalign.data.toy import write_toy_pickapic
    from diffalign.trainers import train

    data, cache = tmp_path / "data", tmp_path / "cache"
    write_toy_pickapic(data, n=12, size=32, seed=0)
    args = ["tiny/dpo", f"model={tiny_model('sd15')}", f"data={data}", f"data_opts.cache_dir={cache}"]
    cli = [sys.executable, "-m", "diffalign.cli", "-q", "cache", *args]
    first = subprocess.run(cli, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr
    old = json.loads((cache / "index.json").read_text())
    assert len(old["rows"]) + sum(old["skipped"].values()) == 12

    write_toy_pickapic(data, n=20, size=32, seed=1)  # same path, new rows
    again = subprocess.run(cli, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "is stale (data files changed: train-00000-of-00001.parquet); rebuilding it" in again.stderr
    assert "cache latents" not in again.stderr and "\r" not in again.stderr  # -q: no progress bars
    new = json.loads((cache / "index.json").read_text())
    assert len(new["rows"]) + sum(new["skipped"].values()) == 20

    # training notices a regeneration too, and trains on the new rows
    write_toy_pickapic(data, n=16, size=32, seed=2)
    cfg = load_config("tiny/dpo", [*args[1:], f"output_dir={tmp_path / 'run'}", "max_steps=1", "batch_size=2"])
    train(cfg)
    trained = json.loads((cache / "index.json").read_text())
    assert len(trained["rows"]) + sum(trained["skipped"].values()) == 16
    assert trained["rows"] != new["rows"] or trained["captions"] != new["captions"]


# --------------------------------------------------------------------------------------------
# quiet logs
# --------------------------------------------------------------------------------------------


NOISE = ("Warning", "warn(", "deprecated", "should be kept in float32", "No LoRA keys", "is in beta")


def test_tiny_train_and_eval_print_no_warnings_and_no_cursor_escapes(tiny_model, toy_pairs, tmp_path):
    model = tiny_model("sd15")
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    runs = [
        ["train", "tiny/dpo", f"model={model}", f"data={toy_pairs}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
         "batch_size=2"],
        ["eval", "--model", model, "--lora", str(tmp_path / "run"), "--prompts", str(tmp_path / "prompts.txt"),
         "--out", str(tmp_path / "eval"), "--seeds", "1", "--steps", "2", "--reward", "jpeg"],
    ]
    for argv in runs:
        # stdout/stderr are pipes, as in a log file
        p = subprocess.run([sys.executable, "-m", "diffalign.cli", *argv], capture_output=True, text=True, env=ENV,
                           cwd=tmp_path, timeout=600)
        assert p.returncode == 0, p.stderr
        for stream in (p.stdout, p.stderr):
            assert "\x1b[A" not in stream, f"{argv[0]}: cursor-up escapes in the log:\n{stream}"
            noisy = [line for line in stream.replace("\r", "\n").splitlines() if any(n in line for n in NOISE)]
            assert not noisy, f"{argv[0]}: warnings in the log:\n" + "\n".join(noisy)


def test_group_fraction_raises_no_beta_warning():
    from diffalign.trainers.advantages import zero_std_group_fraction

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frac = zero_std_group_fraction(torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([0, 0, 1, 1]))
    assert frac == 0.5


def test_library_call_filters_only_inside_and_verbose_shows_all(monkeypatch):
    import logging

    from diffalign.logging import library_call

    log = logging.getLogger("diffusers.models.fake")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with library_call(r"noise \d"):
                log.warning("noise 1")
                log.warning("signal")
                warnings.warn("noise 2", FutureWarning)
                warnings.warn("other", FutureWarning)
        log.warning("noise 3")  # outside the call: shown
        monkeypatch.setenv("DIFFALIGN_VERBOSE", "1")
        with library_call(r"noise \d"):
            log.warning("noise 4")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert records == ["signal", "noise 3", "noise 4"]
    assert [str(w.message) for w in caught] == ["other"]


def test_quiet_and_verbose_flags_exclude_each_other():
    p = subprocess.run([sys.executable, "-m", "diffalign.cli", "-q", "-v", "recipes"], capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert p.returncode == 2 and "not allowed with" in p.stderr


# --------------------------------------------------------------------------------------------
# names and messages
# --------------------------------------------------------------------------------------------


def test_reward_name_aliases():
    from diffalign.rewards.tiny import BUILDERS as REWARD_BUILDERS
    from diffalign.rewards import get_reward
    from diffalign.rewards.registry import canonical_name

    # one name for the JPEG reward in score CSVs (reward.name) and eval CSVs (the spec as typed)
    assert canonical_name("jpeg_compressibility") == "jpeg" and canonical_name("clip") == "clipscore"
    assert canonical_name("pickscore") == "pickscore"
    assert get_reward("jpeg").name == get_reward("jpeg_compressibility").name == "jpeg"
    builders = REWARD_BUILDERS  # what `tiny-model` (diffalign.api.tiny_model) offers besides the model families
    assert builders["clipscore"] is builders["clip"]  # tiny-model clipscore DIR, as --reward clipscore=DIR
    assert get_reward("clip").name == "clipscore"


def test_reward_accuracy_message_says_what_each_number_is():
    from diffalign.rewards.pairs import describe_accuracy

    text = describe_accuracy({"accuracy": 0.75, "accuracy_strict": 1.0, "pairs": 4, "human_ties": 2})
    assert text == ("accuracy 0.750 over all 4 pairs (a human tie counts 0.5), "
                    "1.000 over the 2 pairs without a human tie")
