"""Run by tests/test_distributed.py under `accelerate launch` (one copy per process, gloo on the CPU).

Trains the tiny model with lora-cli's recipe, records which process called the writers, and
saves each process's LoRA weights, so the test can check that only rank 0 wrote and that all
ranks hold the same adapter.
usage: accelerate launch --cpu --num_processes 2 tests/dist_worker.py CONFIG.yaml REPORT_DIR [fsdp] [resume]

With `fsdp`, the run goes through lora-cli's FSDP path (sharding.py) on the CPU. accelerate
wraps FSDP only on GPUs, so here its prepare() is replaced by the same FSDP1 wrapping it does
there (torch's FullyShardedDataParallel, peft's wrap policy, use_orig_params=False).
"""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def shard_on_cpu() -> None:
    import dataclasses

    import torch
    from accelerate import Accelerator
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lora_cli.train import runtime, sharding

    place = runtime.place

    def sharded_placement(cfg):
        return dataclasses.replace(place(cfg), fsdp=True)

    runtime.place = sharded_placement
    sharding.configure = lambda accelerator, peft_model, precision: None
    prepare = Accelerator.prepare

    def fsdp_prepare(self, *objs):
        if len(objs) == 1 and isinstance(objs[0], torch.nn.Module):
            return FSDP(objs[0], auto_wrap_policy=fsdp_auto_wrap_policy(objs[0].model), device_id=torch.device("cpu"),
                        use_orig_params=False)
        return prepare(self, *objs)

    Accelerator.prepare = fsdp_prepare


def main() -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from lora_cli.config_files import build_config
    from lora_cli.train import checkpoint, observe, recipe, run_folder

    config, report = sys.argv[1], Path(sys.argv[2])
    if "fsdp" in sys.argv[3:]:
        shard_on_cpu()
    rank = int(os.environ.get("RANK", "0"))
    calls: list[str] = []

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            # record only calls that wrote something: the writers return early on other ranks
            is_main = getattr(args[0], "is_main", True) if args else True
            if name == "save_checkpoint" or is_main:
                calls.append(name)
            return result

        setattr(owner, name, wrapper)

    spy(observe.MetricsFile, "on_row")
    spy(run_folder.OutputFolder, "finish")
    spy(run_folder.OutputFolder, "start")
    original_save = checkpoint.save_checkpoint

    def save_spy(*args, **kwargs):
        calls.append("save_checkpoint")
        return original_save(*args, **kwargs)

    import lora_cli.train.loop as loop

    loop.save_checkpoint = save_spy
    captured = {}
    original_finish = run_folder.OutputFolder.finish

    def finish_and_capture(self, peft_model, *args, **kwargs):
        state = kwargs.get("adapter_state")  # gathered from the FSDP shards (rank 0), or None: read the model
        state = get_peft_model_state_dict(peft_model) if state is None else state
        captured["weights"] = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        return original_finish(self, peft_model, *args, **kwargs)

    run_folder.OutputFolder.finish = finish_and_capture
    from lora_cli.data import cache as dataset_cache

    original_build = dataset_cache._build

    def build_spy(*args, **kwargs):
        calls.append("tokenize")
        return original_build(*args, **kwargs)

    dataset_cache._build = build_spy
    resume = "resume" in sys.argv[3:]
    result = recipe.train(build_config(config, None, {}), resume=resume, overwrite=not resume)
    report.mkdir(parents=True, exist_ok=True)
    save_file(captured["weights"], str(report / f"rank-{rank}.safetensors"))
    (report / f"rank-{rank}.json").write_text(json.dumps({"calls": calls, "steps": result.summary.steps,
                                                          "decisions": asdict(result.decisions)}))


if __name__ == "__main__":
    main()
