"""On a cluster each pod starts with an empty disk: the image-feature cache is shared through S3
(a compile-time setting), here a real S3-compatible server on a loopback port."""

import boto3
import numpy as np

from dudch import prepare, sources
from dudch.storage import SharedCache
from tests.test_cluster_spec import load
from tests.helpers import dudch

CONFIG = prepare.PrepareConfig(max_items=24, min_label_size=1, min_word_count=1, image_size=64, keep_pixels=True)


def test_a_second_pod_fetches_the_features_instead_of_decoding(openclipart_root, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    boto3.client("s3").create_bucket(Bucket="dudch-cache")
    shared = SharedCache("s3://dudch-cache/features")
    source = f"openclipart:{openclipart_root}"
    first, _, _ = prepare.prepare(source, tmp_path / "pod-a", CONFIG, progress=False, shared_cache=shared)
    stored = boto3.client("s3").list_objects_v2(Bucket="dudch-cache", Prefix="features/")["Contents"]
    names = sorted(o["Key"].split("/")[1] for o in stored)  # each entry, and its seal
    assert [n.split("-")[0] for n in names] == ["image", "image", "pixels", "pixels"]
    assert [n for n in names if n.endswith(".seal.json")] == [n + ".seal.json" for n in names if not n.endswith(".json")]

    decoded = []
    monkeypatch.setattr(sources, "read_image", lambda path, size: decoded.append(path))
    second, _, _ = prepare.prepare(source, tmp_path / "pod-b", CONFIG, progress=False, shared_cache=shared)
    assert decoded == []  # nothing decoded or encoded on the second pod
    for name in ("image", "pixels", "text"):
        np.testing.assert_array_equal(first[name], second[name])
    assert sorted(p.name for p in (tmp_path / "pod-b").iterdir()) == sorted(o["Key"].split("/")[1] for o in stored)


def test_the_shared_cache_is_a_compile_time_setting(tmp_path):
    out = tmp_path / "pipeline.yaml"
    done = dudch("compile", "--output", str(out), env={"DUDCH_SHARED_CACHE": "s3://bucket/dudch-cache"})
    assert done.returncode == 0, done.stderr
    spec, _ = load(out)
    env = spec["deploymentSpec"]["executors"]["exec-prepare-data"]["container"]["env"]
    assert {"name": "DUDCH_SHARED_CACHE", "value": "s3://bucket/dudch-cache"} in env
