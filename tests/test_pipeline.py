import yaml

from tests.conftest import free_port
from tests.helpers import ROOT, dudch


def test_pipeline_yaml_is_in_sync_with_the_code():
    done = dudch("compile", "--check")
    assert done.returncode == 0, done.stderr


def test_compile_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "pipeline.yaml"
    stale.write_text((ROOT / "pipeline.yaml").read_text() + "# edited by hand\n")
    done = dudch("compile", "--check", "--output", str(stale))
    assert done.returncode == 1 and "out of date" in done.stderr


def test_pipeline_shape_prepare_once_then_a_branch_per_bit_length_then_finish():
    spec = next(yaml.safe_load_all((ROOT / "pipeline.yaml").read_text()))
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finish-run"}
    # The exit task ends the MLflow parent run whatever the stages' outcome.
    assert root["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["finish-run"]["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    stages = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(stages) == {"prepare-data", "log-stage", "for-loop-2"}
    loop = stages["for-loop-2"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--bits"
    branch = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]
    assert set(branch) == {"train-teacher", "log-stage-2", "reconstruct-similarity", "train-student", "evaluate"}
    assert spec["root"]["inputDefinitions"]["parameters"]["bits"]["defaultValue"] == [16, 32, 64, 128]


def test_unreachable_mlflow_gives_one_line_naming_the_fix():
    done = dudch("run", "--max-items", "600", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:9" in done.stderr
    assert "unset MLFLOW_TRACKING_URI" in done.stderr


def test_unknown_parameter_and_missing_data_are_clear(tmp_path):
    done = dudch("run", "--param", "epochz=3")
    assert done.returncode == 2 and "unknown pipeline parameter 'epochz=3'" in done.stderr
    (tmp_path / "data.dvc").write_text((ROOT / "data.dvc").read_text())
    done = dudch("run", cwd=tmp_path)
    assert done.returncode == 2 and "run `dudch data openclipart`" in done.stderr


def test_help_explains_every_command():
    done = dudch("--help")
    for command in ("data", "run", "params", "compile", "report"):
        assert command in done.stdout
    params = dudch("params").stdout
    assert "teacher_epochs" in params and "similarity_rule" in params


def test_submit_to_an_unreachable_host_fails_fast_with_one_line():
    port = free_port()  # a loopback port that nothing listens on: refused at once, no retries
    done = dudch("submit", "--host", f"http://127.0.0.1:{port}", "--param", "dataset=openclipart:/data", timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}" in done.stderr and "--host" in done.stderr


def test_submit_reports_a_refused_token(tmp_path):
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        done = dudch("submit", "--host", f"http://127.0.0.1:{server.server_port}", "--param", "dataset=openclipart:/d",
                     env={"KFP_TOKEN": "expired"}, timeout=300)
    finally:
        server.server_close()
    assert done.returncode == 2 and "refused the request (HTTP 401)" in done.stderr and "KFP_TOKEN" in done.stderr


def test_any_data_location_can_be_recorded_as_an_mlflow_dataset_source():
    from components.tracking import dataset_source

    assert dataset_source("/data/own").to_json() == '{"uri": "/data/own"}'
    assert dataset_source("s3://bucket/own")._get_source_type() == "s3"
    assert dataset_source("ssh://git@git.example/team/project.git").url == "ssh://git@git.example/team/project.git"
