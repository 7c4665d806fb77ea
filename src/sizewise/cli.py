"""The `sizewise` command: `serve` (the HTTP server), `models` (what a deployment would serve),
`generate` (completions of one prompt), `chat` (a conversation in the terminal) and `calibrate`
(the routing policy's quality predictor)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

from . import __version__
from .orchestrator.tiers import TIER_ORDER

log = logging.getLogger("sizewise.cli")

DEFAULT_CONFIG = Path("configs") / "demo.yaml"
DEMO_FAMILY = Path("models") / "demo"
MODEL_RULE = f"a Hugging Face model directory, or a tier name ({', '.join(TIER_ORDER)}) of the demo family"
REPO_ROOT = Path(__file__).resolve().parents[2]  # src/sizewise/cli.py -> repo root (editable install)


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return n


def _fraction(text: str) -> float:
    f = float(text)
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a fraction in (0, 1]")
    return f


_SIZE_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def _bytes(text: str) -> int:
    """'512MiB', '4G', '1048576' -> bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?)?b?", text.strip(), re.IGNORECASE)
    n = float(m.group(1)) * _SIZE_SUFFIXES[(m.group(2) or "").lower()] if m else 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: a size in bytes, e.g. 1073741824, 512MiB or 4GiB")
    return int(n)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_deployment_options(p: argparse.ArgumentParser) -> None:
    """What `serve` and `models` read: which models, and the engine settings a --model user needs.
    Defaults named here are the DeploymentConfig's (tests/test_cli_commands.py keeps them equal)."""
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help=f"{MODEL_RULE}, as `vllm serve MODEL`; several: small to large (same as --model; "
                        "default: none, the config is used)")
    p.add_argument("--config", help=f"deployment YAML (default: {DEFAULT_CONFIG}, looked up in the current "
                                    "directory, then the repository root)")
    p.add_argument("--model", action="append", metavar="MODEL",
                   help=f"{MODEL_RULE}, instead of a config (one: served as large); repeat "
                        "for 2 or 3 tiers (in order: small, [medium,] large); no policy: auto means large "
                        "(default: none, the config is used)")
    p.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="the API name of each --model, in the same order (default: the directory's name)")
    p.add_argument("--device", help="auto | cpu | cuda[:N] | npu[:N] (default: the config's device; auto: NPU, "
                                    "then CUDA, then CPU)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="weights and KV cache dtype (default: the config's dtype, auto: float32 on CPU, the "
                        "checkpoint's dtype on CUDA/NPU)")
    p.add_argument("--max-model-len", type=_positive_int, metavar="N",
                   help="context length in tokens, prompt + output (default: the config's engine.max_model_len; "
                        "unset: each model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=_positive_int, metavar="N",
                   help="most sequences in one model's batch (default: the config's engine.max_num_seqs, 64)")
    p.add_argument("--memory-fraction", type=_fraction, metavar="F",
                   help="share of the device's memory (RAM on CPU) for all weights and KV caches, like vLLM's "
                        "--gpu-memory-utilization (default: the config's memory_fraction, 0.5)")
    p.add_argument("--kv-cache-bytes", type=_bytes, metavar="SIZE",
                   help="KV cache of all models together (e.g. 2GiB), split by each model's kv_share; replaces "
                        "what --memory-fraction leaves after the weights (default: unset)")


def _add_model_options(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    """`generate` and `chat`: one model, sampled."""
    p.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help="most tokens to generate (per answer in a chat; default: %(default)s)")
    p.add_argument("--temperature", type=float, default=temperature, metavar="T",
                   help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 or -1 = disabled (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="sampling seed (default: none, not reproducible)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | npu[:N] (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="(default: %(default)s: float32 on CPU, the checkpoint's dtype on CUDA/NPU)")
    p.add_argument("--max-model-len", type=_positive_int, default=None, metavar="N",
                   help="context length in tokens (default: the model's max_position_embeddings)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sizewise", description="Adaptive multi-size LLM serving.")
    p.add_argument("--version", action="version", version=f"sizewise {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a deployment over HTTP (OpenAI-compatible API, /generate, /metrics)")
    _add_deployment_options(s)
    s.add_argument("--host", help="bind address (default: the config's server.host, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port, 0 picks a free one (default: the config's server.port, 8000)")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeatable; also env SIZEWISE_API_KEYS; "
                        "default: none, no key is checked)")
    s.add_argument("--metrics-auth", action="store_true",
                   help="/metrics requires an API key too (server.metrics_require_auth in the config; "
                        "default: off, /metrics is open)")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests supply their own chat template (chat_template_kwargs.chat_template): "
                        "code every client may run on the server; only for trusted clients (default: off)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="(default: %(default)s)")
    # Reliability limits (the config's server.* keys; defaults there): see server/connections.py.
    for flag, key, kind, what in (
            ("--max-queue-delay", "max_queue_delay_s", float, "refuse (503, Retry-After) a request that cannot start "
             "within this many seconds; 0: never (default: 30)"),
            ("--read-timeout", "read_timeout_s", float, "seconds a client has to send a whole request, headers and "
             "body, from its first byte; then 408 and closed (default: 30)"),
            ("--keep-alive-timeout", "keep_alive_s", float, "seconds an idle connection is kept open (default: 5)"),
            ("--max-connections", "max_connections", int, "open connections; more are refused with 503, bar a "
             "reserve of 8 more that serve only /health, /ready and /metrics (default: 1024)")):
        s.add_argument(flag, dest=key, type=kind, metavar="S" if kind is float else "N", help=what)

    s.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engines in their own process (the engine core: engines, worker, router, plan); "
                        "this process does HTTP, tokenization and SSE, so serving work never takes the engine's "
                        "GIL (docs/engine-core.md; default: on; --no-engine-process: one process)")
    s.add_argument("--api-server-count", type=_positive_int, default=1, metavar="N",
                   help="API processes (HTTP, tokenization, SSE) in front of the one engine core, on one listening "
                        "socket: more where the host has the cores (needs --engine-process; default: %(default)s)")
    s.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: --replicas copies of the whole deployment behind a KV-aware "
                        "router (needs pip install 'sizewise[ray]'; joins RAY_ADDRESS's cluster or starts one; default: off)")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: replicas of the deployment (default: %(default)s)")
    s.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs reserved per replica (default: %(default)s)")
    s.add_argument("--replica-gpus", type=float, default=0.0, help="with --ray: GPUs reserved per replica (default: %(default)s)")

    m = sub.add_parser("models", help="list what a deployment would serve (names, tiers, sizes, context), "
                                      "without starting it")
    _add_deployment_options(m)

    g = sub.add_parser("generate", help="print completions of one prompt (offline, no server)")
    g.add_argument("prompt", help="the prompt text ('-' reads it from stdin); with --chat, the user message")
    g.add_argument("--model", default="large", metavar="MODEL", help=f"{MODEL_RULE} (default: %(default)s)")
    _add_model_options(g, temperature=0.0, max_tokens=64)
    g.add_argument("--n", type=int, default=1, help="completions to sample, printed one after another "
                                                    "(default: %(default)s)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="a stop string (repeatable; default: none)")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template (default: off)")
    g.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the prompt (default: none)")
    g.add_argument("--stream", action="store_true",
                   help="print the text as it is generated, needs --n 1 (default: off)")

    c = sub.add_parser("chat", help="chat in the terminal (multi-turn, streamed; /exit leaves): with a running "
                                    "server (--url, routed per answer) or one model offline")
    c.add_argument("--url", metavar="URL",
                   help="a running sizewise (or other OpenAI-compatible) server, e.g. http://127.0.0.1:8000: each "
                        "answer is routed there and followed by a line saying which tier answered and why "
                        "(default: none, one model is loaded here)")
    c.add_argument("--api-key", metavar="KEY", default=os.environ.get("SIZEWISE_API_KEY"),
                   help="with --url: the server's API key (default: env SIZEWISE_API_KEY, else none)")
    c.add_argument("--model", metavar="MODEL",
                   help=f"{MODEL_RULE}, with a chat template; with --url, a model name the server serves "
                        "(default: large; with --url, auto)")
    _add_model_options(c, temperature=0.8, max_tokens=256)
    c.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation (default: none)")

    k = sub.add_parser("calibrate", help="fit the routing policy's quality predictor (policy.quality) on "
                                         "held-out text or your own prompts, and print it as YAML")
    k.add_argument("--config", help=f"deployment YAML (default: {DEFAULT_CONFIG}, looked up in the current "
                                    "directory, then the repository root)")
    k.add_argument("--calibration-data", metavar="FILE",
                   help='JSONL, one {"prompt": ..., "completion": ...} per line (completion optional: the top '
                        "tier's greedy continuation stands in); default: the demo family's held-out split")
    k.add_argument("--requests", type=int, default=256, help="held-out windows to calibrate on (default: 256)")
    k.add_argument("--prompt-tokens", type=int, default=96, help="prompt window / cap in tokens (default: 96)")
    k.add_argument("--ref-tokens", type=int, default=32, help="reference continuation tokens (default: 32)")
    k.add_argument("--out", metavar="FILE", help="also write the policy.quality YAML to FILE (default: only printed)")
    k.add_argument("--token-stats", metavar="FILE",
                   help="where to write the family's token statistics (the surprisal signal; policy.token_stats "
                        "names it); default: CONFIG_STEM.tokens.json next to the config")
    k.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="(default: %(default)s)")
    from .sim.cli import add_parser as _add_simulate

    _add_simulate(sub, DEFAULT_CONFIG)
    return p


CALIBRATION_PROMPTS_PER_SIGNAL = 10  # the usual events-per-variable rule of thumb for a regression


def _simulate(args) -> int:
    from .sim.cli import run

    try:
        return run(args, _find_config(args.config))
    except ValueError as e:
        raise CliError(str(e)) from None


def _calibrate(args) -> int:
    from .orchestrator.deployment import Deployment, DeploymentConfig
    from .orchestrator.measure import calibrate_deployment, quality_yaml

    config_path = Path(_find_config(args.config))
    cfg = DeploymentConfig.from_yaml(config_path)
    if len(cfg.models) < 2:
        raise CliError("calibration needs at least two tiers (it predicts each tier's gap to the top one)")
    cfg.policy.router = "adaptive"
    dep = Deployment.load(cfg, echo_plan=False)
    try:
        src = args.calibration_data or "the demo family's held-out split"
        print(f"calibrating on {src} ...", file=sys.stderr, flush=True)
        try:
            fit, on, _, stats = calibrate_deployment(dep, args.calibration_data, args.requests, args.prompt_tokens,
                                              args.ref_tokens)
        except ValueError as e:
            raise CliError(str(e)) from None
    finally:
        dep.shutdown()
    r = fit.report
    print(f"calibrated on {on}", file=sys.stderr)
    # Forward selection picks among every measured signal: with few prompts per candidate it fits noise.
    enough = CALIBRATION_PROMPTS_PER_SIGNAL * (len(r["single"]) + 1)
    if r["requests"] < enough:
        print(f"warning: fitted on {r['requests']} prompts while choosing among {len(r['single'])} signals; a fit "
              f"this small can follow noise: give at least {enough} (about {CALIBRATION_PROMPTS_PER_SIGNAL} per "
              f"coefficient: --requests, or more lines of --calibration-data)", file=sys.stderr)
    print(f"held-out squared error of the gap: mean only {r['mean_only']:.4f}; " + ", ".join(
        f"{k} alone {v:.4f}" for k, v in r["single"].items()) + f"; kept {fit.signals or 'none'} -> "
        f"{r['kept_error']:.4f}", file=sys.stderr)
    stats_path = Path(args.token_stats) if args.token_stats else config_path.with_name(
        config_path.stem + ".tokens.json")
    stats_path.write_text(json.dumps(stats.to_json()))
    print(f"token statistics ({stats.tokens} tokens) written to {stats_path}", file=sys.stderr)
    name = stats_path.name if stats_path.resolve().parent == config_path.resolve().parent else str(stats_path.resolve())
    text = ("# under `policy:` in the deployment YAML\n" + f"token_stats: {name}\n" + quality_yaml(fit, on))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _find_config(given: str | None) -> Path:
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise CliError(f"config file {given} not found")
        return path
    for candidate in (Path.cwd() / DEFAULT_CONFIG, REPO_ROOT / DEFAULT_CONFIG):
        if candidate.is_file():
            return candidate
    raise CliError(f"no --config or --model given and the default config {DEFAULT_CONFIG} was not found in "
                   f"{Path.cwd()} or {REPO_ROOT}")


def _model_dir(spec: str) -> str:
    """One rule for every command: a directory is itself; a tier name is that tier of the demo
    family; anything else goes to the loader, whose error says what a model directory needs."""
    if Path(spec).is_dir() or spec not in TIER_ORDER:
        return spec
    for root in (Path.cwd() / DEMO_FAMILY, REPO_ROOT / DEMO_FAMILY):
        if (root / spec).is_dir():
            return str(root / spec)
    raise CliError(f"{spec}: no directory of that name, and the demo family's {spec} tier was not found in "
                   f"{Path.cwd() / DEMO_FAMILY} or {REPO_ROOT / DEMO_FAMILY} (scripts/train_demo_family.py builds it)")


def _model_dirs(args) -> list[str]:
    """`serve`'s and `models`' positional models and --model, resolved (empty: use the config)."""
    if args.models and args.model:
        raise CliError("give the models either positionally or with --model, not both")
    return [_model_dir(m) for m in (args.models or args.model or [])]


def _serve(args) -> int:
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again with the
    # handler it found: Python's SIGINT handler makes that a KeyboardInterrupt, but SIGTERM's
    # default action would kill the process (exit status 143 after a clean shutdown). Both end the
    # server with status 0, also when they come before it runs (while torch is imported).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run_ray(args) if args.ray else _run_server(args)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _deployment_config(args):
    """The DeploymentConfig `serve` and `models` read: --config or --model, then the flags over it."""
    from .models import CheckpointError, ModelConfig
    from .orchestrator.deployment import DeploymentConfig

    dirs = _model_dirs(args)
    if args.served_model_name and not dirs:
        raise CliError("--served-model-name goes with --model (with a config, the names are its models[].name)")
    if dirs:
        for d in dirs:  # the same words `generate` has for a hub id or a directory without config.json
            try:
                ModelConfig.from_pretrained(d)
            except CheckpointError as e:
                raise CliError(f"--model {d}: {e}") from None
        try:
            cfg = DeploymentConfig.from_model_dirs(dirs, args.served_model_name)
        except ValueError as e:
            raise CliError(" ".join(str(e).split())) from None
    else:
        config_path = _find_config(args.config)
        try:
            cfg = DeploymentConfig.from_yaml(config_path)
        except Exception as e:  # noqa: BLE001 - YAML and schema errors are the user's to fix
            raise CliError(f"invalid config {config_path}: {e}") from None
        for m in cfg.models:
            if not (Path(m.path) / "config.json").is_file():
                hint = " (the demo family is built by scripts/train_demo_family.py)" if "demo" in m.path else ""
                raise CliError(f"model {m.name} ({m.tier}): no model at {m.path}{hint}")
    top = {"device": args.device, "dtype": args.dtype, "memory_fraction": args.memory_fraction,
           "kv_cache_bytes": args.kv_cache_bytes}
    engine = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs}
    raw = cfg.model_dump()
    raw.update({k: v for k, v in top.items() if v is not None})
    raw["engine"].update({k: v for k, v in engine.items() if v is not None})
    try:
        return DeploymentConfig.model_validate(raw)
    except ValueError as e:
        raise CliError(" ".join(str(e).split())) from None


def _check(cfg):
    """Deployment.check as a one-line CliError: what can be refused is refused before any log says
    the server is listening."""
    from .orchestrator.deployment import Deployment

    try:
        return Deployment.check(cfg)
    except (ValueError, OSError) as e:
        raise CliError(" ".join(str(e).split())) from None


def _run_server(args) -> int:
    if args.port is not None and not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: a port is 0-65535 (0 picks a free one)")
    cfg = _deployment_config(args)
    plan = _check(cfg)
    print(plan.table(), file=sys.stderr, flush=True)

    import asyncio

    from .orchestrator.deployment import Deployment
    from .server import create_app
    from .server.app import API_KEYS_ENV
    from .server.memory import freeze_loaded_heap
    from .server.runner import Server, base_url, bind_socket, run_loop, shutdown_hook, uvicorn_config

    given = {k: getattr(args, k) for k in ("host", "port", "max_queue_delay_s", "read_timeout_s", "keep_alive_s",
                                           "max_connections")}
    try:  # validated as the config's keys are
        server_cfg = type(cfg.server).model_validate({**cfg.server.model_dump(),
                                                      **{k: v for k, v in given.items() if v is not None}})
    except ValueError as e:
        raise CliError(" ".join(str(e).split())) from None
    server_cfg.api_keys = [*server_cfg.api_keys, *args.api_key]
    if args.trust_request_chat_template:
        server_cfg.trust_request_chat_template = True
    if args.metrics_auth:
        if not server_cfg.api_keys and not os.environ.get(API_KEYS_ENV):
            raise CliError("--metrics-auth needs an API key (--api-key or SIZEWISE_API_KEYS)")
        server_cfg.metrics_require_auth = True
    # Bind before anything loads: a busy port fails at once, and port 0's real port is in the URL.
    try:
        sock = bind_socket(server_cfg.host, server_cfg.port)
    except OSError as e:
        raise CliError(f"cannot listen on {server_cfg.host}:{server_cfg.port}: {e.strerror or e} "
                       f"(pick another with --port, or --port 0 for a free one)") from None
    url = base_url(sock)
    if args.api_server_count > 1:
        if not args.engine_process:
            sock.close()
            raise CliError("--api-server-count needs the engine in its own process (drop --no-engine-process)")
        from .server.api_servers import supervise

        log.info("sizewise listening on %s with %d API processes (health at /health; /ready answers 200 once the "
                 "models are loaded)", url, args.api_server_count)
        try:
            return supervise(cfg, server_cfg, sock, args.api_server_count, args.log_level)
        finally:
            sock.close()

    exit_code = 0
    server: Server | None = None
    remote = None
    if args.engine_process:
        from .orchestrator.remote import RemoteDeployment
        from .server.api_servers import ENGINE_DEAD_EXIT_S

        def on_dead(exc) -> None:  # on the event loop: /health says 503 for a moment, then exit 1
            nonlocal exit_code
            exit_code = 1
            log.error("%s: the server exits so that a supervisor restarts it", exc)
            asyncio.get_running_loop().call_later(ENGINE_DEAD_EXIT_S, lambda: setattr(server, "should_exit", True))

        # Spawned from the main thread: the core's parent-death signal follows the spawning thread.
        remote = RemoteDeployment(cfg, log_level=args.log_level, on_dead=on_dead).start()

    def load():
        log.info("loading %d model(s) on device %s%s: %s", len(cfg.models), cfg.device,
                 " in the engine-core process" if remote is not None else "",
                 ", ".join(f"{m.name} ({m.tier}) from {m.path}" for m in cfg.models))
        if remote is not None:
            try:
                remote.wait_ready()
            except BaseException:
                remote.shutdown()
                raise
            deployment = remote
        else:
            deployment = Deployment.load(cfg, plan=plan)  # the app logs one line per model once it is loaded
        freeze_loaded_heap()
        log.info("ready: serving %s at %s (OpenAI API at %s/v1)", ", ".join(deployment.cores), url, url)
        return deployment

    def on_load_error(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        log.error("could not load the models: %s", exc)
        if server is not None:
            server.should_exit = True

    app = create_app(config=server_cfg, loader=load, on_load_error=on_load_error)
    log.info("sizewise listening on %s (health at /health; /ready answers 200 once the models are loaded)", url)
    server = Server(uvicorn_config(app, log_level=args.log_level), on_shutdown=shutdown_hook(app))
    try:
        run_loop(server.serve(sockets=[sock]))
    except KeyboardInterrupt:  # the signal raised again after the graceful shutdown, or a second Ctrl-C
        pass
    finally:
        sock.close()
        if remote is not None:  # (the app shut it down unless it was still loading)
            remote.shutdown()
    return exit_code


def _write_delta(delta) -> None:
    sys.stdout.write(delta.outputs[0].text if delta.outputs else "")
    sys.stdout.flush()


def _run_ray(args) -> int:
    """`sizewise serve --ray`: the Serve application of sizewise.ray_serve, until Ctrl-C / SIGTERM."""
    if args.model or args.models:
        raise CliError("--ray serves a --config file (every replica reads it); models by directory are not supported")
    if args.replicas < 1:
        raise CliError(f"--replicas {args.replicas}: at least 1")
    if args.port is not None and not 0 < args.port <= 65535:
        raise CliError(f"--port {args.port}: a port is 1-65535 with --ray")
    config_path = _find_config(args.config)
    from .orchestrator.deployment import DeploymentConfig

    try:
        server_cfg = DeploymentConfig.from_yaml(config_path).server
    except Exception as e:  # noqa: BLE001 - YAML and schema errors are the user's to fix
        raise CliError(f"invalid config {config_path}: {e}") from None
    try:
        import ray
        from ray import serve

        from .ray_serve import build_app
    except ImportError as e:
        raise CliError(f"--ray needs Ray Serve: pip install 'sizewise[ray]' ({e})") from None
    import time

    host = args.host or server_cfg.host
    port = args.port or server_cfg.port
    ray.init()  # RAY_ADDRESS (or a running local cluster) if set, else a new local one
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app({"config": str(config_path), "replicas": args.replicas, "num_cpus": args.replica_cpus,
                             "num_gpus": args.replica_gpus, "device": args.device, "proxy_host": host}),
                  name="sizewise", route_prefix="/")
        log.info("ready: %d replica(s) on Ray Serve at http://%s:%d (OpenAI API at /v1)", args.replicas, host, port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


def _generate(args) -> int:
    if args.system is not None and not args.chat:
        raise CliError("--system needs --chat")
    if args.stream and args.n != 1:
        raise CliError("--stream needs --n 1")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    from . import InvalidRequestError, SamplingParams
    from .models import CheckpointError

    try:
        params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, stop=args.stop, seed=args.seed)
        llm = _load_llm(args, _model_dir(args.model), max_num_seqs=max(1, args.n))
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system is not None else []
            messages.append({"role": "user", "content": prompt})
            text, ids = llm._chat_prompt(messages, 0)
        else:
            text, ids = prompt, llm.encode(prompt)
        out = llm._run([(text, ids)], params, use_tqdm=False, strategy="plain",
                       on_delta=_write_delta if args.stream else None)[0]
    except (InvalidRequestError, CheckpointError, ValueError) as e:
        raise CliError(" ".join(str(e).split())) from None  # one line (transformers' messages span several)
    if args.stream:
        print()
    elif args.n == 1:
        print(out.outputs[0].text)
    else:
        for o in out.outputs:
            print(f"--- completion {o.index} ({o.finish_reason}) ---")
            print(o.text)
    return 0


def _models(args) -> int:
    cfg = _deployment_config(args)
    plan = _check(cfg)
    entries = {m.name: m for m in cfg.models}
    rows = [("name", "tier", "params", "dtype", "context", "KV tokens", "path")]
    for m in plan.models:
        # the engine caps the context at what its KV cache holds
        rows.append((m.name, m.tier, f"{m.params / 1e6:.2f}M", str(m.dtype).removeprefix("torch."),
                     str(min(m.max_model_len, m.kv_tokens)), str(m.kv_tokens), entries[m.name].path))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if 2 <= i <= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    print(f"on {plan.device}; `auto` goes to "
          f"{'the adaptive router' if cfg.policy.router == 'adaptive' else 'the largest tier'}")
    return 0


def _load_llm(args, model, max_num_seqs: int):
    from . import LLM, InvalidRequestError
    from .models import CheckpointError

    try:
        return LLM(model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                   max_num_seqs=max_num_seqs)
    except (InvalidRequestError, CheckpointError, ValueError) as e:
        raise CliError(" ".join(str(e).split())) from None  # one line (transformers' messages span several)


CHAT_HELP = "/exit or Ctrl-D leaves, /clear forgets the conversation, Ctrl-C stops an answer"


def _chat(args) -> int:
    if args.url is not None:
        return _chat_remote(args)
    model = _model_dir(args.model or "large")
    from . import InvalidRequestError, SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
    except InvalidRequestError as e:
        raise CliError(str(e)) from None
    llm = _load_llm(args, model, max_num_seqs=1)  # loaded once for the whole conversation
    if not getattr(llm.tokenizer, "chat_template", None):
        raise CliError(f"{model} has no chat template (a base model?): use `sizewise generate` for completions")
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    engine = llm.engine
    print(f"sizewise chat: {engine.name} ({engine.model_config.num_params / 1e6:.1f}M parameters, "
          f"{engine.max_model_len}-token context). {CHAT_HELP}.", file=sys.stderr, flush=True)
    opening = [{"role": "system", "content": args.system}] if args.system else []

    def answer(messages: list[dict]) -> str | None:
        # The oldest exchanges go first when the conversation outgrows the context.
        text, ids = llm._chat_prompt(messages, 0)
        while len(ids) + params.max_tokens > engine.max_model_len and len(messages) > len(opening) + 1:
            del messages[len(opening):len(opening) + 2]
            print(f"(the oldest turn was dropped to fit the {engine.max_model_len}-token context)", file=sys.stderr)
            text, ids = llm._chat_prompt(messages, 0)
        try:
            out = llm._run([(text, ids)], params, use_tqdm=False, strategy="plain", on_delta=_write_delta)[0]
        except InvalidRequestError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return None
        print()
        return out.outputs[0].text

    from .remote_chat import repl

    return repl(opening, CHAT_HELP, answer)


def _chat_remote(args) -> int:
    """`chat --url`: the server routes each answer; the local engine options do not apply."""
    from .remote_chat import RemoteError, run

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.top_k > 0:
        sampling["top_k"] = args.top_k
    if args.seed is not None:
        sampling["seed"] = args.seed
    try:
        return run(args.url, args.model or "auto", args.api_key, sampling, args.system, CHAT_HELP)
    except RemoteError as e:
        raise CliError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = getattr(args, "log_level", "warning").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        command = {"serve": _serve, "models": _models, "generate": _generate, "chat": _chat,
                   "calibrate": _calibrate, "simulate": _simulate}[args.command]
        return command(args)
    except CliError as e:
        print(f"sizewise: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
