"""``gpt2-scratch serve``: the model loaded into an engine, a socket bound, and uvicorn run on the app (app.py) until
SIGTERM or Ctrl-C, after which the requests in flight are finished (up to ``--shutdown-timeout`` seconds) and the
process exits 0."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import math
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

from gpt2scratch.config.commands import API_KEY_ENV, Console, ServeConfig
from gpt2scratch.errors import UsageError
from gpt2scratch.inference.engine import Engine
from gpt2scratch.serve.app import make_app

log = logging.getLogger(__name__)


def run(cfg: ServeConfig, console: Console) -> None:
    """``gpt2-scratch serve``: until SIGTERM or Ctrl-C, after which the requests in flight are finished."""
    serve(cfg)


def serve(cfg: ServeConfig) -> None:
    """Load the model, listen, and serve until SIGTERM/SIGINT. Raises UsageError (port in use, missing extra...),
    CheckpointError, DeviceError."""
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f'serve needs {", ".join(missing)}: pip install -e ".[serve]"')
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and not is_loopback(cfg.host):
        log.warning("warning: listening on %s without an API key: anyone who can reach it can use the model; "
                    "set --api-key or $%s", cfg.host, API_KEY_ENV)  # fmt: skip
    sock = listen(cfg.host, cfg.port)  # before loading: a port in use is reported at once
    engine = load_engine(cfg)
    app = make_app(engine, cfg.model.name, api_key, cfg.max_queue)
    host, port = sock.getsockname()[:2]
    weight = engine.model.transformer.wte.weight
    precision = str(weight.dtype).removeprefix("torch.") + (", int8 weights" if cfg.quantize == "int8" else "")
    log.info("serving %s on http://%s:%d (%s, %s, up to %d sequences per batch)", cfg.model.name,
             f"[{host}]" if ":" in host else host, port, precision, weight.device, cfg.max_batch)  # fmt: skip
    import uvicorn

    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=math.ceil(cfg.shutdown_timeout)
    )
    server = uvicorn.Server(config)
    with _exit_cleanly_on_signals(server):
        server.run(sockets=[sock])
    log.info("server stopped")


def load_engine(cfg: ServeConfig) -> Engine:
    """The model of ``cfg`` ready for inference, in an engine of ``max_batch`` slots; UsageError if its KV cache
    would not fit in the device's free memory."""
    from gpt2scratch.device import available_memory
    from gpt2scratch.inference.load import load_for_inference
    from gpt2scratch.tokenizer import EOT_TOKEN

    model = load_for_inference(cfg.model.name, cfg.device, cfg.dtype, cfg.quantize)
    c, weight = model.config, model.transformer.wte.weight
    needed = 2 * c.n_layer * cfg.max_batch * c.block_size * c.n_embd * weight.element_size()
    available = available_memory(weight.device)
    if available is not None and needed > available:
        raise UsageError(
            f"--max-batch {cfg.max_batch} needs a KV cache of {needed / 1e9:.2f} GB, more than the "
            f"{available / 1e9:.2f} GB available; lower --max-batch"
        )
    engine = Engine(model, cfg.max_batch)
    engine.prefill([[EOT_TOKEN]])  # the first calls set up kernels (oneDNN's, CUDA's): not on a client's time
    engine.step([EOT_TOKEN])
    engine.release(0)
    return engine


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``; UsageError if that address cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}: {err.strerror or err}; check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; is another server using it? try another --port"
        ) from None
    return sock


@contextlib.contextmanager
def _exit_cleanly_on_signals(server: Any) -> Iterator[None]:
    """uvicorn catches SIGINT/SIGTERM, drains, and then raises the signal again under the handlers it found; with
    these (which only ask ``server`` to stop) a drained server returns, and the command exits 0 instead of dying by
    the signal. They also stop it as uvicorn would on SIGHUP (a closed terminal), which uvicorn leaves to us, and on
    a signal that comes before uvicorn has put its own handlers in place; an ignored signal stays ignored."""
    signals = [sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
