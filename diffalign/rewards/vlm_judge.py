"""VLM-judge reward (``--reward vlm_judge=http://HOST:PORT/v1``): a vision-language model rates each
image for its prompt, over any OpenAI-compatible chat-completions endpoint -- how UnifiedReward is
run in practice (``vllm serve CodeGoat24/UnifiedReward-qwen-7b``, or SGLang's server).

Default prompt and parsing are UnifiedReward's pointwise image-generation mode as Flow-GRPO calls
it (``unifiedreward_score_sglang`` in ``flow_grpo/rewards.py``, github.com/yifan123/flow_grpo; the
same wording as UnifiedReward's ``inference_qwen/image_generation/qwen_point_score_image_generation.py``,
github.com/CodeGoat24/UnifiedReward, minus its element-extraction sentence):

* one user message: the image as an ``image_url`` part holding a ``data:image/png;base64,...`` URL,
  then :data:`DEFAULT_TEMPLATE` with ``{prompt}`` replaced by the prompt (plain substitution, so
  braces in prompts or templates need no escaping). Flow-GRPO also prefixes the text with a
  literal ``<image>\\n``, a LLaVA leftover; the chat API places the image itself, so we do not;
* ``temperature=0`` (greedy), as Flow-GRPO;
* the score is the number after ``Final Score:`` (:data:`DEFAULT_SCORE_PATTERN`: Flow-GRPO's
  ``Final Score:\\s*([1-5](?:\\.\\d+)?)``, made case-insensitive, allowing Markdown bold
  (``**Final Score:** **4**``), and refusing ``10`` instead of reading its ``1``), on UnifiedReward's 1-5 scale;
* ``scores = raw / divide_by`` with ``divide_by=5`` (Flow-GRPO's ``sc / 5.0``, so scores lie in
  [0.2, 1]); ``details["vlm_judge_raw"]`` keeps the 1-5 value. ``divide_by=1`` gives raw scores.

Flow-GRPO scores an unparsable answer 0.0; here it raises (a silent 0 is a wrong reward). Every
failure -- endpoint down, timeout, HTTP error after retries, invalid JSON, an answer without a
score -- is one :class:`VLMJudgeError` line (a :class:`~diffalign.errors.UserError`) naming the
URL and what went wrong.

Transport: ``requests`` with ``urllib3.util.Retry`` (both already installed: diffusers requires
requests): connection errors, read timeouts and HTTP 429/500/502/503/504 are retried ``retries``
times with exponential backoff (``backoff * 2**(n-1)`` s; a ``Retry-After`` header is honoured);
other 4xx answers fail at once. Images of a micro-batch are sent concurrently by a thread pool of
``concurrency`` workers (vLLM/SGLang batch concurrent requests on the GPU).

Template, pattern, scale, model and sampling are reward arguments (GRPO:
``rewards: [{name: vlm_judge=http://127.0.0.1:8000/v1, args: {model: UnifiedReward}}]``). Without
``model`` the endpoint's ``GET /models`` must list exactly one model, which is used -- so
``diffalign score --reward vlm_judge=URL`` works against a single-model vLLM server.

Local inference through transformers (``vlm_judge=/path/to/qwen2.5-vl-dir``) is not implemented
yet: serve the directory with vLLM (``vllm serve DIR``) and point ``vlm_judge`` at it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

import torch

from ..errors import UserError
from .base import Reward, RewardOutput

DEFAULT_TEMPLATE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this "
    "image based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\n"
    "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
#: the first number after "Final Score:" (group 1), 1 to 5 with optional decimals
DEFAULT_SCORE_PATTERN = r"(?i)Final Score:[\s*]*([1-5](?:\.\d+)?)(?!\d)"
#: HTTP statuses retried with backoff (overload and server errors); other errors fail at once
RETRY_STATUSES = (429, 500, 502, 503, 504)
API_KEY_ENV = "VLM_JUDGE_API_KEY"


class VLMJudgeError(UserError, RuntimeError):
    """The judge endpoint failed or answered something unusable: one line naming the URL."""

    def __init__(self, url: str, message: str):
        super().__init__(f"reward 'vlm_judge': {url}: {message}")
        self.url = url
        self.message = message


def api_base(url: str) -> str:
    """``http://host:port[/v1][/chat/completions]`` -> the OpenAI base URL (``.../v1``): a bare
    host gets ``/v1`` (what vLLM and SGLang serve); a full ``/chat/completions`` URL is cut back."""
    u = url.strip().rstrip("/")
    parts = urlsplit(u)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"reward 'vlm_judge': '{url}' is not an http(s) URL; use "
                        "vlm_judge=http://HOST:PORT/v1 (an OpenAI-compatible chat-completions server)")
    if u.endswith("/chat/completions"):
        u = u[: -len("/chat/completions")]
    if urlsplit(u).path in ("", "/"):
        u += "/v1"
    return u


def parse_score(text: str, pattern: str | re.Pattern = DEFAULT_SCORE_PATTERN) -> float | None:
    """The float in group 1 of the first match of ``pattern`` in ``text`` (group 0 when the pattern
    has no group), or None."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    m = rx.search(text)
    if m is None:
        return None
    try:
        return float(m.group(1) if rx.groups else m.group(0))
    except (TypeError, ValueError):
        return None


def _snippet(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[:n] + "...")


class VLMJudge(Reward):
    """Pointwise VLM judge over an OpenAI-compatible ``/chat/completions`` endpoint.

    Args (all keyword, also as GRPO reward ``args``):
        model: the served model name; None: the only one ``GET /models`` lists.
        template: the user text; ``{prompt}`` is replaced by the prompt (a template without it
            makes the reward prompt-free). Default: UnifiedReward pointwise (:data:`DEFAULT_TEMPLATE`).
        system: an optional system message.
        score_pattern: regex whose group 1 is the score (:data:`DEFAULT_SCORE_PATTERN`).
        score_range: ``(low, high)`` a parsed score must lie in (else the answer is an error).
        divide_by: ``scores = raw / divide_by`` (5: Flow-GRPO's scale; 1: the raw score).
        timeout: seconds per request (connect and read); retries: extra attempts after a
            connection error, read timeout or HTTP 429/5xx; backoff: seconds, doubled per retry.
        concurrency: requests in flight at once; batch_size: images per micro-batch.
        max_tokens, temperature, extra_body: sampling (``extra_body`` is merged into the JSON body,
            e.g. ``{"top_k": 1}``); ``max_tokens=None`` leaves the server's default.
        image_format: ``png`` (lossless) or ``jpeg`` (q95, smaller; UnifiedReward's own client);
            image_size: resize to this square size first (Flow-GRPO: 512); None keeps the size.
        api_key: sent as ``Authorization: Bearer``; default: ``$VLM_JUDGE_API_KEY`` if set.
    """

    name = "vlm_judge"
    needs_prompt = True
    differentiable = False
    units = "judge score / divide_by"

    def __init__(self, url: str, *, model: str | None = None, template: str = DEFAULT_TEMPLATE,
                 system: str | None = None, score_pattern: str = DEFAULT_SCORE_PATTERN,
                 score_range: tuple[float, float] | list[float] | None = (1.0, 5.0), divide_by: float = 5.0,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0, concurrency: int = 16,
                 max_tokens: int | None = 1024, temperature: float = 0.0, extra_body: dict | None = None,
                 image_format: str = "png", image_size: int | None = None, api_key: str | None = None,
                 batch_size: int = 64, device: Any = None):
        super().__init__(batch_size=batch_size, device="cpu")
        del device  # the model runs behind the endpoint; nothing is placed on a local device
        self.base_url = api_base(url)
        self.model = model
        if not isinstance(template, str) or not template.strip():
            raise UserError("reward 'vlm_judge': template must be a non-empty string (use {prompt} for the prompt)")
        self.template = template
        self.needs_prompt = "{prompt}" in template
        self.system = system
        try:
            self.score_rx = re.compile(score_pattern)
        except re.error as e:
            raise UserError(f"reward 'vlm_judge': score_pattern {score_pattern!r} is not a valid regex: {e}") from None
        self.score_range = None if score_range is None else (float(score_range[0]), float(score_range[1]))
        if not divide_by:
            raise UserError("reward 'vlm_judge': divide_by must be non-zero")
        self.divide_by = float(divide_by)
        if timeout <= 0 or retries < 0 or backoff < 0 or concurrency < 1:
            raise UserError("reward 'vlm_judge': timeout must be > 0, retries and backoff >= 0, concurrency >= 1")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.concurrency = int(concurrency)
        self.max_tokens = max_tokens
        self.temperature = float(temperature)
        self.extra_body = dict(extra_body or {})
        if image_format not in ("png", "jpeg"):
            raise UserError(f"reward 'vlm_judge': image_format must be png or jpeg, not {image_format!r}")
        self.image_format = image_format
        self.image_size = None if image_size is None else int(image_size)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"VLMJudge(url={self.base_url!r}, model={self.model!r})"

    # -- transport ----------------------------------------------------------------------------
    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            try:
                import requests
                from requests.adapters import HTTPAdapter
                from urllib3.util import Retry
            except ImportError:  # a dependency of diffusers, so normally present
                raise UserError("reward 'vlm_judge' needs the requests package: pip install requests") from None
            retry = Retry(total=self.retries, connect=self.retries, read=self.retries, status=self.retries,
                          other=0, redirect=0, backoff_factor=self.backoff, status_forcelist=RETRY_STATUSES,
                          allowed_methods=None, raise_on_status=False)  # POST too: scoring is idempotent
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=retry, pool_maxsize=self.concurrency)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            headers = {"Content-Type": "application/json"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            session.headers.update(headers)
            self._local.session = session
        return session

    def _request(self, method: str, path: str, payload: dict | None = None) -> Any:
        """One JSON request with retries; any failure -> :class:`VLMJudgeError`."""
        import requests

        url = self.base_url + path
        attempts = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        try:
            resp = self._session().request(method, url, json=payload, timeout=self.timeout)
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as e:
            if isinstance(e, requests.exceptions.Timeout) or "timed out" in str(e).lower():
                raise VLMJudgeError(url, f"no answer within {self.timeout:g} s ({attempts}); a slow or "
                                         "overloaded server: raise timeout= or lower concurrency=") from None
            raise VLMJudgeError(url, f"cannot connect after {attempts} ({_reason(e)}); is the server running "
                                     "and the URL right?") from None
        except requests.exceptions.RequestException as e:
            raise VLMJudgeError(url, f"request failed: {type(e).__name__}: {_reason(e)}") from None
        if resp.status_code >= 400:
            retried = f" after {attempts}" if resp.status_code in RETRY_STATUSES else ""
            raise VLMJudgeError(url, f"HTTP {resp.status_code}{retried}: {_error_text(resp)}")
        try:
            return resp.json()
        except ValueError:
            raise VLMJudgeError(url, f"answered HTTP {resp.status_code} with invalid JSON: "
                                     f"{_snippet(resp.text)}") from None

    def load(self) -> None:
        """Resolve the model name from ``GET /models`` when none is given (also a check that the
        endpoint answers, before ``serve-reward`` binds its port)."""
        if self.model is not None:
            return
        listing = self._request("GET", "/models")
        ids = [m.get("id") for m in listing.get("data", [])] if isinstance(listing, dict) else []
        ids = [i for i in ids if isinstance(i, str)]
        if len(ids) != 1:
            found = f"it lists {', '.join(ids)}" if ids else "it lists none"
            raise VLMJudgeError(self.base_url + "/models", f"cannot choose the judge model ({found}); "
                                                          "pass model=NAME")
        self.model = ids[0]

    # -- one image ----------------------------------------------------------------------------
    def messages(self, image: torch.Tensor, prompt: str | None) -> list[dict]:
        """The chat messages for one ``[3,H,W]`` image in [0,1] and its prompt."""
        from .server import encode_image

        if self.image_size is not None and tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            image = torch.nn.functional.interpolate(image[None].float(), size=(self.image_size, self.image_size),
                                                    mode="bicubic", align_corners=False, antialias=True)[0]
        mime = "image/png" if self.image_format == "png" else "image/jpeg"
        data_url = f"data:{mime};base64,{encode_image(image, self.image_format)}"
        text = self.template.replace("{prompt}", prompt or "")
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                     {"type": "text", "text": text}]})
        return messages

    def judge(self, image: torch.Tensor, prompt: str | None, index: int = 0) -> tuple[float, str]:
        """``(raw score, answer text)`` for one image."""
        payload: dict[str, Any] = {"model": self.model, "messages": self.messages(image, prompt),
                                   "temperature": self.temperature}
        if self.max_tokens is not None:
            payload["max_tokens"] = int(self.max_tokens)
        payload.update(self.extra_body)
        url = self.base_url + "/chat/completions"
        out = self._request("POST", "/chat/completions", payload)
        text = _content(out)
        if text is None:
            raise VLMJudgeError(url, f"answer has no choices[0].message.content: {_snippet(json.dumps(out))}")
        score = parse_score(text, self.score_rx)
        where = f"image {index}" + ("" if prompt is None else f" (prompt {_snippet(prompt, 60)})")
        if score is None:
            raise VLMJudgeError(url, f"no score in the answer for {where}: pattern /{self.score_rx.pattern}/ "
                                     f"does not match {_snippet(text)}")
        if self.score_range is not None and not (self.score_range[0] <= score <= self.score_range[1]):
            raise VLMJudgeError(url, f"score {score:g} for {where} is outside {self.score_range[0]:g}.."
                                     f"{self.score_range[1]:g}: {_snippet(text)}")
        return score, text

    # -- batch --------------------------------------------------------------------------------
    def score_batch(self, images, prompts, metadata):
        n = len(images)
        prompts = prompts if prompts is not None else [None] * n
        raw = [0.0] * n
        if n == 1 or self.concurrency == 1:
            for i in range(n):
                raw[i] = self.judge(images[i], prompts[i], i)[0]
        else:
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, n), thread_name_prefix="vlm-judge")
            try:
                futures = {pool.submit(self.judge, images[i], prompts[i], i): i for i in range(n)}
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = sorted((futures[f], f.exception()) for f in done if f.exception() is not None)
                if failed:  # the first failure (no partial scores, no zeros); others are not waited for
                    raise failed[0][1]
                for f, i in futures.items():
                    raw[i] = f.result()[0]
            finally:  # on a failure, queued requests are dropped and running ones are not waited for
                pool.shutdown(wait=False, cancel_futures=True)
        raw_t = torch.tensor(raw, dtype=torch.float32)
        scores = raw_t / self.divide_by
        return RewardOutput(scores, {self.name: scores, f"{self.name}_raw": raw_t})


def _reason(e: Exception) -> str:
    """The innermost reason of a requests/urllib3 error, on one line."""
    inner: Any = e
    for _ in range(4):
        nxt = getattr(inner, "reason", None) or (inner.args[0] if getattr(inner, "args", None) else None)
        if not isinstance(nxt, Exception):
            break
        inner = nxt
    text = str(inner)
    m = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return (m.group(0) if m else text.splitlines()[0] if text else type(inner).__name__)[:200]


def _error_text(resp) -> str:
    """The server's error message: OpenAI/vLLM ``{"error": {"message": ...}}``, ``{"detail": ...}``
    or the body's start."""
    try:
        body = resp.json()
    except ValueError:
        return _snippet(resp.text or resp.reason or "")
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return _snippet(err if isinstance(err, str) else json.dumps(err))
    return _snippet(json.dumps(body))


def _content(out: Any) -> str | None:
    """``choices[0].message.content`` as text (a list of text parts is joined)."""
    try:
        content = out["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        content = "".join(parts)
    return content if isinstance(content, str) else None
