"""Console output policy: ``-q/--quiet``, ``-v/--verbose``, progress bars, library noise.

The CLI sets the policy once (:func:`configure`); it travels in environment variables so that
processes started by ``accelerate launch`` or a testbed worker follow it too.

* quiet (``DIFFALIGN_QUIET=1``): no progress bars (ours and the libraries', via tqdm's own
  ``TQDM_DISABLE``) and no :func:`info` lines; results and errors still print.
* verbose (``DIFFALIGN_VERBOSE=1``): library warnings we normally drop at our call sites
  (:func:`library_call`) are shown again, and so are the libraries' loading bars.

Library warnings are never filtered process-wide: :func:`library_call` drops the named
messages only while the wrapped call runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

QUIET_ENV = "DIFFALIGN_QUIET"
VERBOSE_ENV = "DIFFALIGN_VERBOSE"

#: the library loggers whose handlers get the temporary filter of :func:`library_call`
LIBRARY_LOGGERS = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "datasets")


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Set the policy for this process and the processes it starts."""
    if quiet and verbose:
        raise ValueError("-q/--quiet and -v/--verbose contradict each other")
    if quiet:
        os.environ[QUIET_ENV] = "1"
        os.environ["TQDM_DISABLE"] = "1"  # read by every tqdm bar, the libraries' included
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Generating train split"
        # the libraries' own warnings at import and load time (e.g. transformers' "requires torchvision"
        # fallback notice on every model load): read when the library is first imported, so set here
        for lib in ("TRANSFORMERS", "DIFFUSERS"):
            os.environ.setdefault(f"{lib}_VERBOSITY", "error")
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def info(message: str) -> None:
    """A progress/status line (not a result): printed unless quiet."""
    if not is_quiet():
        print(message, flush=True)


def warn(message: str) -> None:
    """A one-line warning on stderr (``warning: ...``), also when quiet: something the user should
    know happened, without the source line a Python ``warnings.warn`` prints under it."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def progress(iterable: Iterable | None = None, *, inner: bool = False, **kwargs: Any):
    """A tqdm bar that follows the policy. ``inner=True`` marks a bar nested in another one: it
    is drawn only on a terminal, since a nested bar moves the cursor with ``ESC [A`` and leaves
    that in log files; the outer bar (one per level) still reports progress there."""
    from tqdm.auto import tqdm

    tty = _stderr_is_tty()
    disable = is_quiet() or (inner and not tty)
    if inner:
        kwargs.setdefault("leave", False)
    elif not tty:  # a log file: an update every few seconds, not ten a second
        kwargs.setdefault("mininterval", 5.0)
    return tqdm(iterable, disable=disable, **kwargs)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _MessageFilter(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to drop
            return True
        return not any(p.search(message) for p in self.patterns)


@contextlib.contextmanager
def library_call(*messages: str, bars: bool = False) -> Iterator[None]:
    """Run a library call without the given warnings (regexes matched against Python warnings
    and library log records) and, unless ``bars``, without the libraries' own progress bars
    (diffusers/transformers "Loading ..." bars nest and litter logs). Verbose mode shows all.

    Example: ``with library_call(r"No LoRA keys associated to CLIPTextModel"): pipe.load_lora_weights(d)``
    """
    if is_verbose():
        yield
        return
    patterns = [re.compile(m) for m in messages]
    log_filter = _MessageFilter(patterns)
    # Library records propagate from module loggers (diffusers.models.modeling_utils, ...) to
    # the handlers of the library's root logger and of the root logger: filter there, so
    # loggers created during the call (lazy imports) are covered too.
    handlers = {h for name in LIBRARY_LOGGERS for h in logging.getLogger(name).handlers}
    handlers.update(logging.getLogger().handlers)
    lastresort = logging.lastResort
    for h in handlers:
        h.addFilter(log_filter)
    if lastresort is not None:
        lastresort.addFilter(log_filter)
    restore_bars = [] if bars else _disable_library_bars()
    try:
        with warnings.catch_warnings():
            for p in patterns:
                warnings.filterwarnings("ignore", message=".*" + p.pattern)  # match anywhere, as for records
            yield
    finally:
        for h in handlers:
            h.removeFilter(log_filter)
        if lastresort is not None:
            lastresort.removeFilter(log_filter)
        for enable in restore_bars:
            enable()


def _disable_library_bars() -> list:
    """Switch off the loading bars of the libraries already imported; returns the undo calls."""
    undo = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        mod = sys.modules.get(name)
        if mod is None or not hasattr(mod, "disable_progress_bar"):
            continue
        if mod.is_progress_bar_enabled():
            mod.disable_progress_bar()
            undo.append(mod.enable_progress_bar)
    return undo


#: what our own model-loading calls say that is noise for us (see the call sites)
FP32_MODULES_NOTICE = r"There are modules in \w+ that should be kept in float32: \[\]"
TEXT_ENCODER_LORA_NOTICE = r"No LoRA keys associated to \w*(CLIPTextModel|T5EncoderModel)"
