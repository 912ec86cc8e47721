"""PURE: what every vLLM mode shares: the flags gpucluster manages, the API server's argv, vLLM's own rules."""

from __future__ import annotations

import json
from typing import Any, Iterator

from ..checks import ERROR, WARNING, Finding, Setup, _profiles_for, capability
from ..config import Inventory, Profile, Secret, flag_name
from ..containers import split_env
from ..errors import ConfigError
from ..memory import runtime_dtype
from ..steps import Http, Step

# Flags gpucluster sets itself from other fields; users set them there instead.
MANAGED_FLAGS = {
    "model": "deploy.model", "tensor-parallel-size": "deploy.tensor_parallel",
    "pipeline-parallel-size": "deploy.pipeline_parallel", "served-model-name": "deploy.served_model_name",
    "port": "deploy.port", "host": "(gpucluster binds 0.0.0.0)", "api-key": "deploy.api_key",
}


def validate(inventory: Inventory, profile: Profile, sets: dict[str, Any], extra: dict[str, str] | None = None
             ) -> None:
    """Flags gpucluster manages (plus a mode's `extra` ones) are refused where they are written: file:line, field
    and the fix."""
    managed = {**MANAGED_FLAGS, **(extra or {})}
    sources = ((profile.engine_args, profile.path, profile.lines, "engine_args"),
               (inventory.deploy.engine_args, inventory.path, inventory.lines, "deploy.engine_args"),
               (sets, "--set", {}, ""))
    for args, file, lines, prefix in sources:
        for key in args:
            name = flag_name(key)
            if name in managed:
                field = f"{prefix}.{key}" if prefix else key
                raise ConfigError("gpucluster sets this flag itself", file=file, line=lines.get(field), field=field,
                                  fix=f"use {managed[name]}")


def node_env(d, host) -> dict[str, str]:
    """Every vLLM node's env: the profile's and inventory's, its own address, and the NIC for NCCL and GLOO
    (without GLOO_SOCKET_IFNAME gloo binds the hostname's address, often 127.0.0.1, and peers never connect).
    Secret values are not in it (secret_env: they reach the processes through a 0600 file)."""
    env, _ = split_env({**d.setup.env, **host.env})
    env["VLLM_HOST_IP"] = host.address
    if host.interface:
        env["NCCL_SOCKET_IFNAME"] = host.interface
        env["GLOO_SOCKET_IFNAME"] = host.interface
    return env


def secret_env(d, host) -> dict[str, Secret]:
    """The node's secret env values (deploy.env, then hosts[].env): for its 0600 file, never for `-e`."""
    return split_env({**d.setup.env, **host.env})[1]


def ready_steps(d, *, timeout: float, alive: tuple, log: tuple) -> list[Step]:
    """From this machine: /health (while `alive`, a (host, probe), holds; `log` explains a failure), then
    /v1/models lists the served name, then one completion answers."""
    body = json.dumps({"model": d.served_name, "prompt": "Hello", "max_tokens": 8})
    auth = {"auth": d.api_key, "auth_env": "VLLM_API_KEY"}
    return [
        Step(id="control/health", host="control", phase="ready", readonly=True,
             reason="wait (minutes: the model loads) until the API answers /health",
             ops=(Http(url=f"{d.base_url}/health", until=timeout, abort=alive, log=log),)),
        Step(id="control/models", host="control", phase="ready", readonly=True,
             reason=f"/v1/models lists {d.served_name!r}",
             ops=(Http(url=f"{d.endpoint}/models", expect=json.dumps(d.served_name), **auth),)),
        Step(id="control/completion", host="control", phase="ready", readonly=True, reason="one completion answers",
             ops=(Http(url=f"{d.endpoint}/completions", body=body, expect='"choices"', timeout=300, **auth),)),
    ]


def measured_host_ip(d, probed) -> list[Finding]:
    """vLLM without VLLM_HOST_IP support takes each node's IP from the route to the internet: check it."""
    out = []
    for h in d.hosts:
        f = probed.get(h.name)
        if not f or not f.reachable or len(d.hosts) == 1 or d.facts.honours_host_ip or f.route_src == h.address:
            continue
        out.append(Finding(code="host-ip-ignored", severity=ERROR,
                           message=f"{h.name}: vLLM {d.facts.version} ignores VLLM_HOST_IP and would use "
                                   f"{f.route_src or 'no address (no default route)'} instead of {h.address}",
                           fix=f"on {h.name}, route the default gateway through the NIC holding {h.address}"))
    return out


def api_argv(s: Setup, *, model_path: str, served_name: str, port: int,
             executor: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The OpenAI API server's argv for this version: entrypoint, managed flags, then the user's args.
    `executor`: the distributed executor flags (default: this version's Ray spelling, when TP x PP > 1)."""
    e = s.facts
    argv = [*e.entrypoint, model_path] if e.entrypoint[-1] == "serve" else [*e.entrypoint, "--model", model_path]
    argv += ["--served-model-name", served_name, "--host", "0.0.0.0", "--port", str(port),
             "--tensor-parallel-size", str(s.tp)]
    if s.pp > 1:
        argv += ["--pipeline-parallel-size", str(s.pp)]
    if executor is not None:
        argv += list(executor)
    elif s.tp * s.pp > 1 and not {"worker-use-ray", "distributed-executor-backend"} & set(s.args):
        argv += list(e.executor_args)
    for name, value in s.args.items():
        if value is False or value is None:
            continue
        if value is True:
            argv.append(f"--{name}")
        elif isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", str(value)]
    return tuple(argv)


def layers_divisible(s: Setup) -> Iterator[Finding]:
    if not s.model or s.pp == 1 or s.model.layers % s.pp == 0:
        return
    base = s.model.layers // s.pp
    stages = [base] * (s.pp - 1) + [base + s.model.layers % s.pp]
    if s.facts.even_layers_required:
        yield Finding(code="layers-not-divisible", severity=ERROR,
                      message=f"{s.model.layers} layers do not divide into {s.pp} pipeline stages "
                              f"(vLLM {s.facts.version} requires an even split)",
                      fix="use a pipeline parallel size that divides the layer count")
    else:
        yield Finding(code="layers-not-divisible", severity=WARNING,
                      message=f"{s.model.layers} layers over {s.pp} stages split unevenly: "
                              f"{'/'.join(map(str, stages))} layers (the last stage is the bottleneck)",
                      fix="set env VLLM_PP_LAYER_PARTITION to balance stages, or use a pp that divides "
                          f"{s.model.layers}")


def pp_supported(s: Setup) -> Iterator[Finding]:
    restricted = s.facts.pp_architectures
    if s.pp > 1 and s.facts.pipeline_parallel and s.model and restricted is not None \
            and s.model.architecture not in restricted:
        yield Finding(code="pp-unsupported", severity=ERROR,
                      message=f"vLLM {s.facts.version}: \"Pipeline parallelism is not supported for this model\" "
                              f"({s.model.architecture})", fix="set pipeline_parallel: 1, or another model/release")
    if s.pp > 1 and not s.facts.pipeline_parallel:
        yield Finding(code="pp-unsupported", severity=ERROR,
                      message=f"vLLM {s.facts.version} does not implement pipeline parallelism "
                              f"(pipeline_parallel {s.pp} raises NotImplementedError)",
                      fix="set pipeline_parallel: 1 and tensor_parallel to the GPU count, "
                          "or use a profile with vLLM >= 0.6.3")


def bf16_supported(s: Setup) -> Iterator[Finding]:
    if not s.model or s.cpu:
        return
    dtype = runtime_dtype(str(s.args.get("dtype", "auto")), s.model.dtype)
    low = [h for h in s.hosts if capability(h.gpus.compute_capability) < (8, 0)]
    if dtype == "bfloat16" and low:
        yield Finding(code="bf16-unsupported", severity=ERROR,
                      message=f"the model runs in bfloat16 but {low[0].name} has compute capability "
                              f"{low[0].gpus.compute_capability}: \"Bfloat16 is only supported on GPUs with "
                              "compute capability of at least 8.0\"",
                      fix="--set dtype=half (engine_args: {dtype: half})")


def flags_supported(s: Setup) -> Iterator[Finding]:
    for name, value in s.args.items():
        if value is False:
            continue
        flag = s.facts.flag(name)
        if flag is None:
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"vLLM {s.facts.version} has no --{name} (\"unrecognized arguments: --{name}\")",
                          fix=f"remove {name} from engine_args, or use a profile whose vLLM has it")
        elif flag.choices and not isinstance(value, (bool, list)) and str(value) not in map(str, flag.choices):
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"vLLM {s.facts.version}: --{name} {value} is not one of "
                                  f"{', '.join(map(str, flag.choices))}",
                          fix=f"set {name} to one of: {', '.join(map(str, flag.choices))}")
        elif value is not True and not flag.value:
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"--{name} is a bare switch in vLLM {s.facts.version}; got a value ({value!r})",
                          fix=f"set {name}: true (or false to leave it out)")
        elif value is True and flag.value and not flag.bare_ok:
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"--{name} takes a value in vLLM {s.facts.version}, got a bare flag (true)",
                          fix=f"give {name} a value")


def batched_tokens_cover_len(s: Setup) -> Iterator[Finding]:
    m = s.memory()
    over = s.facts.chunked_prefill_over
    chunked = (s.args.get("enable-chunked-prefill") is True or (m is not None and m.generation == "v1")
               or (over is not None and m and m.max_model_len > over))     # V1 always chunks prefill
    if m and not chunked and m.batched_tokens < m.max_model_len:
        yield Finding(code="batched-tokens-too-small", severity=ERROR,
                      message=f"max_num_batched_tokens ({m.batched_tokens}) is smaller than max_model_len "
                              f"({m.max_model_len}): vLLM {s.facts.version} refuses to start",
                      fix=f"--set max-num-batched-tokens={m.max_model_len} or lower max-model-len")


def arch_supported(s: Setup) -> Iterator[Finding]:
    if s.model and s.facts.architectures and s.model.architecture not in s.facts.architectures:
        tf = s.facts.requires.get("transformers", "?")
        yield Finding(code="arch-unsupported", severity=ERROR,
                      message=f"vLLM {s.facts.version} (transformers {tf}) does not support {s.model.architecture} "
                              f"(model type `{s.model.model_type}` is not recognized)",
                      fix=_profiles_for(s.profile.engine, min(
                          (capability(h.gpus.compute_capability) for h in s.hosts if h.gpus), default=(99, 0)),
                          s.model.architecture))


def host_ip_honoured(s: Setup) -> Iterator[Finding]:
    if len(s.hosts) > 1 and not s.facts.honours_host_ip:
        yield Finding(code="host-ip-ignored", severity=WARNING,
                      message=f"vLLM {s.facts.version} ignores VLLM_HOST_IP and takes each node's IP from the "
                              "route to 8.8.8.8: every host needs a default route through the NIC of its "
                              "inventory address",
                      fix="check `ip route get 8.8.8.8` on each host shows its inventory address (probe does), "
                          "or use vLLM >= 0.6.3")


def port_env_valid(s: Setup) -> Iterator[Finding]:
    for key in ("VLLM_PORT", "VLLM_RPC_PORT"):
        value = s.env.get(key)
        if value is not None and not str(value).isdigit():
            yield Finding(code="port-env-invalid", severity=ERROR,
                          message=f"env {key}={value!r} is not an integer (a Kubernetes-style "
                                  f"service variable?): vLLM fails with \"invalid literal for int()\"",
                          fix=f"remove {key} from env or set it to a port number")


CHECKS = (pp_supported, layers_divisible, bf16_supported, arch_supported, flags_supported, port_env_valid,
          host_ip_honoured, batched_tokens_cover_len)
