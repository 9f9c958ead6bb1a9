"""Run ``diffalign`` under ``accelerate launch`` with FSDP on CPU processes (gloo): a test launcher.

accelerate (1.16) takes ``distributed_type: FSDP`` only on GPUs and other accelerators: with
``use_cpu: true`` it quietly runs MULTI_CPU data parallelism, every process holding the whole
model (diffalign warns about it, ``common.sharding_not_honoured_warning``). torch's FSDP2
(``fully_shard``) itself runs on CPU tensors over gloo, so this launcher lets accelerate's state
take FSDP on CPU as well: after ``AcceleratorState`` has set itself up as MULTI_CPU while the
launch environment asks for FSDP (``ACCELERATE_USE_FSDP=true``, set by ``accelerate launch`` from
the config's ``distributed_type: FSDP``), it switches the state to FSDP with the plugin accelerate
built from the config's ``fsdp_config`` (``FSDP_*`` variables). Everything after that is
accelerate's own FSDP2 path (``fsdp2_prepare_model``: auto-wrap, ``fully_shard``, the rank-0
weight broadcast of ``fsdp_cpu_ram_efficient_loading``), then diffalign's CLI unchanged.

    accelerate launch --config_file CPU_FSDP.yaml tests/fsdp_on_cpu.py train CONFIG key=value ...
"""

from __future__ import annotations

import os
import runpy
import sys

import accelerate.state as state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wanted and self.distributed_type == DistributedType.MULTI_CPU and getattr(self, "fsdp_plugin", None) is None:
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
        self.distributed_type = DistributedType.FSDP
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    sys.argv = ["diffalign", *sys.argv[1:]]
    runpy.run_module("diffalign.cli", run_name="__main__")
