"""The MLflow registry path on a real store: promote a pipeline run's student behind the quality
gate, load it in one line, search with it, serve it over HTTP, and compare runs."""

import base64
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from dudch import nets
from dudch.retrieval import hamming_ranking
from dudch import DudchError
from pipeline import registry, serving
from pipeline.registry import GATE_METRICS, gate
from tests.conftest import free_port, wait_for_port
from tests.helpers import OPENCLIPART, ROOT, dudch


def student_output(pipeline_run, bits):
    """(codes.npz arrays, the student networks) that the run's KFP task wrote for `bits`."""
    for folder in pipeline_run["kfp_dir"].glob("for-loop-2-iteration-*/train-student/student"):
        with np.load(folder / "codes.npz") as saved:
            if saved["codes"].shape[1] == bits:
                return dict(saved), nets.load(folder / "model.pt")[0]
    raise AssertionError(f"no {bits}-bit student in {pipeline_run['kfp_dir']}")


def b64(path):
    return base64.b64encode(Path(path).read_bytes()).decode()


def features_of(pipeline_run):
    with np.load(pipeline_run["kfp_dir"] / "prepare-data" / "features" / "features.npz") as saved:
        return dict(saved)


def promote(pipeline_run, *args):
    return dudch("promote", *args, env=pipeline_run["env"])


def student_scores(client, run_id, bits):
    """{"map_50.i2t": value, ...}: the student's scores of the run's evaluation at `bits`."""
    (evaluation,) = client.search_runs(
        [client.get_run(run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`dudch.stage` = 'evaluate' and tags.`dudch.bits` = '{bits}'")
    return {m: evaluation.data.metrics["student.{1}.{0}".format(*m.split("."))] for m in GATE_METRICS}


@pytest.fixture(scope="module")
def production(pipeline_run):
    """The run's 32-bit student promoted as dudch@production (the first version: no gate)."""
    mlflow.set_tracking_uri(pipeline_run["env"]["MLFLOW_TRACKING_URI"])
    done = promote(pipeline_run, "--run", pipeline_run["run_id"], "--bits", "32")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "promoted: no model held the alias" in done.stdout
    return mlflow.pyfunc.load_model("models:/dudch@production")


def test_the_model_holds_the_runs_database_codes(pipeline_run, production):
    saved, _ = student_output(pipeline_run, 32)
    retriever = production.get_raw_model()
    np.testing.assert_array_equal(retriever.database_codes(), saved["codes"])
    np.testing.assert_array_equal(retriever.item_id, saved["item_id"])
    assert retriever.packed.dtype == np.uint8 and retriever.packed.shape == (len(saved["codes"]), 4)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_query_codes_and_top_k_equal_the_run_and_brute_force(pipeline_run, production, modality):
    saved, student = student_output(pipeline_run, 32)
    features = features_of(pipeline_run)
    rows = features["query"][:25]
    queries = features[modality][rows]
    found = production.predict(pd.DataFrame({f"{modality}_features": list(queries)}), params={"top_k": 15})
    outputs = np.tanh(nets.branch_outputs(student, modality, queries))
    expected = nets.branch_codes(student, modality, queries)
    assert [list(map(int, c)) for c in found["code"]] == ((expected + 1) // 2).tolist()
    distances, ranked = hamming_ranking(outputs, saved["codes"], 15)  # ties by agreement, then row
    assert found["distances"].tolist() == distances.tolist()
    assert found["ids"].tolist() == saved["item_id"][ranked].tolist()


def test_raw_text_and_image_queries(pipeline_run, production):
    features = features_of(pipeline_run)
    _, student = student_output(pipeline_run, 32)
    image = sorted(OPENCLIPART.glob("animals/*.svg"))[0]
    found = production.predict(pd.DataFrame({"image_b64": [b64(image)]}), params={"top_k": 3})
    assert len(found["ids"][0]) == 3 and all(isinstance(t, str) for t in found["texts"][0])
    expected = production.get_raw_model().encode(images=[image])
    assert found["code"][0] == "".join("1" if b > 0 else "0" for b in expected[0])
    words = production.get_raw_model().encoders["text"]["vocabulary"][:3]
    by_text = production.predict(pd.DataFrame({"text": [" ".join(words)]}))
    bow = np.zeros((1, features["text"].shape[1]), dtype=np.float32)
    bow[0, :3] = 1
    assert by_text["code"][0] == "".join("1" if b > 0 else "0" for b in nets.branch_codes(student, "text", bow)[0])
    assert "ids" not in by_text  # no top_k: codes only


def test_signature_and_input_example_are_logged(production):
    info = mlflow.models.get_model_info("models:/dudch@production")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["text", "image_b64", "image", "text_features", "image_features"]
    assert info.signature.params.to_dict()[0]["name"] == "top_k"
    assert info.saved_input_example_info is not None


def test_search_prints_ranked_items(pipeline_run, production):
    done = dudch("search", "--text", "bird animal", "--top", "4", env=pipeline_run["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "id", "hamming", "match", "text"] and len(lines) == 5
    expected = production.predict(pd.DataFrame({"text": ["bird animal"]}), params={"top_k": 4})
    assert [line.split()[1] for line in lines[1:]] == expected["ids"][0]
    image = dudch("search", "--image", str(sorted(OPENCLIPART.glob("food/*.svg"))[0]), "--top", "2", env=pipeline_run["env"])
    assert image.returncode == 0 and len(image.stdout.strip().splitlines()) == 3
    missing = dudch("search", "--image", "/nonexistent.png", env=pipeline_run["env"])
    assert missing.returncode == 2 and "image /nonexistent.png not found" in missing.stderr


def test_search_says_which_words_it_does_not_know(pipeline_run, production):
    done = dudch("search", "--text", "zzzunknownword", "--top", "3", env=pipeline_run["env"])
    assert done.returncode == 0 and done.stderr.startswith("note: no query word is in the model's vocabulary")
    expected = production.predict(pd.DataFrame({"text": ["zzzunknownword"]}), params={"top_k": 3})
    assert expected["warning"][0] == done.stderr.removeprefix("note: ").strip()


def test_the_gate_compares_at_one_length_registers_nothing_it_refuses_and_records_both_metrics(pipeline_run, production):
    client = pipeline_run["client"]
    scores = {b: student_scores(client, pipeline_run["run_id"], b) for b in (16, 32)}
    name = "gate-test"
    assert promote(pipeline_run, "--run", pipeline_run["run_id"], "--bits", "32", "--name", name).returncode == 0
    refused = promote(pipeline_run, "--run", pipeline_run["run_id"], "--bits", "16", "--name", name)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "holds the alias at 32 bits, this is 16 bits" in refused.stderr and "--force" in refused.stderr
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    forced = promote(pipeline_run, "--run", pipeline_run["run_id"], "--bits", "16", "--name", name, "--force")
    assert forced.returncode == 0 and "forced:" in forced.stdout
    version = client.get_model_version_by_alias(name, "production")
    assert str(version.version) == "2" and version.tags["dudch.bits"] == "16"
    for metric in GATE_METRICS:
        assert float(version.tags[f"dudch.{metric}"]) == pytest.approx(scores[16][metric])
        assert float(version.tags[f"dudch.holder_{metric}"]) == pytest.approx(scores[32][metric])
    again = promote(pipeline_run, "--run", pipeline_run["run_id"], "--bits", "16", "--name", name)
    assert again.returncode == 0 and "promoted: mAP@50 and mAP@all at least version 2's" in again.stdout


def test_of_two_concurrent_promotions_exactly_one_wins_and_the_other_says_why(pipeline_run):
    """Both start at once against an alias nobody holds: the one that registers first holds it,
    and the other is judged against it (another code length: refused) and registers nothing."""
    name, dudch_bin = "race-test", str(Path(sys.executable).with_name("dudch"))
    racers = [subprocess.Popen([dudch_bin, "promote", "--run", pipeline_run["run_id"], "--bits", bits, "--name", name],
                               cwd=ROOT, env={**os.environ, **pipeline_run["env"]}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for bits in ("16", "32")]
    results = [(racer.wait(timeout=600), *racer.communicate()) for racer in racers]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    (won,) = [out for code, out, _ in results if code == 0]
    (lost,) = [err for code, _, err in results if code == 2]
    assert "(promoted: no model held the alias)" in won
    assert "holds the alias at" in lost and lost.count("\n") == 1 and "Traceback" not in lost
    versions = pipeline_run["client"].search_model_versions(f"name = '{name}'")
    assert len(versions) == 1 and str(pipeline_run["client"].get_model_version_by_alias(name, "production").version) == "1"


def test_the_gate_refuses_a_loss_on_any_metric_or_direction():
    holder = SimpleNamespace(version="4", tags={"dudch.bits": "64", **{f"dudch.{m}": "0.5" for m in GATE_METRICS}})
    equal = {m: 0.5 for m in GATE_METRICS}
    assert gate(equal, 64, holder)[0].startswith("promoted: mAP@50 and mAP@all at least version 4's")
    assert gate(dict(equal, **{"map_all.i2t": 0.9}), 64, holder)[0].startswith("promoted")
    decision, held = gate(dict(equal, **{"map_50.t2i": 0.49, "map_all.i2t": 0.9}), 64, holder)
    assert decision.startswith("refused: below version 4 on map_50.t2i (") and held == equal
    assert gate(equal, 32, holder)[0].startswith("refused: version 4 holds the alias at 64 bits")
    assert gate(dict(equal, **{"map_50.i2t": None}), 64, holder)[0].startswith("refused: the run has no mAP")
    assert gate(equal, 64, None)[0] == "promoted: no model held the alias"


def test_promote_refuses_a_stage_run(pipeline_run):
    client = pipeline_run["client"]
    child = client.search_runs([client.get_run(pipeline_run["run_id"]).info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{pipeline_run['run_id']}'")[0]
    done = promote(pipeline_run, "--run", child.info.run_id)
    assert done.returncode == 2 and "is not a pipeline run" in done.stderr


def start_serving(env, model_uri="models:/dudch@production"):
    """(process, port) of `mlflow models serve` on a loopback port, in its own process group."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k != serving.IMAGE_DIR_ENV}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", model_uri,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        # `mlflow models serve` starts `uvicorn` by name: the virtualenv's bin must be on PATH
        # (as it is for a user who activated it).
        env={**clean, **env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return server, port


def test_mlflow_models_serve_answers_invocations_and_trusts_no_client(pipeline_run, production):
    server, port = start_serving(pipeline_run["env"])

    def ask(columns, data, **params):
        body = {"dataframe_split": {"columns": columns, "data": data}, "params": params}
        return requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=300)

    def refused(reply, message):
        assert reply.status_code == 400, reply.text[:300]
        error = reply.json()
        assert error["message"] == message and "stack_trace" not in error and "Traceback" not in reply.text

    try:
        wait_for_port(port, server, "mlflow models serve", timeout=300)
        features = features_of(pipeline_run)
        rows = features["image"][features["query"][:3]]
        for _ in range(100):  # the port opens before the model has loaded
            reply = ask(["image_features"], [[r.tolist()] for r in rows], top_k=5)
            if reply.status_code != 503:
                break
        assert reply.status_code == 200, reply.text[:500]
        served = reply.json()["predictions"]
        local = production.predict(pd.DataFrame({"image_features": list(rows)}), params={"top_k": 5})
        assert [p["code"] for p in served] == local["code"].tolist()
        assert [p["ids"] for p in served] == local["ids"].tolist()
        assert [p["distances"] for p in served] == local["distances"].tolist()

        drawing = sorted(OPENCLIPART.glob("food/*.svg"))[0]
        reply = ask(["image_b64"], [[b64(drawing)]], top_k=4)
        assert reply.status_code == 200, reply.text[:500]
        local = production.predict(pd.DataFrame({"image_b64": [b64(drawing)]}), params={"top_k": 4})
        assert reply.json()["predictions"][0]["ids"] == local["ids"][0]

        no_paths = ("this deployment does not read images from its disk; send the image's bytes in "
                    "image_b64 (or set DUDCH_SERVE_IMAGE_DIR on the server to allow a folder)")
        for path in ("/etc/passwd", "/nonexistent.png", str(drawing)):
            refused(ask(["image"], [[path]]), no_paths)
        refused(ask(["text"], [["tux"]], top_k=-1), "top_k must be 1 to 1000 (0: codes only), got -1")
        refused(ask(["text"], [["tux"]], top_k=1001), "top_k must be 1 to 1000 (0: codes only), got 1001")
        refused(ask(["text"], [["tux"]] * 257), "257 queries in one request; at most 256")
        refused(ask(["text"], [["x" * 2001]]), "a text query of 2001 characters; at most 2000")
        refused(ask(["image_b64"], [["not base64!"]]), "image_b64 of row 0 is not valid base64")
        refused(ask(["image_b64"], [[base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()]]),
                "cannot decode image 0; PNG, JPEG or SVG (up to 32 MiB, 64 megapixels)")
        for empty in ("", "zzzunknownword"):
            reply = ask(["text"], [[empty]], top_k=3)
            assert reply.status_code == 200 and "the ranking is arbitrary" in reply.json()["predictions"][0]["warning"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the CLI and the uvicorn it started
        server.wait(timeout=120)


def tree_rss(pid):
    """Resident memory in bytes of a process and all its descendants."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    total, frontier = 0, [pid]
    while frontier:
        current = frontier.pop()
        frontier += children.get(current, [])
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def test_the_served_model_holds_its_bounds_under_concurrent_heavy_requests(pipeline_run, production):
    """A bounded loopback load: 50 clients at once, each 25 drawings with top_k 1000. Every one
    is answered (200) or refused at once as busy (503, one line), none times out (504), and the
    server's memory stays bounded (it reached 5.1 GB before requests took turns)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    drawings = [b64(p) for p in sorted(OPENCLIPART.glob("food/*.svg"))[:25]]
    body = {"dataframe_split": {"columns": ["image_b64"], "data": [[d] for d in drawings]}, "params": {"top_k": 1000}}
    server, port = start_serving(pipeline_run["env"])
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(server.pid))
            time.sleep(0.2)
    try:
        wait_for_port(port, server, "mlflow models serve", timeout=300)
        for _ in range(300):  # the port opens before the model has loaded
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=10).status_code == 200:
                break
            time.sleep(0.5)
        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(50) as clients:
            replies = list(clients.map(lambda _: requests.post(f"http://127.0.0.1:{port}/invocations", json=body,
                                                                timeout=300), range(50)))
        done.set()
        watcher.join()
    finally:
        done.set()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=120)
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    for reply in replies:
        if reply.status_code == 503:
            assert reply.json() == {"error_code": "TEMPORARILY_UNAVAILABLE", "message": (
                "the model is busy with other requests; retry in a few seconds (one request is answered at a "
                "time, and a few may wait)")}
        else:
            found = reply.json()["predictions"]
            assert len(found) == 25 and len(found[0]["ids"]) == min(1000, len(production.get_raw_model().item_id))
    assert peak[0] < 3 * 2**30, f"the server's memory peaked at {peak[0] / 2**30:.1f} GiB"


def test_server_side_image_paths_only_inside_the_allowed_folder(production, tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    drawing = sorted(OPENCLIPART.glob("food/*.svg"))[0]
    shutil.copy(drawing, allowed / "drawing.svg")
    (allowed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    monkeypatch.setenv(serving.IMAGE_DIR_ENV, str(allowed))
    found = production.predict(pd.DataFrame({"image": ["drawing.svg"]}), params={"top_k": 2})
    assert found["code"][0] == production.predict(pd.DataFrame({"image_b64": [b64(drawing)]}))["code"][0]
    os.mkfifo(allowed / "pipe.png")  # opening it would block the worker for ever
    os.symlink(allowed / "loop.png", allowed / "loop.png")
    for outside in ("../allowed/../../etc/passwd", "/etc/passwd", "missing.png", "broken.png", "pipe.png",
                    "loop.png", "a\x00.png"):
        with pytest.raises(serving.QueryRefused) as refusal:
            production.predict(pd.DataFrame({"image": [outside]}))
        assert refusal.value.reason == f"cannot read image {outside!r} from the deployment's image folder"


@pytest.mark.parametrize("query, message", [
    (pd.DataFrame({"text": [None, None]}), "the text column holds no query (every row is null); give one per row"),
    (pd.DataFrame({"txt": ["tux"]}), "no query column: give the queries in a named column, one of text, image_b64"),
    (np.array(["tux"]), "other columns and unnamed inputs or instances are ignored"),
    (pd.DataFrame({"text": ["tux"], "image_b64": ["eA=="]}), "queries in text and image_b64: give them in exactly one column"),
], ids=["null text", "unknown column", "unnamed inputs", "two columns"])
def test_a_query_in_the_wrong_shape_is_told_what_shape_to_use(production, query, message):
    with pytest.raises(serving.QueryRefused) as refusal:
        production.predict(query, params={"top_k": 1})
    assert message in refusal.value.reason and "\n" not in refusal.value.reason


class Planted:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_tampered_model_artifacts_are_refused_or_ignored(pipeline_run, production, tmp_path):
    import torch
    import yaml

    original = Path(mlflow.artifacts.download_artifacts("models:/dudch@production", dst_path=str(tmp_path / "original")))
    assert not [p for p in original.rglob("*") if p.suffix in (".py", ".pkl", ".pickle")]  # data only
    spec = yaml.safe_load((original / "MLmodel").read_text())
    assert spec["flavors"]["python_function"]["loader_module"] == "pipeline.serving"
    marker = tmp_path / "code-ran"

    def tampered(name, change):
        folder = tmp_path / name
        shutil.copytree(original, folder)
        change(folder)
        return folder

    # The networks replaced by a pickle that runs code: refused, and the code never runs.
    nets_file = tampered("nets", lambda f: torch.save({"dims": Planted(marker)}, next(f.rglob("student.pt"))))
    with pytest.raises(Exception, match="refused to load model .*student.pt: it holds objects other than tensors"):
        mlflow.pyfunc.load_model(str(nets_file))
    # The database codes replaced by pickled objects, deleted, or missing an array: refused in
    # one line, `dudch search` included.
    database = tampered("database", lambda f: np.savez(next(f.rglob("database.npz")), codes=np.array([Planted(marker)])))
    with pytest.raises(DudchError, match="cannot read the retrieval model .*allow_pickle=False"):
        mlflow.pyfunc.load_model(str(database))
    assert not marker.exists()

    def rewrite(**arrays):
        def change(folder):
            path = next(folder.rglob("database.npz"))
            with np.load(path) as saved:
                kept = {k: saved[k] for k in saved.files}
            np.savez(path, **{k: v for k, v in {**kept, **arrays}.items() if v is not None})
        return change
    for name, change, message in (
            ("deleted", lambda f: next(f.rglob("database.npz")).unlink(), "cannot read the retrieval model"),
            ("no-codes", rewrite(codes=None), "database.npz lacks codes"),
            ("float-codes", rewrite(codes=np.zeros((3, 4))), "not 32-bit codes packed as uint8 rows"),
            ("short-ids", rewrite(item_id=np.array(["a"])), "not one string each per code"),
            ("short-digests", rewrite(image_sha256=np.array(["a"])), "not one string per code; register")):
        folder = tampered(f"database-{name}", change)
        with pytest.raises(DudchError, match=message):
            mlflow.pyfunc.load_model(str(folder))
        done = dudch("search", "--model", str(folder), "--text", "tux", env=pipeline_run["env"])
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr

    # A model registered before image digests were kept loads, and finds no image exactly.
    drawing = b64(next(OPENCLIPART.rglob("*.svg")))
    older = registry.load(str(tampered("database-before-digests", rewrite(image_sha256=None))))
    assert older.predict(pd.DataFrame({"image_b64": [drawing]}), params={"top_k": 3})["exact"][0] == 0

    # Code planted beside the data, as an MLflow "model from code" or a pickled python model
    # would hold it: the loader never reads it.
    def plant_code(folder):
        (folder / "retrieval_model.py").write_text(f"open({str(marker)!r}, 'w')\n")
        (folder / "python_model.pkl").write_bytes(pickle.dumps(Planted(marker)))
    planted = registry.load(str(tampered("planted", plant_code)))
    assert not marker.exists() and len(planted.predict(pd.DataFrame({"text": ["tux"]}), params={"top_k": 1})) == 1

    # An MLmodel edited to run other code: `dudch search` (registry.load) refuses it.
    def edit(key, value):
        def change(folder):
            edited = yaml.safe_load((folder / "MLmodel").read_text())
            edited["flavors"]["python_function"][key] = value
            (folder / "MLmodel").write_text(yaml.safe_dump(edited))
        return change
    for key, value in (("code", "code"), ("loader_module", "retrieval_model"), ("python_model", "python_model.pkl")):
        with pytest.raises(DudchError, match="refused to load the model: its MLmodel names code that is not dudch's own"):
            registry.load(str(tampered(f"mlmodel-{key}", edit(key, value))))
    assert not marker.exists()


def test_compare_tabulates_runs_and_their_differences(pipeline_run):
    done = dudch("run", "--max-items", "300", "--bits", "16", "--param", "teacher_epochs=2",
                 "--param", "student_outer_iterations=2", "--param", "min_word_count=2",
                 "--param", "min_label_size=10", env=pipeline_run["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    table = dudch("compare", "--last", "2", env=pipeline_run["env"])
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "student mAP@50" and lines[1].split()[3:] == ["teacher", "16b", "i2t", "16b", "t2i", "32b", "i2t", "32b", "t2i"]
    assert lines[3].startswith(pipeline_run["run_id"][:8]) and lines[3].split()[3:5] == ["FINISHED", "DJSRH"]
    assert lines[2].split()[-2:] == ["-", "-"]  # the newer run trained 16 bits only
    assert lines[5] == "student mAP@all" and lines[8].startswith(pipeline_run["run_id"][:8])
    assert "  max_items: 300 | 600" in lines and "  teacher_epochs: 2 | 3" in lines
    comparison = json.loads(dudch("compare", "--last", "2", "--json", env=pipeline_run["env"]).stdout)
    assert comparison["differing"]["bits"] == ["[16]", "[16, 32]"]
    old = {(r["bits"], r["direction"], m): r[m] for r in comparison["runs"][1]["results"] if r["method"] == "student"
           for m in ("map_50", "map_all")}
    assert float(lines[3].split()[5]) == pytest.approx(old[(16, "i2t", "map_50")], abs=1e-4)
    assert float(lines[8].split()[5]) == pytest.approx(old[(16, "i2t", "map_all")], abs=1e-4)


def test_dudch_serve_guards_what_reaches_the_scoring_server_before_the_model(pipeline_run, production, monkeypatch):
    """MLflow's scoring server echoes a malformed body in its 400, puts a stack trace in a CSV
    one, and recurses until it fails (HTTP 500) on deeply nested JSON; behind `dudch serve`'s
    guard each is one short line, and a body past the bound is refused before it is parsed."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv(serving.MODEL_ENV, "models:/dudch@production")
    client = TestClient(serving.served_app())
    for body, content_type, status, message in (
            (b"{not json " + b"x" * 10_000, "application/json", 400, "Invalid input. Ensure that input is a valid JSON"),
            (b"text\ntux\n", "text/csv", 400, "Failed to parse input as a Pandas DataFrame"),
            (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "the JSON nests deeper than 32 levels"),
            (b'{"a": "' + b"x" * (49 * 2**20) + b'"}', "application/json", 413, "the request is over 48 MiB")):
        reply = client.post("/invocations", content=body, headers={"Content-Type": content_type})
        assert reply.status_code == status and len(reply.text) < 500, reply.text[:500]
        error = reply.json()
        assert set(error) == {"error_code", "message"} and error["message"].startswith(message)
        assert "xxxx" not in reply.text and "Traceback" not in reply.text
    good = {"dataframe_split": {"columns": ["text"], "data": [["tux"]]}, "params": {"top_k": 2}}
    reply = client.post("/invocations", json=good)
    local = production.predict(pd.DataFrame({"text": ["tux"]}), params={"top_k": 2})
    assert reply.status_code == 200 and reply.json()["predictions"][0]["ids"] == local["ids"][0]
    # The same through the real command, over HTTP.
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("dudch")), "serve", "--port", str(port)], cwd=ROOT,
                              env={**os.environ, **pipeline_run["env"]}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, start_new_session=True)
    try:
        wait_for_port(port, server, "dudch serve", timeout=300)
        served = requests.post(f"http://127.0.0.1:{port}/invocations", json=good, timeout=300)
        assert served.status_code == 200 and served.json()["predictions"][0]["ids"] == local["ids"][0]
        deep = requests.post(f"http://127.0.0.1:{port}/invocations", data=b"[" * 100_000, timeout=300,
                             headers={"Content-Type": "application/json"})
        assert deep.status_code == 400 and deep.json()["error_code"] == "BAD_REQUEST"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
    assert server.stdout.read().startswith(f"serving models:/dudch@production at http://127.0.0.1:{port}/invocations")


def test_json_depth_counts_brackets_outside_strings_only():
    assert serving.json_depth(b'{"a": [[1, 2], {"b": []}]}') == 4
    assert serving.json_depth(b'{"text": "[[[[[[ \\" ]]]] {{{{", "x": [1]}') == 2  # brackets and an escaped quote in a string
    assert serving.json_depth(b'["\\\\", [[]]]') == 3  # an escaped backslash ends no string early
    assert serving.json_depth(b"[" * 100 + b"]" * 100) == 100 and serving.json_depth(b"") == 0
