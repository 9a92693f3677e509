"""A local run's console holds the project's own lines; Ray's and DeepSpeed's go to <out_dir>/logs/.

A first `unsup3d train` on a laptop used to show Ray's and DeepSpeed's internals between the
project's lines: the token-authentication notice, "Started a local Ray instance", Ray Train's
controller ("Requesting resources", "Started training worker group", retry reports), a core_worker.cc
line about PreemptionWatcher, DeepSpeed's accelerator warning and its "built successfully". They are
useful when something goes wrong, so they are kept, in a file:

- embedded Ray (the driver started it): the driver's `ray` logger writes to <out_dir>/logs/ray.log,
  and of the lines the workers and Ray's actors print (which Ray forwards to the driver) only the
  project's own log lines (PROJECT_LINE) reach the console; every other line goes to ray.log with
  the process it came from;
- in this process (`--no-ray`, torchrun): DeepSpeed's logger and what libraries print on stdout
  while training (DeepSpeed's "built successfully") go to <out_dir>/logs/deepspeed.log.

A cluster run (`--address`, `ray job submit`) keeps Ray's own output: there an operator reads it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import Iterator, TextIO

LOG_DIR = "logs"
RAY_LOG = "ray.log"
DEEPSPEED_LOG = "deepspeed.log"
PROJECT_PACKAGES = ("trainer", "data_pipeline", "cluster", "monitoring")
TIME_FORMAT = "%H:%M:%S"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROJECT_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\[[^\]\n]*\] )?"
                          rf"({'|'.join(PROJECT_PACKAGES)})(\.\w+)*: ")
"""A log line of the project's own loggers, as cli and the Ray workers format them (the workers add
`[run rank r] ` before the logger name)."""


def log_dir(out_dir: str) -> Path | None:
    """<out_dir>/logs, or for an s3:// out_dir the driver's staging folder of it (logs stay on this machine).
    None when it cannot be made: the run then keeps the libraries' lines on the console, and the trainer
    reports the unusable out_dir in its own words."""
    from cluster.storage import is_remote, staging_dir_for

    base = staging_dir_for(out_dir, "driver") if is_remote(out_dir) else Path(out_dir)
    directory = base / LOG_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return directory


class _RayLineRouter:
    """The driver's handler of the lines Ray forwards from workers and actors (replaces Ray's printer)."""

    def __init__(self, file: TextIO, console: TextIO):
        self.file = file
        self.console = console

    def __call__(self, data: dict) -> None:
        source = " ".join(str(part) for part in (data.get("actor_name") or data.get("task_name") or "",
                                                 f"pid={data.get('pid')}") if part)
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its status table every few seconds: only events, as Ray prints
            lines = [line for line in lines if ":event_summary:" in line]
        for line in lines:
            if PROJECT_LINE.match(line):
                self.console.write(line + "\n")
                self.console.flush()
            elif not self.file.closed:
                self.file.write(f"({source}) {line}\n")


class EmbeddedRayConsole:
    """The console of a driver that starts its own Ray: `before_init()` sends the driver's `ray` logger
    and Python warnings to <out_dir>/logs/ray.log, `after_init()` routes the lines Ray forwards (see the
    module doc), `close()` (after ray.shutdown) puts everything back, so that a later run in the same
    process (tests, notebooks) starts from Ray's own behaviour."""

    HANDLER = "unsup3d_console"

    def __init__(self, out_dir: str):
        directory = log_dir(out_dir)
        self.path = directory / RAY_LOG if directory is not None else None
        self._file: TextIO | None = None
        self._saved: dict[str, tuple[list, bool]] = {}
        self._routed = False

    def before_init(self) -> None:
        if self.path is None:
            return
        import ray  # noqa: F401 - importing Ray sets up its logger, which is redirected here

        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        handler = logging.StreamHandler(self._file)
        ray_logger = logging.getLogger("ray")
        formatter = next((h.formatter for h in ray_logger.handlers if h.formatter is not None), None)
        handler.setFormatter(formatter or logging.Formatter(LOG_FORMAT, TIME_FORMAT))
        for name in ("ray", "py.warnings"):  # py.warnings: the libraries' warnings, as log records
            logger = logging.getLogger(name)
            self._saved[name] = (list(logger.handlers), logger.propagate)
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.addHandler(handler)
            logger.propagate = False
        logging.captureWarnings(True)

    def after_init(self) -> None:
        """After ray.init(log_to_driver=True). Ray offers no public hook for this; its stdstream
        dispatcher (Ray 2.60, the pinned version) is used, and where it is missing Ray's own printing
        stays. tests/test_quiet_console.py fails if a Ray upgrade changes it."""
        if self._file is None:
            return
        try:
            from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            logging.getLogger(__name__).warning("this Ray has no stdstream dispatcher: its lines stay on the console")
            return
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler(self.HANDLER, _RayLineRouter(self._file, sys.stderr))
        self._routed = True
        logging.getLogger(__name__).info("Ray's and DeepSpeed's own messages: %s", self.path)

    def close(self) -> None:
        if self._routed:
            from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

            dispatcher.remove_handler(self.HANDLER)
            self._routed = False
        if self._saved:
            logging.captureWarnings(False)
        for name, (handlers, propagate) in self._saved.items():
            logger = logging.getLogger(name)
            for old in list(logger.handlers):
                logger.removeHandler(old)
            for old in handlers:
                logger.addHandler(old)
            logger.propagate = propagate
        self._saved.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


def configure_worker_logging(run: str, rank: int) -> None:
    """A Ray worker's project log lines in the format PROJECT_LINE recognises (Ray configures the root
    logger of its workers first, so basicConfig needs force); Python warnings become log records of
    `py.warnings`, which the driver files with Ray's lines."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [{run} rank {rank}] %(name)s: %(message)s",
                        datefmt=TIME_FORMAT, stream=sys.stderr, force=True)
    logging.captureWarnings(True)


def _point(handler: logging.StreamHandler, stream) -> None:
    """handler.setStream(stream), which first flushes the old stream; one already closed (a test's captured
    stdout) is simply replaced."""
    try:
        handler.setStream(stream)
    except ValueError:
        handler.stream = stream


@contextlib.contextmanager
def quiet_libraries(out_dir: str) -> Iterator[Path | None]:
    """Training in this process: DeepSpeed's log lines (its logger writes to stdout), what libraries print
    on stdout meanwhile (DeepSpeed prints "built successfully") and Python warnings go to
    <out_dir>/logs/deepspeed.log. The project logs on stderr and prints nothing on stdout while
    training, so the console keeps its own lines."""
    directory = log_dir(out_dir)
    if directory is None:
        yield None
        return
    path = directory / DEEPSPEED_LOG
    with open(path, "a", encoding="utf-8", buffering=1) as sink, contextlib.redirect_stdout(sink):
        # Imported with stdout redirected: DeepSpeed's logger binds its handler to sys.stdout at import
        # and reports the accelerator it found right away.
        try:
            import deepspeed.utils  # noqa: F401
        except ImportError:  # without the engine extra the trainer says what is missing
            pass

        handlers = [h for h in logging.getLogger("DeepSpeed").handlers if isinstance(h, logging.StreamHandler)]
        before = [h.stream for h in handlers]
        for handler in handlers:
            _point(handler, sink)
        warnings_handler = logging.StreamHandler(sink)
        warnings_handler.setFormatter(logging.Formatter(LOG_FORMAT, TIME_FORMAT))
        py_warnings = logging.getLogger("py.warnings")
        py_warnings.addHandler(warnings_handler)
        py_warnings.propagate = False
        logging.captureWarnings(True)
        try:
            yield path
        finally:
            logging.captureWarnings(False)
            py_warnings.removeHandler(warnings_handler)
            py_warnings.propagate = True
            # A handler made during the import was born on the sink: give it the process's real stdout (not
            # `console`, which under a test's capture is closed when the test ends).
            for handler, stream in zip(handlers, before):
                _point(handler, sys.__stdout__ if stream is sink else stream)
