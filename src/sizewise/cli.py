"""`sizewise serve` (the HTTP server) and `sizewise generate` (one completion from the shell)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("sizewise.cli")

DEFAULT_CONFIG = Path("configs") / "demo.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]  # src/sizewise/cli.py -> repo root (editable install)


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sizewise", description="Adaptive multi-size LLM serving.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a deployment over HTTP (OpenAI-compatible API, /generate, /metrics)")
    s.add_argument("--config", help=f"deployment YAML (default: {DEFAULT_CONFIG}, looked up in the current "
                                    "directory, then the repository root)")
    s.add_argument("--model", action="append", metavar="DIR",
                   help="a Hugging Face model directory instead of a config (one: served as large); repeat "
                        "for 2 or 3 tiers (in order: small, [medium,] large); no policy: auto means large")
    s.add_argument("--host", help="bind address (default: the config's server.host, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default: the config's server.port, 8000)")
    s.add_argument("--device", help="auto | cpu | cuda[:N] | npu[:N] (overrides the config)")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeatable; also env SIZEWISE_API_KEYS)")
    s.add_argument("--metrics-auth", action="store_true",
                   help="/metrics requires an API key too (server.metrics_require_auth in the config)")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests supply their own chat template (chat_template_kwargs.chat_template): "
                        "code every client may run on the server; only for trusted clients")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: --replicas copies of the whole deployment behind a KV-aware "
                        "router (needs pip install 'sizewise[ray]'; joins RAY_ADDRESS's cluster or starts one)")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: replicas of the deployment (default 1)")
    s.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs reserved per replica")
    s.add_argument("--replica-gpus", type=float, default=0.0, help="with --ray: GPUs reserved per replica")

    g = sub.add_parser("generate", help="print completions of one prompt (offline, no server)")
    g.add_argument("prompt", help="the prompt text ('-' reads it from stdin); with --chat, the user message")
    g.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face model directory")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 or -1 = disabled (default)")
    g.add_argument("--n", type=int, default=1, help="completions to sample (printed one after another)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    g.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the prompt")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated (needs --n 1)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)

    c = sub.add_parser("calibrate", help="fit the routing policy's quality predictor (policy.quality) on "
                                         "held-out text or your own prompts, and print it as YAML")
    c.add_argument("--config", help=f"deployment YAML (default: {DEFAULT_CONFIG})")
    c.add_argument("--calibration-data", metavar="FILE",
                   help='JSONL, one {"prompt": ..., "completion": ...} per line (completion optional: the top '
                        "tier's greedy continuation stands in); default: the demo family's held-out split")
    c.add_argument("--requests", type=int, default=256, help="held-out windows to calibrate on (default: 256)")
    c.add_argument("--prompt-tokens", type=int, default=96, help="prompt window / cap in tokens (default: 96)")
    c.add_argument("--ref-tokens", type=int, default=32, help="reference continuation tokens (default: 32)")
    c.add_argument("--out", metavar="FILE", help="also write the policy.quality YAML to FILE")
    c.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def _calibrate(args) -> int:
    from .orchestrator.deployment import Deployment, DeploymentConfig
    from .orchestrator.measure import calibrate_deployment, quality_yaml

    cfg = DeploymentConfig.from_yaml(_find_config(args.config))
    if len(cfg.models) < 2:
        raise CliError("calibration needs at least two tiers (it predicts each tier's gap to the top one)")
    cfg.policy.router = "adaptive"
    dep = Deployment.load(cfg, echo_plan=False)
    try:
        src = args.calibration_data or "the demo family's held-out split"
        print(f"calibrating on {src} ...", file=sys.stderr, flush=True)
        try:
            fit, on, _ = calibrate_deployment(dep, args.calibration_data, args.requests, args.prompt_tokens,
                                              args.ref_tokens)
        except ValueError as e:
            raise CliError(str(e)) from None
    finally:
        dep.shutdown()
    r = fit.report
    print(f"calibrated on {on}", file=sys.stderr)
    print(f"held-out squared error of the gap: mean only {r['mean_only']:.4f}; " + ", ".join(
        f"{k} alone {v:.4f}" for k, v in r["single"].items()) + f"; kept {fit.signals or 'none'} -> "
        f"{r['kept_error']:.4f}", file=sys.stderr)
    text = "# under `policy:` in the deployment YAML\n" + quality_yaml(fit, on)
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


def _run_server(args) -> int:
    # Checked before the heavy imports (torch) so a wrong path fails in a blink.
    if args.port is not None and not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: a port is 0-65535 (0 picks a free one)")
    config_path = None if args.model else _find_config(args.config)
    for d in args.model or []:
        if not (Path(d) / "config.json").is_file():
            raise CliError(f"--model {d}: not a model directory (no config.json)")

    import asyncio

    from .orchestrator.deployment import Deployment, DeploymentConfig
    from .server import create_app
    from .server.app import API_KEYS_ENV
    from .server.runner import Server, base_url, bind_socket, shutdown_hook, uvicorn_config

    if args.model:
        try:
            cfg = DeploymentConfig.from_model_dirs(args.model)
        except ValueError as e:
            raise CliError(str(e)) from None
    else:
        try:
            cfg = DeploymentConfig.from_yaml(config_path)
        except Exception as e:  # noqa: BLE001 - YAML and schema errors are the user's to fix
            raise CliError(f"invalid config {config_path}: {e}") from None
        for m in cfg.models:
            if not (Path(m.path) / "config.json").is_file():
                hint = " (the demo family is built by scripts/train_demo_family.py)" if "demo" in m.path else ""
                raise CliError(f"model {m.name} ({m.tier}): no model at {m.path}{hint}")
    if args.device:
        cfg.device = args.device
    server_cfg = cfg.server.model_copy(update={
        k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None})
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

    exit_code = 0
    server: Server | None = None

    def load() -> Deployment:
        log.info("loading %d model(s) on device %s: %s", len(cfg.models), cfg.device,
                 ", ".join(f"{m.name} ({m.tier}) from {m.path}" for m in cfg.models))
        deployment = Deployment.load(cfg)  # the app logs one line per model once it is loaded
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
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:  # the signal raised again after the graceful shutdown, or a second Ctrl-C
        pass
    finally:
        sock.close()
    return exit_code


def _run_ray(args) -> int:
    """`sizewise serve --ray`: the Serve application of sizewise.ray_serve, until Ctrl-C / SIGTERM."""
    if args.model:
        raise CliError("--ray serves a --config file (every replica reads it); --model is not supported")
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

    from . import LLM, InvalidRequestError, SamplingParams
    from .models import CheckpointError

    def write(delta) -> None:
        sys.stdout.write(delta.outputs[0].text if delta.outputs else "")
        sys.stdout.flush()

    try:
        params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, stop=args.stop, seed=args.seed)
        llm = LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                  max_num_seqs=max(1, args.n))
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system is not None else []
            messages.append({"role": "user", "content": prompt})
            text, ids = llm._chat_prompt(messages, 0)
        else:
            text, ids = prompt, llm.encode(prompt)
        out = llm._run([(text, ids)], params, use_tqdm=False, strategy="plain",
                       on_delta=write if args.stream else None)[0]
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = getattr(args, "log_level", "warning").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "calibrate":
            return _calibrate(args)
        return _generate(args)
    except CliError as e:
        print(f"sizewise: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
