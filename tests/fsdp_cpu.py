"""``python -m tests.fsdp_cpu <mmrec arguments>``: mmrec's command line with FSDP allowed on CPU processes.

For the tests only. Lightning runs FSDP on GPUs only, and the default suite has none; torch's FSDP itself runs
on CPU processes over gloo once it is told that its device is the CPU, and once its full state dict stays where
it is (FSDP's "offload to the CPU" of a CPU tensor crashes). Three patches, in every rank (Lightning's launcher
starts the other ranks with this same module):
* ``FullyShardedDataParallel`` gets the CPU as its device where Lightning passes none (a CPU has no index);
* Lightning's full-state-dict context keeps tensors in place;
* mmrec's refusal of FSDP on the CPU is lifted (it guards users; these runs know what they do).
What runs then is mmrec's own FSDP path: sharding, collectives, checkpoints, the gathered export.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from typing import Any

import lightning.fabric.strategies.fsdp as fabric_fsdp
import lightning.pytorch.strategies.fsdp as pytorch_fsdp
import torch
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from torch.distributed.fsdp.api import FullOptimStateDictConfig

import mmrec.stages.lightning_cli as stage_cli
from mmrec.cli import main

_fsdp_init = FullyShardedDataParallel.__init__


def _init_on_cpu(self: FullyShardedDataParallel, module: nn.Module, *args: Any, device_id: Any = None, **kwargs: Any) -> None:
    _fsdp_init(self, module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


def _full_state_dict_in_place(module: nn.Module, world_size: int, rank0_only: bool = True) -> AbstractContextManager:
    return FullyShardedDataParallel.state_dict_type(
        module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


FullyShardedDataParallel.__init__ = _init_on_cpu
fabric_fsdp._get_full_state_dict_context = pytorch_fsdp._get_full_state_dict_context = _full_state_dict_in_place
stage_cli.FSDPStrategy = type("FSDPAllowedOnCPU", (), {})  # the class mmrec's CPU refusal checks for

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
