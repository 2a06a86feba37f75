"""The console of a local run (`dudch run`): a line when each task starts and ends, a progress
bar per running task (on a terminal), each data warning once, and on failure the failing task's
error and the end of its log. The tasks report through `events.jsonl` in the run's log folder
(`components.console`); everything else (KFP's runner and executor output, library warnings)
goes to `kfp.log` there."""

import json
import os
import sys
import threading
import time
from pathlib import Path

from components.console import EVENTS_FILE, LOG_DIR_ENV
from dudch import redact

RUNNER_LOG = "kfp.log"
TAIL_LINES = 20
POLL_S = 0.2


def log_tail(path, lines=TAIL_LINES):
    """The last `lines` lines of a log, without its tracebacks (the error is shown in one line;
    the traceback stays in the file)."""
    kept, in_traceback = [], False
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif in_traceback and not line.startswith((" ", "\t")):
            in_traceback = False  # the exception's own line ends the traceback
            continue
        if not in_traceback and line.strip():
            kept.append(line)
    return kept[-lines:]


class RunConsole:
    """`with RunConsole(folder):` around a local pipeline run. Sets DUDCH_LOG_DIR for the tasks,
    sends this process's own stdout and stderr to kfp.log, and draws the tasks' events on the
    terminal from a thread. `failures` lists the failed tasks' end events afterwards."""

    def __init__(self, directory, stream=None):
        self.directory = Path(directory)
        self.stream = stream or sys.stdout
        self.failures, self._warned = [], set()
        self._running = {}  # (stage, bits) -> the start event of a task that has not ended
        self._bars = {}  # (stage, bits) -> (tqdm bar, its screen row)
        self._started, self._offset, self._stop = time.monotonic(), 0, threading.Event()

    def __enter__(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / EVENTS_FILE).touch()
        os.environ[LOG_DIR_ENV] = str(self.directory)
        self.stream.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        self._terminal = os.fdopen(os.dup(self.stream.fileno()), "w", buffering=1)
        self._bars_on = self._terminal.isatty()
        self._saved = os.dup(1), os.dup(2)
        log = os.open(self.directory / RUNNER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for bar, _ in self._bars.values():
            bar.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._terminal.close()
        del os.environ[LOG_DIR_ENV]
        return False

    def _watch(self):
        while not self._stop.is_set():
            self._read_events()
            self._stop.wait(POLL_S)
        self._read_events()  # what the last tasks said before the run ended

    def _read_events(self):
        with open(self.directory / EVENTS_FILE) as events:
            events.seek(self._offset)
            text = events.read()
        complete = text[:text.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            self._show(json.loads(line))

    def _say(self, text):
        elapsed = int(time.monotonic() - self._started)
        line = f"{elapsed // 60:02d}:{elapsed % 60:02d}  {redact(text)}"
        if self._bars_on:
            from tqdm import tqdm

            tqdm.write(line, file=self._terminal)
        else:
            print(line, file=self._terminal, flush=True)

    def _show(self, event):
        task = event["stage"] + (f" {event['bits']}b" if event["bits"] else "")
        key = (event["stage"], event["bits"])
        kind = event["event"]
        if kind == "start":
            self._running[key] = dict(event, task=task)
            self._say(f"{task:<15} started")
        elif kind == "progress":
            self._progress(key, task, event)
        elif kind == "warning" and event["message"] not in self._warned:
            self._warned.add(event["message"])
            self._say(f"warning: {event['message']}")
        elif kind == "note":
            self._say(event["message"])
        elif kind == "end":
            began = self._running.pop(key, event)
            if key in self._bars:
                self._bars.pop(key)[0].close()
            seconds = event["time"] - began["time"]
            if event["status"] == "ok":
                self._say(f"{task:<15} done in {seconds:.0f} s")
            else:
                self.failures.append({**event, "task": task})
                self._say(f"{task:<15} FAILED after {seconds:.0f} s: {event['error']}")

    def _progress(self, key, task, event):
        if not self._bars_on:
            return
        from tqdm import tqdm

        if key not in self._bars:
            taken = {row for _, row in self._bars.values()}
            row = next(i for i in range(len(taken) + 1) if i not in taken)
            self._bars[key] = tqdm(total=event["total"], desc=task, unit=event["unit"], position=row,
                                   leave=False, file=self._terminal), row
        bar = self._bars[key][0]
        bar.update(event["done"] - bar.n)

    def killed(self):
        """After a failed run in which no task reported a failure: the tasks that started and
        never ended, as failures. A task ends without a word only when its process was killed
        (SIGKILL, the out-of-memory killer): its error handler never ran."""
        return [{"task": start["task"], "log": start["log"], "error": "it was killed before it could "
                 "report an error (SIGKILL, or the out-of-memory killer: see `dmesg`); rerun the pipeline"}
                for start in self._running.values()]

    def failure_report(self):
        """Lines for the user after a failed run: each failed (or killed) task's log tail and
        path, or, when no task was running (the runner itself failed), the runner log's."""
        lines = []
        for failure in (self.failures or self.killed()
                        or [{"task": "the local runner", "log": str(self.directory / RUNNER_LOG)}]):
            lines.append(f"\nLast lines of {failure['task']}'s log ({failure['log']}):")
            lines += ["  " + redact(line) for line in log_tail(failure["log"])]
        return lines
