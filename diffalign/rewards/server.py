"""Serve a reward over HTTP (``diffalign serve-reward``) and call it (:class:`RemoteReward`).

Runs a reward model on its own GPU/process while training elsewhere. Standard library only
(``http.server.ThreadingHTTPServer``); JSON in, JSON out; images travel as base64 PNG/JPEG,
never as pickles.

Protocol (the full OpenAPI 3 document is served at ``GET /openapi.json`` and printed by
``diffalign serve-reward --help``):

* ``GET /health`` (or ``/info``) -> ``{"status": "ok", "name", "higher_is_better",
  "needs_prompt", "units", "max_images", "max_body_bytes", "max_pixels"}``
* ``POST /score`` with ``{"images": [base64, ...], "prompts": [str, ...] | null,
  "metadata": [object, ...] | null}`` -> ``{"name", "scores": [float], "details": {name: [float]}}``

Errors are JSON ``{"error": message}``: 400 malformed request (bad JSON, missing/mistyped key,
undecodable image, prompt count mismatch, body shorter than its Content-Length), 411 missing
Content-Length, 413 body larger than ``max_body_bytes``, more than ``max_images`` images, or an
image over ``max_pixels`` pixels (checked from the image header, before decoding), 404 unknown
path, 504 not scored within ``request_timeout`` seconds, 500 reward failure. Concurrent requests
are merged into one reward call of up to ``max_batch_images`` images (a worker thread waits
``batch_window`` seconds for company).

The server is meant for loopback or a trusted network: it has no authentication, so binding a
non-loopback address logs a warning.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import Reward, RewardOutput, pil_to_tensor, to_image_tensor

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_IMAGES = 64
#: formats the server decodes; PIL knows many more, some of which run external programs
#: (EPS -> ghostscript) or have a history of decoder bugs, so untrusted bytes get only these
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Image.open parses headers under PIL's global warning state; serialise it (it is cheap) so
# the temporary DecompressionBombWarning filter of one thread cannot leak into another.
_OPEN_LOCK = threading.Lock()


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or name) only reaches this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def openapi_spec(max_images: int = DEFAULT_MAX_IMAGES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_body_bytes: int = 64 * 2**20) -> dict:
    """OpenAPI 3.0 description of the server's endpoints (served at ``GET /openapi.json``)."""
    error = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    err = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "diffalign reward server", "version": "1"},
        "paths": {
            "/score": {"post": {
                "summary": "score images (one float per image)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ScoreRequest"}}}},
                "responses": {
                    "200": {"description": "scores", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ScoreResponse"}}}},
                    "400": err, "411": err, "413": err, "500": err, "504": err,
                },
            }},
            "/health": {"get": {
                "summary": "reward name, direction and server limits",
                "responses": {"200": {"description": "info", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Health"}}}}},
            }},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI 3"}}}},
        },
        "components": {"schemas": {
            "ScoreRequest": {
                "type": "object", "required": ["images"], "additionalProperties": False,
                "properties": {
                    "images": {"type": "array", "minItems": 1, "maxItems": max_images,
                               "items": {"type": "string", "format": "byte",
                                         "description": f"base64 PNG/JPEG/WebP (a data: URL prefix is allowed), "
                                                        f"at most {max_pixels} pixels"}},
                    "prompts": {"type": "array", "nullable": True, "items": {"type": "string"},
                                "description": "one per image; required when the reward needs prompts"},
                    "metadata": {"type": "array", "nullable": True, "items": {"type": "object"},
                                 "description": "one object per image, passed to the reward"},
                },
                "description": f"request body at most {max_body_bytes} bytes",
            },
            "ScoreResponse": {
                "type": "object", "required": ["name", "scores", "details"],
                "properties": {
                    "name": {"type": "string"},
                    "scores": {"type": "array", "items": {"type": "number"}, "description": "one per image, in order"},
                    "details": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "number"}}},
                },
            },
            "Health": {
                "type": "object",
                "properties": {"status": {"type": "string"}, "name": {"type": "string"},
                               "higher_is_better": {"type": "boolean"}, "needs_prompt": {"type": "boolean"},
                               "units": {"type": "string"}, "max_images": {"type": "integer"},
                               "max_body_bytes": {"type": "integer"}, "max_pixels": {"type": "integer"}},
            },
            "Error": error,
        }},
    }


def _log(message: str) -> None:
    print(f"reward server: {message}", file=sys.stderr, flush=True)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Job:
    images: list[torch.Tensor]
    prompts: list[str] | None
    metadata: list | None
    done: threading.Event = field(default_factory=threading.Event)
    result: RewardOutput | None = None
    error: tuple[int, str] | None = None


class RewardServer:
    """HTTP front end for one reward. ``start()`` serves in a background thread;
    ``serve_forever()`` blocks. ``port=0`` picks a free port (see :attr:`url`)."""

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, *, max_body_bytes: int = 64 * 2**20,
                 max_images: int = DEFAULT_MAX_IMAGES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_batch_images: int | None = None, request_timeout: float = 120.0,
                 batch_window: float = 0.005, log=_log, access_log: bool = True):
        from PIL import Image

        if max_images < 1 or max_pixels < 1:
            raise ValueError("max_images and max_pixels must be positive")
        self.reward = reward
        self.log = log
        self.access_log = access_log  # one line per answered request, as web servers write
        self.max_body_bytes = int(max_body_bytes)
        self.max_images = int(max_images)
        self.max_pixels = int(max_pixels)
        # PIL's own decompression-bomb guard (a process-wide setting) must not refuse what this
        # server allows; below its default it stays as is (our check runs first anyway).
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        self.max_batch_images = int(max_batch_images or max(reward.batch_size, 1) * 4)
        self.request_timeout = float(request_timeout)
        self.batch_window = float(batch_window)
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        server = self

        class Handler(_Handler):
            timeout = self.request_timeout  # socket read timeout: slow/stalled clients are dropped
            owner = server

        self.httpd = _HTTPServer((host, port), Handler)
        self.httpd.owner = self
        self.httpd.daemon_threads = True
        if not is_loopback(self.address[0]):
            self.log(f"warning: listening on {self.address[0]}:{self.address[1]}, reachable from other machines; "
                     "the server has no authentication, so bind 127.0.0.1 unless the network is trusted")
        self._worker = threading.Thread(target=self._work, name="reward-batcher", daemon=True)
        self._worker.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def info(self) -> dict:
        r = self.reward
        return {"status": "ok", "name": r.name, "higher_is_better": bool(r.higher_is_better),
                "needs_prompt": bool(r.needs_prompt), "units": getattr(r, "units", ""),
                "max_images": self.max_images, "max_body_bytes": self.max_body_bytes, "max_pixels": self.max_pixels}

    def openapi(self) -> dict:
        return openapi_spec(self.max_images, self.max_pixels, self.max_body_bytes)

    def start(self) -> RewardServer:
        t = threading.Thread(target=self.httpd.serve_forever, name="reward-server", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self._stop.set()
        if self._threads:  # shutdown() waits for serve_forever: it would hang on a never-started server
            self.httpd.shutdown()
        self.httpd.server_close()
        self._worker.join(timeout=5)

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- batching worker ----------------------------------------------------------------------
    def submit(self, job: _Job) -> _Job:
        self._queue.put(job)
        return job

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            count = len(first.images)
            deadline = time.monotonic() + self.batch_window
            while count < self.max_batch_images:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                jobs.append(nxt)
                count += len(nxt.images)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        images = [img for j in jobs for img in j.images]
        prompts = None
        if self.reward.needs_prompt or any(j.prompts is not None for j in jobs):
            prompts = [p for j in jobs for p in (j.prompts if j.prompts is not None else [""] * len(j.images))]
        metadata = None
        if any(j.metadata is not None for j in jobs):
            metadata = [m for j in jobs for m in (j.metadata if j.metadata is not None else [{}] * len(j.images))]
        try:
            out = self.reward(images, prompts, metadata)
        except ValueError as e:  # input the reward rejects
            for j in jobs:
                j.error = (400, str(e))
                j.done.set()
            return
        except Exception as e:  # noqa: BLE001 - report, keep serving
            for j in jobs:
                j.error = (500, f"reward failed: {type(e).__name__}: {e}")
                j.done.set()
            return
        start = 0
        for j in jobs:
            n = len(j.images)
            j.result = RewardOutput(out.scores[start:start + n], {k: v[start:start + n] for k, v in out.details.items()})
            start += n
            j.done.set()


class _HTTPServer(ThreadingHTTPServer):
    owner: RewardServer

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-request is routine, not a server bug: one line, no
        # traceback. Anything else keeps the standard traceback (it is a bug to fix).
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            self.owner.log(f"client {client_address[0]}:{client_address[1]} dropped: {type(exc).__name__}")
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: RewardServer
    protocol_version = "HTTP/1.1"
    server_version = "diffalign-reward/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - our access line replaces http.server's
        pass

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        if self.owner.access_log:
            started = getattr(self, "_started", None)
            took = f" {time.perf_counter() - started:.3f}s" if started is not None else ""
            error = f" ({payload['error']})" if status >= 400 and "error" in payload else ""
            self.owner.log(f'{self.client_address[0]} "{self.command} {self.path}" {status}{took}{error}')
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except (ConnectionError, TimeoutError) as e:  # the client left before its answer
            self.close_connection = True
            self.owner.log(f"client {self.client_address[0]}:{self.client_address[1]} left before the "
                           f"{status} answer was sent ({type(e).__name__})")

    def do_GET(self) -> None:  # noqa: N802
        self._started = time.perf_counter()
        path = self.path.rstrip("/")
        if path in ("/health", "/info", ""):
            self._send(200, self.owner.info())
        elif path == "/openapi.json":
            self._send(200, self.owner.openapi())
        elif path == "/score":  # the right path with the wrong method: say which method it takes
            self._send(405, {"error": "/score takes POST with a JSON body (see GET /openapi.json)"}, {"Allow": "POST"})
        else:
            self._send(404, {"error": f"unknown path '{self.path}'; use GET /health, GET /openapi.json or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        self._started = time.perf_counter()
        try:
            if self.path.rstrip("/") in ("/health", "/info", "/openapi.json"):
                self._drain(int(self.headers.get("Content-Length") or 0))
                self._send(405, {"error": f"{self.path} takes GET"}, {"Allow": "GET"})
                return
            if self.path.rstrip("/") != "/score":
                raise RequestError(404, f"unknown path '{self.path}'; use POST /score")
            job = self._parse()
            self.owner.submit(job)
            if not job.done.wait(self.owner.request_timeout):
                raise RequestError(504, f"not scored within {self.owner.request_timeout:g} s")
            if job.error is not None:
                raise RequestError(*job.error)
            assert job.result is not None
            out = job.result
            self._send(200, {
                "name": self.owner.reward.name,
                "scores": out.scores.detach().float().cpu().tolist(),
                "details": {k: v.detach().float().cpu().tolist() for k, v in out.details.items()},
            })
        except RequestError as e:
            self._send(e.status, {"error": e.message})
        except (ConnectionError, TimeoutError) as e:  # client vanished while we read its body
            self.close_connection = True
            self.owner.log(f"client {self.client_address[0]}:{self.client_address[1]} dropped while sending "
                           f"its request ({type(e).__name__})")

    def _drain(self, n: int, limit: int = 256 * 2**20) -> None:
        # Read (and drop) the refused body: closing a socket with unread data makes the kernel
        # send a reset, and the client would see "connection reset" instead of our 413.
        left = min(n, limit)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 2**20))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _parse(self) -> _Job:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length header required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length '{length}'") from None
        if n < 0:  # rfile.read(-1) would read until the client closes
            raise RequestError(400, f"bad Content-Length '{length}'")
        if n > self.owner.max_body_bytes:
            self._drain(n)
            raise RequestError(413, f"request body is {n} bytes; this server accepts at most "
                                    f"{self.owner.max_body_bytes} bytes (send fewer images per request)")
        raw = self.rfile.read(n)
        if len(raw) < n:  # the client closed its side early: Content-Length was wrong
            raise RequestError(400, f"request body ended after {len(raw)} of the {n} bytes its Content-Length announced")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object with key 'images' (and 'prompts')")
        unknown = sorted(set(body) - {"images", "prompts", "metadata"})
        if unknown:
            raise RequestError(400, f"unknown key '{unknown[0]}'; valid keys: images, prompts, metadata")
        images = body.get("images")
        if not isinstance(images, list) or not images or not all(isinstance(s, str) for s in images):
            raise RequestError(400, "'images' must be a non-empty list of base64-encoded PNG/JPEG strings")
        if len(images) > self.owner.max_images:
            raise RequestError(413, f"request has {len(images)} images; this server accepts at most "
                                    f"{self.owner.max_images} per request")
        prompts = body.get("prompts")
        if prompts is not None:
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise RequestError(400, "'prompts' must be a list of strings")
            if len(prompts) != len(images):
                raise RequestError(400, f"got {len(prompts)} prompts for {len(images)} images")
        elif self.owner.reward.needs_prompt:
            raise RequestError(400, f"reward '{self.owner.reward.name}' needs 'prompts' (one per image)")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(images)):
            raise RequestError(400, "'metadata' must be a list with one entry per image")
        tensors = []
        for i, s in enumerate(images):
            if s.startswith("data:"):
                s = s.partition(",")[2]
            try:
                data = base64.b64decode(s, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, f"images[{i}] is not valid base64") from None
            tensors.append(self._decode(i, data))
        return _Job(tensors, prompts, metadata)

    def _decode(self, i: int, data: bytes) -> torch.Tensor:
        """Decode image ``i`` after checking its size from the header: a small file can
        describe a huge image (a 250 KB PNG of 9000x9000 takes seconds and GBs to decode)."""
        import warnings

        from PIL import Image, UnidentifiedImageError

        limit = self.owner.max_pixels

        def too_big(w: int, h: int) -> RequestError:
            return RequestError(413, f"images[{i}] is {w}x{h} = {w * h} pixels; this server accepts at most "
                                     f"{limit} pixels per image (downscale it, or start the server with a "
                                     "larger --max-pixels)")

        try:
            with _OPEN_LOCK, warnings.catch_warnings():
                # above PIL's guard: our own limit below gives the answer, not a log warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # lazy: reads the header only
        except Image.DecompressionBombError:
            raise RequestError(413, f"images[{i}] is larger than {limit} pixels; this server accepts at most "
                                    f"{limit} pixels per image") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise RequestError(400, f"images[{i}]: cannot decode: not a PNG, JPEG or WebP image "
                                    f"({len(data)} bytes)") from None
        with img:
            w, h = img.size
            if w * h > limit:
                raise too_big(w, h)
            try:
                img.load()
                return pil_to_tensor(img)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise RequestError(400, f"images[{i}]: cannot decode: corrupt or truncated {img.format} "
                                        f"({w}x{h}, {len(data)} bytes): {e}") from None


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class RemoteRewardError(UserError, RuntimeError):
    """The reward server refused a request or could not be reached: one clear line (exit code 2 from
    the command line), never a traceback and never a silent zero score."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"reward server {url} answered {status}: {message}")
        self.status = status
        self.message = message


def encode_image(image: torch.Tensor, fmt: str = "png", quality: int = 95) -> str:
    """``[3,H,W]`` in [0,1] -> base64 PNG (lossless after uint8 rounding) or JPEG."""
    from PIL import Image

    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(arr))
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class RemoteReward(Reward):
    """Client for :class:`RewardServer` with the reward call signature.

    Images are sent as PNG (``image_format="png"``: exact after rounding to uint8) in requests
    of at most ``batch_size`` images (capped by the server's ``max_images``). Connection errors
    and 5xx answers are retried ``retries`` times with exponential backoff
    (``backoff * 2**attempt`` seconds); 4xx answers raise :class:`RemoteRewardError` at once.
    ``name``/``higher_is_better``/``needs_prompt`` come from the server's ``/health``.
    """

    differentiable = False

    def __init__(self, url: str, *, timeout: float = 300.0, retries: int = 3, backoff: float = 0.5,
                 image_format: str = "png", batch_size: int = 64, name: str | None = None):
        super().__init__(batch_size=batch_size, device="cpu")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        if image_format not in ("png", "jpeg"):
            raise ValueError("image_format must be 'png' or 'jpeg'")
        self.image_format = image_format
        self.name = name or "remote"
        self._fixed_name = name is not None
        self.server_info: dict = {}

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                try:
                    message = json.loads(e.read()).get("error", "")
                except (ValueError, AttributeError, OSError):
                    message = str(e.reason)
                if e.code < 500:
                    raise RemoteRewardError(e.code, message, self.url) from None
                last = RemoteRewardError(e.code, message, self.url)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = e
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise RemoteRewardError(0, f"no answer after {self.retries + 1} attempts: {last}", self.url)

    def load(self) -> None:
        self.server_info = self._request("GET", "/health")
        if not self._fixed_name:
            self.name = self.server_info.get("name", self.name)
        self.higher_is_better = bool(self.server_info.get("higher_is_better", True))
        self.needs_prompt = bool(self.server_info.get("needs_prompt", True))
        self.units = self.server_info.get("units", "")

    def __call__(self, images: Any, prompts=None, metadata=None) -> RewardOutput:
        self.ensure_loaded()
        images = to_image_tensor(images)
        n = len(images)
        if isinstance(prompts, str):
            prompts = [prompts] * n
        if prompts is not None and len(prompts) != n:
            raise ValueError(f"reward '{self.name}': got {len(prompts)} prompts for {n} images")
        if prompts is None and self.needs_prompt:
            raise ValueError(f"reward '{self.name}' needs prompts: pass one prompt per image")
        if isinstance(metadata, dict):
            metadata = [metadata] * n
        step = max(1, min(self.batch_size, int(self.server_info.get("max_images", self.batch_size))))
        scores, details = [], {}
        for s in range(0, n, step):
            payload = {"images": [encode_image(img, self.image_format) for img in images[s:s + step]]}
            if prompts is not None:
                payload["prompts"] = list(prompts[s:s + step])
            if metadata is not None:
                payload["metadata"] = list(metadata[s:s + step])
            out = self._request("POST", "/score", payload)
            scores.extend(out["scores"])
            for k, v in out.get("details", {}).items():
                details.setdefault(k, []).extend(v)
        return RewardOutput(torch.tensor(scores, dtype=torch.float32),
                            {k: torch.tensor(v, dtype=torch.float32) for k, v in details.items()})
