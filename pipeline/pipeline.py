"""The DUDCH pipeline: prepare once, then per bit length teacher -> similarity -> student ->
evaluate. Every default comes from the `dudch` configs, so code and pipeline agree."""

from typing import List

from kfp import dsl

from components.evaluate import evaluate
from components.prepare import prepare_data
from components.similarity import reconstruct_similarity
from components.student import train_student
from components.teacher import train_teacher
from pipeline.cluster import on_cluster, with_data
from dudch.prepare import PrepareConfig
from dudch.similarity import DEFAULT_RULE, DEFAULT_SOURCE
from dudch.student import StudentConfig
from dudch.teacher import TeacherConfig

T, S, P = TeacherConfig, StudentConfig, PrepareConfig


@dsl.pipeline(name="dudch", description="Unsupervised cross-modal hashing by knowledge distillation (DUDCH)")
def dudch_pipeline(
    dataset: str,
    cache_dir: str,
    mlflow_parent_run_id: str,
    data_repo: str = "",
    data_rev: str = "",
    bits: List[int] = [16, 32, 64, 128],
    seed: int = P.seed,
    max_items: int = P.max_items,
    min_word_count: int = P.min_word_count,
    min_label_size: int = P.min_label_size,
    text_features: str = P.text_features,
    teacher_epochs: int = T.epochs,
    teacher_batch_size: int = T.batch_size,
    beta: float = T.beta,
    eta: float = T.eta,
    mu: float = T.mu,
    lambda1: float = T.lambda1,
    lambda2: float = T.lambda2,
    lr_image: float = T.lr_image,
    lr_text: float = T.lr_text,
    teacher_image_input: str = T.image_input,
    momentum: float = T.momentum,
    weight_decay: float = T.weight_decay,
    similarity_source: str = DEFAULT_SOURCE,
    similarity_rule: str = DEFAULT_RULE,
    similarity_parameter: float = 0.0,
    student_outer_iterations: int = S.outer_iterations,
    student_inner_epochs: int = S.inner_epochs,
    omega_size: int = S.omega_size,
    student_batch_size: int = S.batch_size,
    gamma: float = S.gamma,
    student_lr: float = S.lr,
):
    prepared = prepare_data(dataset=dataset, data_repo=data_repo, data_rev=data_rev,
                            cache_dir=cache_dir, seed=seed, max_items=max_items,
                            min_word_count=min_word_count, min_label_size=min_label_size,
                            text_features=text_features, image_input=teacher_image_input, mlflow_parent_run_id=mlflow_parent_run_id).set_display_name("prepare data")
    with_data(on_cluster(prepared, cache=True))
    features = prepared.outputs["features"]
    with dsl.ParallelFor(bits) as k:
        teacher = train_teacher(features=features, bits=k, epochs=teacher_epochs,
                                batch_size=teacher_batch_size, beta=beta, eta=eta, mu=mu,
                                lambda1=lambda1, lambda2=lambda2, lr_image=lr_image,
                                lr_text=lr_text, momentum=momentum, weight_decay=weight_decay,
                                image_input=teacher_image_input, seed=seed,
                                mlflow_parent_run_id=mlflow_parent_run_id).set_display_name("teacher (DJSRH)")
        on_cluster(teacher, gpu=True, cache=True)
        similarity = reconstruct_similarity(features=features, teacher=teacher.outputs["teacher"],
                                            source=similarity_source, rule=similarity_rule,
                                            parameter=similarity_parameter,
                                            mlflow_parent_run_id=mlflow_parent_run_id).set_display_name("reconstruct similarity")
        on_cluster(similarity)
        student = train_student(features=features, similarity=similarity.outputs["similarity"], bits=k,
                                outer_iterations=student_outer_iterations,
                                inner_epochs=student_inner_epochs, omega_size=omega_size,
                                batch_size=student_batch_size, gamma=gamma, lr=student_lr, seed=seed,
                                mlflow_parent_run_id=mlflow_parent_run_id).set_display_name("student (DCC)")
        on_cluster(student, gpu=True)
        on_cluster(evaluate(features=features, labels=prepared.outputs["labels"], teacher=teacher.outputs["teacher"],
                            student=student.outputs["student"], bits=k,
                            mlflow_parent_run_id=mlflow_parent_run_id).set_display_name("evaluate"))
