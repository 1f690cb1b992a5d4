from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from nanocp.server_args import ServerArgs, ServerArgsError


def test_defaults_and_cli_roundtrip(moe_model):
    args = ServerArgs.parse(
        [
            "--model-path",
            moe_model,
            "--page-size",
            "16",
            "--dtype",
            "float32",
            "--max-total-tokens",
            "1024",
            "--disable-cuda-graph",
            "--device",
            "cpu",
        ]
    )
    assert args.page_size == 16 and args.dtype == "float32" and args.max_total_tokens == 1024
    assert args.disable_cuda_graph and args.tokenizer_path == moe_model and args.device == "cpu"


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"page_size": 0}, "--page-size"),
        ({"dtype": "fp8"}, "--dtype"),
        ({"device": "tpu"}, "--device"),
        ({"load_format": "pt"}, "--load-format"),
        ({"attention_backend": "magic"}, "--attention-backend"),
        ({"mem_fraction_static": 1.5}, "--mem-fraction-static"),
        ({"chunked_prefill_size": -1}, "--chunked-prefill-size"),
        ({"max_running_requests": 0}, "--max-running-requests"),
        ({"schedule_conservativeness": -0.5}, "--schedule-conservativeness"),
        ({"max_total_tokens": 0}, "--max-total-tokens"),
        ({"max_total_tokens": 8, "page_size": 16}, "--max-total-tokens"),
        ({"context_length": 0}, "--context-length"),
        ({"cuda_graph_max_bs": 0}, "--cuda-graph-max-bs"),
        ({"random_seed": -1}, "--random-seed"),
        ({"model_path": "/does/not/exist"}, "--model-path"),
        ({"moe_a2a_backend": "ipc", "device": "cpu"}, "--moe-a2a-backend ipc"),
        ({"attention_backend": "flashinfer", "dp_size": 2, "cp_policy": "dynamic"}, "--attention-backend"),
        ({"moe_a2a_backend": "deepep", "device": "cpu"}, "--moe-a2a-backend deepep"),
        ({"schedule_policy": "lpm"}, "--schedule-policy"),
        ({"slo_ttft_ms": 0}, "--slo-ttft-ms"),
        ({"slo_tpot_ms": "fast"}, "--slo-tpot-ms"),
    ],
)
def test_bad_values_name_the_flag(kwargs, flag):
    with pytest.raises(ServerArgsError, match=flag):
        ServerArgs(**kwargs)


def test_unknown_engine_kwarg_is_a_type_error():
    with pytest.raises(TypeError, match="page_sise"):
        ServerArgs.from_kwargs(page_sise=4)


def test_cli_error_exits_with_flag_name(tmp_path):
    code = "from nanocp.server_args import ServerArgs; ServerArgs.parse(['--page-size', '0'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--page-size must be >= 1" in proc.stderr


def test_unavailable_attention_backend_is_reported(moe_model):
    from nanocp import Engine

    with pytest.raises(
        ValueError, match="--attention-backend flashinfer needs (flashinfer-python|a CUDA device)"
    ):
        Engine(model_path=moe_model, attention_backend="flashinfer", max_total_tokens=128, device="cpu")


def test_cp_policy_defaults_and_checks(moe_model):
    assert ServerArgs(device="cpu").cp_policy == "none"
    assert ServerArgs(device="cpu", dp_size=2, ep_size=2).cp_policy == "dynamic"
    with pytest.raises(ServerArgsError, match="--cp-policy uniform needs --dp-size > 1"):
        ServerArgs(device="cpu", cp_policy="uniform")
    with pytest.raises(ServerArgsError, match="--cp-size"):
        ServerArgs(device="cpu", dp_size=2, cp_policy="uniform", cp_size=3)
    with pytest.raises(ServerArgsError, match="--cp-policy"):
        ServerArgs(device="cpu", dp_size=2, cp_policy="static")


def test_triton_backend_on_cpu_needs_cuda(moe_model):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    code = (
        f"from nanocp import Engine; Engine(model_path={moe_model!r}, attention_backend='triton', "
        "device='cpu', max_total_tokens=64)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "--attention-backend triton needs a CUDA device" in proc.stderr


def test_deepep_fp8_dispatch_needs_deepep_low_latency(moe_model):
    with pytest.raises(ServerArgsError, match="--deepep-fp8-dispatch .* --moe-a2a-backend deepep"):
        ServerArgs(device="cpu", deepep_fp8_dispatch=True)  # all_to_all
    with pytest.raises(ServerArgsError, match="--deepep-fp8-dispatch .* --deepep-mode normal"):
        ServerArgs(
            device="cpu",
            moe_a2a_backend="deepep",
            deepep_mode="normal",
            dp_size=2,
            ep_size=2,
            deepep_fp8_dispatch=True,
        )
    assert ServerArgs.parse(["--model-path", moe_model, "--device", "cpu"]).deepep_fp8_dispatch is False


def test_deepep_mode_choices():
    assert ServerArgs(device="cpu", deepep_mode="low_latency").deepep_mode == "low_latency"
    assert ServerArgs(device="cpu", deepep_mode="normal").deepep_mode == "normal"  # (no DeepEP: unused)
    with pytest.raises(ServerArgsError, match="--deepep-mode normal: .* 2, 4 or 8 EP ranks"):
        ServerArgs(device="cpu", moe_a2a_backend="deepep", deepep_mode="normal")  # one rank
    with pytest.raises(ServerArgsError, match="deepep_mode|--deepep-mode"):
        ServerArgs(device="cpu", deepep_mode="fast")


def test_auto_attention_backend(monkeypatch):
    import torch

    assert ServerArgs(device="cpu").attention_backend == "torch"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # context parallelism needs (o, lse) over position ranges: triton on CUDA, whatever is installed
    assert ServerArgs(device="cuda", dp_size=2, cp_policy="dynamic").attention_backend == "triton"
    assert ServerArgs(device="cuda", attention_backend="torch").attention_backend == "torch"


def test_sglang_tp_flag_is_accepted_only_as_the_dp_attention_layout(tmp_path):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    cli = ["--model-path", str(tmp_path), "--device", "cpu", "--dp-size", "4", "--ep-size", "4"]
    args = ServerArgs.from_cli_args(parser.parse_args([*cli, "--tp", "4", "--enable-dp-attention"]))
    assert args.tp_size == 4 and args.dp_size == 4
    with pytest.raises(ServerArgsError, match="--tp-size 8"):
        ServerArgs.from_cli_args(parser.parse_args([*cli, "--tp-size", "8"]))


def test_shared_gpu_sync_follows_mps(monkeypatch, tmp_path):
    """Ranks sharing a GPU spin on device flags only when an MPS daemon's pipe exists (processes
    then run concurrently); NANOCP_SHARED_GPU_SYNC overrides, and a bad value names the variable."""
    from nanocp import envs

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("NANOCP_SHARED_GPU_SYNC", raising=False)
    assert not envs.mps_active() and envs.shared_gpu_sync() == "host"
    (tmp_path / "control").touch()
    assert envs.mps_active() and envs.shared_gpu_sync() == "device"
    monkeypatch.setenv("NANOCP_SHARED_GPU_SYNC", "host")
    assert envs.shared_gpu_sync() == "host"
    monkeypatch.setenv("NANOCP_SHARED_GPU_SYNC", "spin")
    with pytest.raises(ValueError, match="NANOCP_SHARED_GPU_SYNC"):
        envs.shared_gpu_sync()


def test_choices_and_capabilities_come_from_the_backends(monkeypatch):
    """The registries are the only lists of backend names (the CLI's choices), and what a backend
    can run is declared on its class: a new backend that attends over sharded KV is accepted for
    context parallelism, one that does not is refused naming the flag."""
    import argparse

    from nanocp.distributed.moe_comm import moe_a2a_backends
    from nanocp.layers.attention import attention_backends
    from nanocp.layers.attention.torch_backend import TorchAttnBackend
    from nanocp.registries import ATTENTION_BACKENDS

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    choices = {a.dest: a.choices for a in parser._actions}
    assert choices["attention_backend"] == ("auto", *attention_backends())
    assert choices["moe_a2a_backend"] == tuple(moe_a2a_backends())

    class Sharded(TorchAttnBackend):
        pass

    class Whole(TorchAttnBackend):
        supports_context_parallel = False

    monkeypatch.setitem(ATTENTION_BACKENDS.entries, "sharded_test", Sharded)
    monkeypatch.setitem(ATTENTION_BACKENDS.entries, "whole_test", Whole)
    cp = dict(device="cpu", dp_size=2, cp_policy="dynamic")
    assert ServerArgs(attention_backend="sharded_test", **cp).attention_backend == "sharded_test"
    with pytest.raises(
        ServerArgsError, match="--cp-policy dynamic needs .*--attention-backend .*whole_test cannot"
    ):
        ServerArgs(attention_backend="whole_test", **cp)
    assert ServerArgs(attention_backend="whole_test", device="cpu").attention_backend == "whole_test"
