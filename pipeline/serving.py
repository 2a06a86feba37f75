"""How MLflow loads the models dudch logs: this module is their `loader_module`. A model's folder
holds data only (state dicts read with `weights_only`, JSON, arrays read without pickles); the
code that reads it is this installed module, so nobody who can write to the artifact store can
change what runs when a model is loaded. `load` also refuses a model whose MLmodel was edited
to run anything else.

Two kinds of model, told apart by their data:
- a networks file (`dudch.nets.save`), logged with each teacher and student run: feature rows
  in ("image_features" or "text_features"), codes out;
- a `dudch.retrieval` folder, registered by `dudch promote`: raw queries in, codes and the
  nearest database items out (`RetrievalModel`).
A served model trusts no client: queries are bounded (LIMITS), images come as bytes, and every
refusal is one line with no stack trace.
"""

import base64
import binascii
import contextlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from dudch import DudchError, shown

LOADER_MODULE = __name__
QUERY_COLUMNS = ("text", "image_b64", "image", "text_features", "image_features")
# Per request. top_k 0 asks for codes only. results: queries x top_k, the size of the answer.
LIMITS = dict(rows=256, text_chars=2000, image_bytes=8 * 2**20, request_image_bytes=32 * 2**20, top_k=1000,
              results=25_000)
# Per model process: requests are answered one at a time (encoding a request's images takes the
# cores and hundreds of MB), `waiting` more may wait for their turn, at most `wait_s` seconds;
# any beyond are refused at once with HTTP 503. So memory and the time to every reply stay
# bounded however many clients ask at once (an unbounded queue ran into the scoring server's
# 60 s timeout, 504, with the work still going on behind it).
ADMISSION = dict(waiting=4, wait_s=20)
# A deployment that wants to encode images from its own disk names the folder they may come
# from; without it an "image" (path) column is refused.
IMAGE_DIR_ENV = "DUDCH_SERVE_IMAGE_DIR"


class QueryRefused(MlflowException):
    """A query the model does not answer, as HTTP 400 with this one line as its message. (The
    scoring server prefixes an error's message with the whole input; this keeps it out.)"""

    def __init__(self, reason, error_code=INVALID_PARAMETER_VALUE):
        super().__init__(reason, error_code=error_code)
        self.reason = reason

    def serialize_as_json(self):
        return json.dumps({"error_code": self.error_code, "message": self.reason})


def _load_pyfunc(path):
    """MLflow's entry point: the model for the data at `path` (see the module docstring)."""
    from dudch import nets, retrieval

    path = Path(path)
    if path.is_dir():
        return RetrievalModel(retrieval.load(path))
    return CodesModel(nets.load(path)[0])


def check_model_folder(folder):
    """Refuse a model folder whose MLmodel would run code other than this module's: another
    flavour, another loader, code paths or a pickled Python model."""
    import yaml

    try:
        spec = yaml.safe_load((Path(folder) / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DudchError(f"cannot read the model's MLmodel ({error})") from None
    flavors = spec.get("flavors") or {}
    pyfunc = flavors.get("python_function") or {}
    unexpected = sorted(set(flavors) - {"python_function"}) + [k for k in ("code", "python_model", "model_code_path")
                                                                 if pyfunc.get(k)]
    if pyfunc.get("loader_module") != LOADER_MODULE or unexpected:
        raise DudchError(f"refused to load the model: its MLmodel names code that is not dudch's own "
                         f"(loader {pyfunc.get('loader_module')!r}{', ' if unexpected else ''}{', '.join(unexpected)}); "
                         f"it was not written by `dudch promote` or was changed since")


def _query_column(frame):
    present = [c for c in QUERY_COLUMNS if c in frame.columns]
    columns = [c for c in present if frame[c].notna().any()]
    if not present:  # MLflow drops the columns its signature does not name, and unnamed inputs
        raise DudchError(f"no query column: give the queries in a named column, one of "
                         f"{', '.join(QUERY_COLUMNS)} (e.g. {{\"dataframe_split\": {{\"columns\": [\"text\"], "
                         f"\"data\": [[\"tux\"]]}}}}); other columns and unnamed inputs or instances are ignored")
    if not columns:
        raise DudchError(f"the {present[0]} column holds no query (every row is null); give one per row")
    if len(columns) > 1:
        raise DudchError(f"queries in {' and '.join(columns)}: give them in exactly one column")
    if len(frame) > LIMITS["rows"]:
        raise DudchError(f"{len(frame)} queries in one request; at most {LIMITS['rows']}")
    return columns[0]


def _feature_rows(values):
    try:
        return np.stack([np.asarray(v, dtype=np.float32) for v in values])
    except (TypeError, ValueError):
        raise DudchError("feature rows must be lists of numbers of one length") from None


class _Turns:
    """One request at a time, a bounded number waiting (ADMISSION); the rest refused at once."""

    def __init__(self, waiting, wait_s):
        self.waiting, self.wait_s = waiting, wait_s
        self.inside, self.count_lock, self.turn = 0, threading.Lock(), threading.Lock()

    @contextlib.contextmanager
    def taken(self):
        busy = ("the model is busy with other requests; retry in a few seconds (one request is answered "
                "at a time, and a few may wait)")
        with self.count_lock:
            if self.inside > self.waiting:
                raise QueryRefused(busy, TEMPORARILY_UNAVAILABLE)
            self.inside += 1
        try:
            if not self.turn.acquire(timeout=self.wait_s):
                raise QueryRefused(busy, TEMPORARILY_UNAVAILABLE)
            try:
                yield
            finally:
                self.turn.release()
        finally:
            with self.count_lock:
                self.inside -= 1


_TURNS = _Turns(**ADMISSION)


def _refusing(predict):
    """Turn every failure of `predict` into a one-line QueryRefused: the model's own refusals as
    they are, anything unexpected without its details (which stay in the server's log). Calls
    take their turn (`_Turns`)."""
    import functools
    import logging

    @functools.wraps(predict)
    def wrapper(self, model_input, params=None):
        try:
            with _TURNS.taken():
                return predict(self, pd.DataFrame(model_input), params or {})
        except QueryRefused:
            raise
        except DudchError as error:
            raise QueryRefused(str(error)) from None
        except Exception:
            logging.getLogger(__name__).exception("query failed")
            raise QueryRefused("the model failed on this query; the server's log has the details",
                               INTERNAL_ERROR) from None
    return wrapper


class CodesModel:
    """A teacher's or student's networks: predict(DataFrame with one column, "image_features" or
    "text_features", a list of floats per row) -> DataFrame "code" (0/1 string per row)."""

    def __init__(self, networks):
        self.networks = networks

    def get_raw_model(self):
        """The `dudch.nets.HashNets` (MLflow's `PyFuncModel.get_raw_model`)."""
        return self.networks

    @_refusing
    def predict(self, frame, params):
        from dudch import nets

        column = _query_column(frame)
        if column not in ("image_features", "text_features"):
            raise DudchError(f"this model encodes feature rows (image_features or text_features), not {column}")
        codes = nets.branch_codes(self.networks, column.split("_")[0], _feature_rows(frame[column]))
        return pd.DataFrame({"code": _code_strings(codes)})


class RetrievalModel:
    """A `dudch.retrieval.Retriever` behind a query interface that trusts no client.

    predict(DataFrame) takes one query per row in exactly one column: "text" (str, at most
    LIMITS["text_chars"]), "image_b64" (the bytes of a PNG, JPEG or SVG file, base64, at most
    LIMITS["image_bytes"] decoded), "image" (a path on the server: refused unless the deployment
    sets DUDCH_SERVE_IMAGE_DIR, and then only inside that folder), "text_features" or
    "image_features" (a list of floats). At most LIMITS["rows"] rows. It returns a DataFrame
    with "code" (0/1, one character per bit), "warning" (what the ranking does not show: unknown
    query words, an arbitrary ranking, ties at the cut-off; "" if none) and, when the `top_k`
    parameter is 1 to 1000, "ids" (the nearest database items, nearest first; items as near in
    the order of their agreement with the query's outputs before rounding, `dudch.retrieval`),
    "distances" (Hamming), "texts" and "exact": how many of the first ids hold exactly the
    query (its image file's bytes, or its text, case and white space aside), ranked first
    whatever their distance.
    """

    def __init__(self, retriever):
        self.retriever = retriever

    def get_raw_model(self):
        """The `dudch.retrieval.Retriever` (MLflow's `PyFuncModel.get_raw_model`)."""
        return self.retriever

    @_refusing
    def predict(self, frame, params):
        from dudch import nets

        top_k = params.get("top_k", 0)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= LIMITS["top_k"]:
            raise DudchError(f"top_k must be 1 to {LIMITS['top_k']} (0: codes only), got {top_k!r}")
        column = _query_column(frame)
        values = frame[column].tolist()
        if len(values) * top_k > LIMITS["results"]:
            raise DudchError(f"{len(values)} queries x top_k {top_k} = {len(values) * top_k:,} results in one request; "
                             f"at most {LIMITS['results']:,}: send fewer queries or a smaller top_k")
        texts, query = [None] * len(values), None
        if column == "text":
            texts = [_text(v) for v in values]
            query = dict(texts=texts)
        elif column == "image_b64":
            images = [_image_bytes(i, v) for i, v in enumerate(values)]
            if sum(map(len, images)) > LIMITS["request_image_bytes"]:
                raise DudchError(f"{sum(map(len, images)) / 2**20:.0f} MiB of images in one request; at most "
                                 f"{LIMITS['request_image_bytes'] // 2**20} MiB: send them in several requests")
            query = dict(images=images)
        elif column == "image":
            query = dict(images=[_server_image(v) for v in values])
        outputs = self.retriever.outputs(**(query or {column: _feature_rows(values)}))
        codes = nets.sign(outputs)
        out = pd.DataFrame({"code": _code_strings(codes)})
        distances = [[]] * len(codes)
        if top_k > 0:
            first = self.retriever.exact_matches(**query) if query else [[]] * len(codes)
            distances, rows = self.retriever.search(outputs, int(top_k), first)
            out["ids"] = [self.retriever.item_id[r].tolist() for r in rows]
            out["distances"] = [d.astype(int).tolist() for d in distances]
            out["texts"] = [self.retriever.text[r].tolist() for r in rows]
            out["exact"] = [min(len(f), len(r)) for f, r in zip(first, rows)]
        out["warning"] = [self.retriever.warnings(c, d, t) for c, d, t in zip(codes, distances, texts)]
        return out


def _code_strings(codes):
    return ["".join("1" if b > 0 else "0" for b in c) for c in codes]


def _text(value):
    if not isinstance(value, str):
        raise DudchError(f"a text query must be a string, got {type(value).__name__}")
    if len(value) > LIMITS["text_chars"]:
        raise DudchError(f"a text query of {len(value)} characters; at most {LIMITS['text_chars']}")
    return value


def _image_bytes(row, value):
    if not isinstance(value, str):
        raise DudchError(f"image_b64 of row {row} must be a base64 string")
    if len(value) > LIMITS["image_bytes"] * 4 // 3 + 4:
        raise DudchError(f"the image of row {row} is over {LIMITS['image_bytes'] // 2**20} MiB")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DudchError(f"image_b64 of row {row} is not valid base64") from None


def _server_image(value):
    """The bytes of an image file on the server, inside the deployment's allowed folder. Any
    failure reads the same, so a client learns nothing about the server's files."""
    from dudch.features import read_image

    allowed = os.environ.get(IMAGE_DIR_ENV)
    if not allowed:
        raise DudchError(f"this deployment does not read images from its disk; send the image's bytes "
                         f"in image_b64 (or set {IMAGE_DIR_ENV} on the server to allow a folder)")
    folder = Path(allowed).resolve()
    try:
        path = (folder / str(value)).resolve()
        # Regular files only: reading a FIFO or a device would block or never end.
        if not path.is_relative_to(folder) or not path.is_file() or path.stat().st_size > LIMITS["image_bytes"]:
            raise OSError
        data = path.read_bytes()
        if read_image(data, 16) is None:  # undecodable reads like missing
            raise OSError
        return data
    except (OSError, ValueError, RuntimeError):  # also a NUL byte, a symlink loop
        raise DudchError(f"cannot read image {shown(value)} from the deployment's image folder") from None


# `dudch serve`: MLflow's scoring server for a model, behind a guard for what reaches the server
# before the model: bodies past MAX_BODY_BYTES (the largest valid request, 32 MiB of images in
# base64, fits), JSON nested past MAX_JSON_DEPTH (the parser would recurse until it fails), and
# error replies that would echo the input or carry a stack trace.
MAX_BODY_BYTES = 48 * 2**20
MAX_JSON_DEPTH = 32
MODEL_ENV = "DUDCH_SERVE_MODEL"  # the model URI, for each worker's app


def served_app():
    """The ASGI app serving the model named by DUDCH_SERVE_MODEL (uvicorn's factory)."""
    from mlflow.pyfunc import scoring_server

    from pipeline import registry

    return Guard(scoring_server.init(registry.load(os.environ[MODEL_ENV])))


def json_depth(body):
    """How deep a JSON text nests its arrays and objects (brackets inside strings not counted)."""
    import re

    # A string's ordinary characters are consumed in runs, not one by one: 0.3 s for a 43 MiB body.
    bare = re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b'""', body)
    codes = np.frombuffer(bare, dtype=np.uint8)
    steps = np.isin(codes, (91, 123)).astype(np.int64) - np.isin(codes, (93, 125))
    return int(np.cumsum(steps).max()) if len(steps) else 0


class Guard:
    """ASGI middleware around the scoring server's /invocations (see MAX_BODY_BYTES)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                return await _reply(send, 413, "REQUEST_TOO_LARGE", f"the request is over {MAX_BODY_BYTES // 2**20} MiB; "
                                    f"send fewer or smaller queries per request")
        if json_depth(body) > MAX_JSON_DEPTH:
            return await _reply(send, 400, "BAD_REQUEST", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels; send "
                                '{"dataframe_split": {"columns": [...], "data": [[...]]}}')
        started, chunks, delivered = {}, [], []

        async def replay():  # the body, read above, goes to the app once; then what the client sends
            if delivered:
                return await receive()
            delivered.append(True)
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture(message):
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    await _forward(send, started, b"".join(chunks))
        try:
            await self.app(scope, replay, capture)
        except Exception:  # what the server does not catch: one line, the details in its log
            import logging

            logging.getLogger(__name__).exception("request failed")
            if not started:
                await _reply(send, 500, "INTERNAL_ERROR", "the server failed on this request; its log has the details")


async def _forward(send, started, body):
    """The app's reply, with an error's body cut to one short line without echo or stack trace."""
    status = started["status"]
    headers = [(k, v) for k, v in started.get("headers", []) if k.lower() != b"content-length"]
    if status >= 400:
        try:
            error = json.loads(body)
            code, message = error.get("error_code", "BAD_REQUEST"), str(error.get("message", ""))
        except (ValueError, AttributeError):
            code, message = ("BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"), body.decode("utf-8", "replace")
        first = message.split("\nInput:")[0].strip().splitlines()
        line = first[0] if first else ""
        body = json.dumps({"error_code": code, "message": line if len(line) <= 300 else line[:300] + "..."}).encode()
        headers = [(k, v) for k, v in headers if k.lower() != b"content-type"] + [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _reply(send, status, code, message):
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
