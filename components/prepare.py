from kfp.dsl import Artifact, Dataset, Output

from components import component


@component
def prepare_data(dataset: str, data_version: str, data_repo: str, data_rev: str, cache_dir: str, seed: int,
                 max_items: int, min_word_count: int, min_label_size: int, text_features: str,
                 image_input: str, on_bad_image: str, max_bad_image_fraction: float, features: Output[Dataset], labels: Output[Dataset],
                 record: Output[Artifact]):
    """A dataset SOURCE (e.g. "manifest:data/own/pairs.jsonl") -> `features` (image and text
    features, split, and the decoded pixels when image_input is "pixels": all that training
    reads), `labels` (read by evaluation alone) and `record` (what `log_stage` logs to MLflow:
    this task is cached, so it takes no run id; `data_version`, the data's DVC md5, is only
    part of its cache key). With `data_repo`, the SOURCE's path is fetched through DVC from that
    repository at `data_rev`: exactly the pinned version."""
    from components.console import task_console

    with task_console("prepare") as console:
        import os
        import tempfile
        from dataclasses import asdict

        import torch

        from components.tracking import StageRecord
        from dudch import prepare, sources
        from dudch.storage import SharedCache, save_npz

        # Prepare runs alone, before the parallel stages that `dudch run` caps at a share of
        # the cores each (OMP_NUM_THREADS): image encoding gets every core.
        torch.set_num_threads(len(os.sched_getaffinity(0)))

        config = prepare.PrepareConfig(seed=seed, max_items=max_items, min_word_count=min_word_count,
                                       min_label_size=min_label_size, text_features=text_features,
                                       keep_pixels=image_input == "pixels", on_bad_image=on_bad_image,
                                       max_bad_image_fraction=max_bad_image_fraction)
        log = StageRecord(record.path, "prepare")
        log.log_params(asdict(config))
        kind, path = sources.parse(dataset)
        if data_repo:
            from pipeline.data import fetch_pinned

            local, pin = fetch_pinned(data_repo, data_rev or None, path, cache_dir)
            dataset = f"{kind}:{local}"
            log.set_tags({"dudch.data_repo": data_repo, "dudch.data_rev": pin["rev"],
                          "dudch.data_version": pin["md5"]})
        shared = os.environ.get("DUDCH_SHARED_CACHE")  # pipeline.cluster.SHARED_CACHE_ENV
        feature_data, label_data, info = prepare.prepare(
            dataset, cache_dir, config, progress=lambda done, total: console.progress(done, total, "images"),
            shared_cache=SharedCache(shared) if shared else None)
        for warning in info["warnings"]:
            console.warn(warning)
            log.warn(warning)
        prepare.save(features.path, features=feature_data, info=info)
        prepare.save(labels.path, labels=label_data)
        log.log_metrics({"items": info["items"], "bad_images": len(info["bad_images"]), "text_dim": info["text_dim"],
                         "num_labels": info["num_labels"], "warnings": len(info["warnings"]),
                         **{f"split_{k}": v for k, v in info["split"].items()}})
        log.log_dict(info, "prepare_info.json")
        # For the retrieval model (`dudch promote`): how queries become features, and the
        # items' ids and texts that search results show, and their image files' digests
        # (exact matches rank first). No labels.
        log.log_dict(info["encoders"], "retrieval/encoders.json")
        with tempfile.TemporaryDirectory() as tmp:
            save_npz(os.path.join(tmp, "items.npz"), item_id=label_data["item_id"], text=label_data["text"],
                     image_sha256=label_data["image_sha256"])
            log.log_artifact(os.path.join(tmp, "items.npz"), "retrieval")
        # What training read, by content: the same digest means the same inputs.
        log.log_input(data_repo or path or sources.DEFAULT_OPENCLIPART, kind, info["digest"])
        log.save()
        features.metadata.update(items=info["items"], text_dim=info["text_dim"])
