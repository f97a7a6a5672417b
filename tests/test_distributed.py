"""Data parallelism through accelerate, on the CPU (gloo): what can be checked without GPUs.

Two processes train the tiny model; only rank 0 tokenizes and writes; both end with the same
LoRA weights; and with the same global batch the result equals a single process's (fp32, no
dropout), because each optimizer step normalises by the global number of target tokens.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, tiny_config
from safetensors.torch import load_file

from lora_cli.train.recipe import train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def _env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no",
           *args]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture
def two_process_run(tiny_model_dir, data_files, tmp_path):
    train_f, val_f = data_files
    # eval_batch_size 64: the whole val set is one micro-batch, evaluated by one process of two
    cfg = tiny_config(tiny_model_dir, train_f, val_f, tmp_path / "out", epochs=2, max_tokens=128, grad_accum=2,
                      eval_batch_size=64)
    cfg = cfg.replace({"lora.dropout": 0.0})
    conf = tmp_path / "run.yaml"
    conf.write_text(cfg.to_yaml())
    _launch(["--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()), str(WORKER), str(conf),
             str(tmp_path / "report")])
    return cfg, tmp_path


def test_two_processes_share_the_work_and_only_rank_0_writes(two_process_run):
    cfg, tmp = two_process_run
    r0 = json.loads((tmp / "report" / "rank-0.json").read_text())
    r1 = json.loads((tmp / "report" / "rank-1.json").read_text())
    assert r1["calls"] == []  # rank 1 neither tokenized nor wrote anything
    assert r0["calls"].count("tokenize") == 2 and "finish" in r0["calls"] and "save_checkpoint" in r0["calls"]
    assert r0["decisions"]["world_size"] == 2 and r0["decisions"]["micro_batches_per_step"] == 4
    w0, w1 = load_file(str(tmp / "report" / "rank-0.safetensors")), load_file(str(tmp / "report" / "rank-1.safetensors"))
    assert w0.keys() == w1.keys() and all((w0[k] == w1[k]).all() for k in w0)
    assert any(v.abs().sum() > 0 for k, v in w0.items() if "lora_B" in k)
    saved = yaml.safe_load((tmp / "out" / "run_config.yaml").read_text())
    assert saved["run"]["world_size"] == 2 and saved["train"]["grad_accum"] == 2 and saved["train"]["batch_size"] == 2
    rows = (tmp / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len(set(rows)) and rows  # one writer: no line twice
    assert len(list((Path(cfg.data.cache_dir) / "tokenized").iterdir())) == 2  # one entry per split


def test_same_global_batch_on_one_process_gives_the_same_adapter(two_process_run):
    cfg, tmp = two_process_run
    single = cfg.replace({"train.grad_accum": 4, "output.dir": str(tmp / "single")})
    result = train(single)
    w1 = load_file(str(tmp / "single" / "adapter_model.safetensors"))
    w2 = load_file(str(tmp / "report" / "rank-0.safetensors"))
    assert result.summary.steps == json.loads((tmp / "report" / "rank-0.json").read_text())["steps"]
    for k, v in w2.items():
        name = k if k in w1 else k.replace(".default", "")
        assert (w1[name] - v).abs().max().item() < 1e-5, k


def test_two_hosts_rendezvous_over_loopback(tiny_model_dir, data_files, tmp_path):
    """Two single-process 'machines' (machine_rank 0 and 1) meeting at 127.0.0.1: the multi-host path."""
    train_f, val_f = data_files
    cfg = tiny_config(tiny_model_dir, train_f, None, tmp_path / "out", epochs=1, max_tokens=128, eval_at_start=False)
    conf = tmp_path / "run.yaml"
    conf.write_text(cfg.to_yaml())
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
               str(WORKER), str(conf), str(tmp_path / "report")]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    r1 = json.loads((tmp_path / "report" / "rank-1.json").read_text())
    assert r1["decisions"]["world_size"] == 2 and r1["calls"] == []


def test_gpus_flag_relaunches_through_accelerate_and_the_run_is_summarised_once(tiny_model_dir, data_files, tmp_path):
    train_f, _ = data_files
    cmd = [sys.executable, "-m", "lora_cli", "train", "--gpus", "2", "--model", str(tiny_model_dir), "--train",
           str(train_f), "--precision", "fp32", "--max-tokens", "128", "--epochs", "1", "-o", str(tmp_path / "g"),
           "--cache-dir", str(tmp_path / "cache")]
    env = dict(_env(), ACCELERATE_MAIN_PROCESS_PORT=str(_free_port()), LORA_CLI_HOME=str(tmp_path / "home"))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "g" / "run_config.yaml").read_text())
    assert saved["run"]["world_size"] == 2
    assert res.stdout.count("Adapter written to") == 1 and res.stdout.count("Trained ") == 1, res.stdout[-2000:]


def test_fsdp_path_gives_the_same_adapter_and_resumes_exactly(tiny_model_dir, data_files, tmp_path):
    """lora-cli's FSDP path (sharding.py), two processes on the CPU: LoRA and optimizer state
    sharded, gathered to rank 0 for checkpoints and the adapter, scattered back on resume.
    The adapter equals a single process's with the same global batch; a run killed after its
    first epoch and resumed ends with the uninterrupted run's adapter."""
    train_f, val_f = data_files
    cfg = tiny_config(tiny_model_dir, train_f, val_f, tmp_path / "out", epochs=2, max_tokens=128, grad_accum=2)
    cfg = cfg.replace({"lora.dropout": 0.0, "model.quantization": "none"})
    conf = tmp_path / "run.yaml"
    conf.write_text(cfg.to_yaml())
    args = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()), str(WORKER), str(conf)]
    _launch(args + [str(tmp_path / "report"), "fsdp"])
    r0 = json.loads((tmp_path / "report" / "rank-0.json").read_text())
    r1 = json.loads((tmp_path / "report" / "rank-1.json").read_text())
    assert r1["calls"] == [] and "finish" in r0["calls"] and r0["decisions"]["fsdp"] is True
    sharded = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))

    single = train(cfg.replace({"train.grad_accum": 4, "output.dir": str(tmp_path / "single")}))
    assert single.summary.steps == r0["steps"]
    alone = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert alone.keys() == sharded.keys()
    assert all((alone[k] - sharded[k]).abs().max().item() < 1e-5 for k in alone)
    config = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("out", "single")]
    for c in config:  # peft keeps target_modules as a set: its order differs between processes
        c["target_modules"] = sorted(c["target_modules"])
    assert config[0] == config[1]

    # killed (SIGKILL) right after the first step of epoch 2, then --resume from the epoch-1 checkpoint
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    first_epoch = next(r["step"] for r in rows if r["type"] == "eval" and r["step"] > 0)
    conf2 = tmp_path / "run2.yaml"
    conf2.write_text(cfg.replace({"output.dir": str(tmp_path / "out2")}).to_yaml())

    def args2():
        return ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()), str(WORKER), str(conf2)]

    killed = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no",
                             "--dynamo_backend", "no", *args2(), str(tmp_path / "r2"), "fsdp"],
                            env=dict(_env(), LORA_CLI_TEST_KILL_AT=f"train:step#{first_epoch + 1}"),
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode != 0 and not (tmp_path / "out2" / "adapter_model.safetensors").exists()
    _launch(args2() + [str(tmp_path / "r3"), "fsdp", "resume"])
    resumed = load_file(str(tmp_path / "out2" / "adapter_model.safetensors"))
    assert all((resumed[k] - sharded[k]).abs().max().item() < 1e-6 for k in sharded)


def test_bad_data_on_two_processes_is_one_message_and_no_traceback(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": 3}\n')
    cmd = [sys.executable, "-m", "lora_cli", "train", "--gpus", "2", "--model", str(tiny_model_dir), "--train",
           str(bad), "--precision", "fp32", "-o", str(tmp_path / "g"), "--cache-dir", str(tmp_path / "cache")]
    env = dict(_env(), ACCELERATE_MAIN_PROCESS_PORT=str(_free_port()), LORA_CLI_HOME=str(tmp_path / "home"))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "bad.jsonl:2 [instruction]" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr + res.stdout and not (tmp_path / "g").exists()
