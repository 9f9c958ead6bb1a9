"""VLM-judge reward against a real OpenAI-compatible stand-in on 127.0.0.1 (http.server in a thread):
a good score, bad JSON, a timeout, HTTP 500, an unparsable score, a server that is down -- each the
right value or one clear error line -- and the reward behind ``diffalign serve-reward``."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.errors import UserError
from diffalign.rewards import get_reward
from diffalign.rewards.vlm_judge import DEFAULT_TEMPLATE, VLMJudge, VLMJudgeError, api_base, parse_score


class FakeJudge:
    """``/v1/models`` and ``/v1/chat/completions`` as vLLM answers them. In mode ``good`` the score
    is the first character of the caption (``Text Caption: [3 cats]`` -> 3), so every answer can be
    matched to its request; other modes answer badly."""

    def __init__(self):
        self.mode = "good"
        self.models = ["judge-1"]
        self.answer = None  # a fixed answer text, overriding the caption rule
        self.requests: list[dict] = []
        self.hits = 0
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except ConnectionError:  # the client gave up (timeout test): nothing to answer
                    pass

            def do_GET(self):  # noqa: N802
                if self.path == "/v1/models":
                    self.reply(200, json.dumps({"object": "list", "data": [{"id": m, "object": "model"}
                                                                           for m in judge.models]}).encode())
                else:
                    self.reply(404, b'{"detail": "Not Found"}')

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.hits += 1
                    judge.requests.append(body)
                    judge.in_flight += 1
                    judge.peak = max(judge.peak, judge.in_flight)
                try:
                    self.answer_for(body)
                finally:
                    with judge.lock:
                        judge.in_flight -= 1

            def answer_for(self, body: dict) -> None:
                if self.path != "/v1/chat/completions":
                    return self.reply(404, b'{"detail": "Not Found"}')
                mode = judge.mode
                if mode == "slow":
                    judge.release.wait(5.0)
                if mode == "500":
                    return self.reply(500, json.dumps({"error": {"message": "CUDA out of memory",
                                                                 "type": "InternalServerError"}}).encode())
                if mode == "badjson":
                    return self.reply(200, b"<html>upstream proxy error</html>")
                if mode == "404model":
                    return self.reply(404, json.dumps({"error": {"message": f"The model `{body['model']}` "
                                                                 "does not exist."}}).encode())
                text = body["messages"][-1]["content"][-1]["text"]
                caption = re.search(r"Text Caption: \[(.*)\]", text, re.S).group(1)
                time.sleep(0.02)  # long enough for concurrent requests to overlap
                answer = judge.answer or f"The image shows the caption well.\nFinal Score: {caption[0]}"
                if mode == "unparsable":
                    answer = "A lovely picture, I would rate it highly."
                self.reply(200, json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                                "role": "assistant", "content": answer}}]}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge():
    j = FakeJudge()
    yield j
    j.close()


def images(n: int, seed: int = 0, h: int = 24, w: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255.0


PROMPTS = ["3 cats", "5 dogs", "1 car", "4 {braces} and [brackets]", "2 birds", "3 cats"]


def fast(judge: FakeJudge, **kw) -> VLMJudge:
    kw = {"timeout": 1.0, "retries": 1, "backoff": 0.01, **kw}
    return get_reward(f"vlm_judge={judge.url}", **kw)


def test_parse_score_and_url():
    assert parse_score("blah\nFinal Score: 4") == 4.0
    assert parse_score("final score: 3.5 because") == 3.5
    assert parse_score("**Final Score:** **2**") == 2.0
    assert parse_score("Final Score: 4.") == 4.0
    assert parse_score("Final Score: 10") is None  # not read as its first digit
    assert parse_score("Final Score: 0") is None
    assert parse_score("Score: 4") is None
    assert parse_score("rating=7", r"rating=(\d+)") == 7.0
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_base("https://h/v1/chat/completions") == "https://h/v1"
    assert api_base("http://h:8000/openai/v1") == "http://h:8000/openai/v1"
    with pytest.raises(UserError, match="not an http"):
        api_base("h:8000")
    with pytest.raises(UserError, match="needs an OpenAI-compatible endpoint"):
        get_reward("vlm_judge")
    with pytest.raises(UserError, match="local inference through transformers is not implemented yet"):
        get_reward("vlm_judge=/models/UnifiedReward-qwen-7b")


def test_good_scores_payload_and_concurrency(judge):
    reward = fast(judge, model="judge-1", concurrency=4, batch_size=4)
    imgs = images(len(PROMPTS))
    out = reward(imgs, PROMPTS)
    raw = torch.tensor([3.0, 5, 1, 4, 2, 3])
    torch.testing.assert_close(out.details["vlm_judge_raw"], raw)
    torch.testing.assert_close(out.scores, raw / 5)  # Flow-GRPO's scale
    assert out.scores.dtype == torch.float32 and set(out.details) == {"vlm_judge", "vlm_judge_raw"}
    assert judge.hits == 6 and judge.peak > 1  # requests overlapped
    body = next(r for r in judge.requests if "{braces}" in r["messages"][0]["content"][1]["text"])
    assert body["model"] == "judge-1" and body["temperature"] == 0.0 and body["max_tokens"] == 1024
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": DEFAULT_TEMPLATE.replace("{prompt}", PROMPTS[3])}
    assert text_part["text"].endswith("Text Caption: [4 {braces} and [brackets]]")
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    expected = (imgs[3] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(sent, expected)  # the image itself, lossless
    # scale, template and pattern are arguments
    custom = fast(judge, model="judge-1", divide_by=1, template="Rate: {prompt}\nText Caption: [{prompt}]",
                  system="be strict", image_size=16, image_format="jpeg", max_tokens=None)
    out = custom(imgs[:2], PROMPTS[:2])
    torch.testing.assert_close(out.scores, torch.tensor([3.0, 5.0]))
    body = judge.requests[-1]
    assert body["messages"][0] == {"role": "system", "content": "be strict"} and "max_tokens" not in body
    url = body["messages"][1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (16, 16)


def test_model_from_the_endpoint(judge):
    reward = fast(judge)
    assert reward(images(1), ["2 x"]).scores.item() == pytest.approx(0.4)
    assert reward.model == "judge-1" and judge.requests[-1]["model"] == "judge-1"
    judge.models = ["a", "b"]
    with pytest.raises(VLMJudgeError, match=r"/v1/models: cannot choose the judge model \(it lists a, b\); "
                                            "pass model=NAME"):
        fast(judge)(images(1), ["2 x"])
    judge.mode = "404model"
    with pytest.raises(VLMJudgeError, match=r"chat/completions: HTTP 404: 'The model `nope` does not exist.'"):
        fast(judge, model="nope")(images(1), ["2 x"])
    assert judge.hits == 2  # a 4xx is not retried


def test_bad_json(judge):
    judge.mode = "badjson"
    with pytest.raises(VLMJudgeError, match=rf"^reward 'vlm_judge': {re.escape(judge.url)}/chat/completions: "
                                            r"answered HTTP 200 with invalid JSON: '<html>upstream proxy error"):
        fast(judge, model="m")(images(1), ["3 x"])


def test_timeout(judge):
    judge.mode = "slow"
    t0 = time.perf_counter()
    with pytest.raises(VLMJudgeError, match=r"chat/completions: no answer within 0.3 s \(2 attempts\)"):
        fast(judge, model="m", timeout=0.3, retries=1)(images(1), ["3 x"])
    assert 0.5 < time.perf_counter() - t0 < 3.0
    assert judge.hits == 2


def test_http_500_after_retries(judge):
    judge.mode = "500"
    with pytest.raises(VLMJudgeError, match=r"chat/completions: HTTP 500 after 3 attempts: 'CUDA out of memory'"):
        fast(judge, model="m", retries=2)(images(1), ["3 x"])
    assert judge.hits == 3


def test_unparsable_and_out_of_range_scores(judge):
    judge.mode = "unparsable"
    with pytest.raises(VLMJudgeError, match=r"chat/completions: no score in the answer for image 0 \(prompt '3 x'\): "
                                            r"pattern /\(\?i\)Final Score:.*/ does not match 'A lovely picture"):
        fast(judge, model="m", concurrency=1)(images(2), ["3 x", "5 dogs"])
    assert judge.hits == 1  # stops at the first failure
    with pytest.raises(VLMJudgeError, match=r"no score in the answer for image [01]"):
        fast(judge, model="m", concurrency=2)(images(2), ["3 x", "5 dogs"])  # concurrent: the first to fail
    judge.mode = "good"
    judge.answer = "Final Score: 5.5"
    with pytest.raises(VLMJudgeError, match=r"score 5.5 for image 0 .* is outside 1..5"):
        fast(judge, model="m")(images(1), ["3 x"])


def test_server_down():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = VLMJudge(f"http://127.0.0.1:{port}", model="m", timeout=1.0, retries=1, backoff=0.01)
    with pytest.raises(VLMJudgeError, match=rf"127.0.0.1:{port}/v1/chat/completions: cannot connect after 2 "
                                            r"attempts \(.*refused.*\); is the server running"):
        reward(images(1), ["3 x"])
    with pytest.raises(VLMJudgeError, match=r"/v1/models: cannot connect"):  # model lookup at load
        VLMJudge(f"http://127.0.0.1:{port}/v1", timeout=1.0, retries=0).ensure_loaded()


def test_vlm_judge_through_serve_reward_command(judge):
    """``diffalign serve-reward --reward vlm_judge=URL`` in a subprocess (the model name comes from
    ``/v1/models``), scored by RemoteReward; a judge failure reaches the client as one line."""
    from diffalign.rewards.server import RemoteReward, RemoteRewardError

    proc = subprocess.Popen(
        [sys.executable, "-m", "diffalign.cli", "serve-reward", "--reward", f"vlm_judge={judge.url}",
         "--host", "127.0.0.1", "--port", "0", "--no-access-log"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert "serving vlm_judge at http://127.0.0.1:" in line, \
            (line, proc.stderr.read() if proc.poll() is not None else "")
        remote = RemoteReward(line.split(" at ")[1].split()[0], retries=0)
        imgs = images(4)
        out = remote(imgs, PROMPTS[:4])
        assert remote.name == "vlm_judge" and remote.needs_prompt
        torch.testing.assert_close(out.scores, torch.tensor([3.0, 5, 1, 4]) / 5)
        torch.testing.assert_close(out.details["vlm_judge_raw"], torch.tensor([3.0, 5, 1, 4]))
        assert {r["model"] for r in judge.requests} == {"judge-1"}
        judge.mode = "unparsable"
        with pytest.raises(RemoteRewardError, match=r"answered 500: reward failed: VLMJudgeError: reward "
                                                     r"'vlm_judge': .*no score in the answer for image 0"):
            remote(imgs[:1], PROMPTS[:1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
