from kfp.dsl import Dataset, Output

from components import component


@component
def prepare_data(raw_data: str, cache_dir: str, seed: int, max_items: int, min_word_count: int,
                 min_label_size: int, image_input: str, mlflow_parent_run_id: str,
                 features: Output[Dataset], labels: Output[Dataset]):
    """Raw OpenClipart tree -> `features` (image features, text BoW, split, and the rendered
    pixels when image_input is "pixels": all that training reads) and `labels` (categories and
    paths: read by evaluation alone)."""
    from dataclasses import asdict

    import mlflow

    from components.tracking import stage_run
    from dudch import prepare

    config = prepare.PrepareConfig(seed=seed, max_items=max_items, min_word_count=min_word_count,
                                   min_label_size=min_label_size, keep_pixels=image_input == "pixels")
    with stage_run(mlflow_parent_run_id, "prepare", params=asdict(config)):
        feature_data, label_data, info = prepare.prepare(raw_data, cache_dir, config)
        prepare.save(features.path, features=feature_data, info=info)
        prepare.save(labels.path, labels=label_data)
        mlflow.log_metrics({"items": info["items"], "text_dim": info["text_dim"],
                            "num_labels": info["num_labels"],
                            **{f"split_{k}": v for k, v in info["split"].items()}})
        mlflow.log_dict(info, "prepare_info.json")
    features.metadata.update(items=info["items"], text_dim=info["text_dim"])
