from kfp.dsl import Dataset, Output

from components import component


@component
def prepare_data(dataset: str, data_repo: str, data_rev: str, cache_dir: str, seed: int,
                 max_items: int, min_word_count: int, min_label_size: int, text_features: str,
                 image_input: str, mlflow_parent_run_id: str,
                 features: Output[Dataset], labels: Output[Dataset]):
    """A dataset SOURCE (e.g. "manifest:data/own/pairs.jsonl") -> `features` (image and text
    features, split, and the decoded pixels when image_input is "pixels": all that training
    reads) and `labels` (read by evaluation alone). With `data_repo`, the SOURCE's path is
    fetched through DVC from that repository at `data_rev`: exactly the pinned version."""
    from components.console import task_console

    with task_console("prepare") as console:
        import os
        import tempfile
        from dataclasses import asdict

        import mlflow
        from mlflow.data.meta_dataset import MetaDataset

        from components.tracking import dataset_source, stage_run
        from dudch import prepare, sources
        from dudch.storage import SharedCache, save_npz

        config = prepare.PrepareConfig(seed=seed, max_items=max_items, min_word_count=min_word_count,
                                       min_label_size=min_label_size, text_features=text_features,
                                       keep_pixels=image_input == "pixels")
        with stage_run(mlflow_parent_run_id, "prepare", params=asdict(config)):
            kind, path = sources.parse(dataset)
            if data_repo:
                from pipeline.data import fetch_pinned

                local, pin = fetch_pinned(data_repo, data_rev or None, path, cache_dir)
                dataset = f"{kind}:{local}"
                mlflow.set_tags({"dudch.data_repo": data_repo, "dudch.data_rev": pin["rev"],
                                 "dudch.data_version": pin["md5"]})
            shared = os.environ.get("DUDCH_SHARED_CACHE")  # pipeline.cluster.SHARED_CACHE_ENV
            feature_data, label_data, info = prepare.prepare(
                dataset, cache_dir, config, progress=lambda done, total: console.progress(done, total, "images"),
                shared_cache=SharedCache(shared) if shared else None)
            for warning in info["warnings"]:
                console.warn(warning)
            prepare.save(features.path, features=feature_data, info=info)
            prepare.save(labels.path, labels=label_data)
            mlflow.log_metrics({"items": info["items"], "text_dim": info["text_dim"],
                                "num_labels": info["num_labels"], "warnings": len(info["warnings"]),
                                **{f"split_{k}": v for k, v in info["split"].items()}})
            mlflow.log_dict(info, "prepare_info.json")
            # For the retrieval model (`dudch promote`): how queries become features, and the
            # items' ids and texts that search results show. No labels.
            mlflow.log_dict(info["encoders"], "retrieval/encoders.json")
            with tempfile.TemporaryDirectory() as tmp:
                save_npz(os.path.join(tmp, "items.npz"), item_id=label_data["item_id"], text=label_data["text"])
                mlflow.log_artifact(os.path.join(tmp, "items.npz"), "retrieval")
            # What training read, by content: the same digest means the same inputs.
            mlflow.log_input(MetaDataset(dataset_source(data_repo or path or sources.DEFAULT_OPENCLIPART),
                                         name=kind, digest=info["digest"]), context="training")
        features.metadata.update(items=info["items"], text_dim=info["text_dim"])
