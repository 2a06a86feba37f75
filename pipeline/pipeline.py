"""The DUDCH pipeline: prepare once, then per bit length teacher -> similarity -> student ->
evaluate. Every default comes from the `dudch` configs, so code and pipeline agree."""

from typing import List

from kfp import dsl

from components.evaluate import evaluate
from components.finish import finish_run
from components.prepare import prepare_data
from components.record import log_stage
from components.similarity import reconstruct_similarity
from components.student import train_student
from components.teacher import train_teacher
from pipeline.cluster import on_cluster, with_data
from dudch.prepare import PrepareConfig
from dudch.similarity import DEFAULT_RULE, DEFAULT_SOURCE, RELATED_FRACTION
from dudch.student import StudentConfig
from dudch.teacher import DEFAULT_TEACHER, TeacherConfig
from dudch.ucch import UCCHConfig

T, U, S, P = TeacherConfig, UCCHConfig, StudentConfig, PrepareConfig


@dsl.pipeline(name="dudch", description="Unsupervised cross-modal hashing by knowledge distillation (DUDCH)")
def dudch_pipeline(
    dataset: str,
    cache_dir: str,
    mlflow_parent_run_id: str,
    data_version: str = "",
    data_repo: str = "",
    data_rev: str = "",
    bits: List[int] = [16, 32, 64, 128],
    seed: int = P.seed,
    max_items: int = P.max_items,
    min_word_count: int = P.min_word_count,
    min_label_size: int = P.min_label_size,
    text_features: str = P.text_features,
    on_bad_image: str = P.on_bad_image,
    max_bad_image_fraction: float = P.max_bad_image_fraction,
    teacher: str = DEFAULT_TEACHER,
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
    ucch_epochs: int = U.epochs,
    ucch_batch_size: int = U.batch_size,
    ucch_hidden: int = U.hidden,
    ucch_lr: float = U.lr,
    ucch_temperature: float = U.temperature,
    ucch_alpha: float = U.alpha,
    ucch_negatives: int = U.negatives,
    ucch_bank_momentum: float = U.bank_momentum,
    similarity_source: str = DEFAULT_SOURCE,
    similarity_rule: str = DEFAULT_RULE,
    similarity_parameter: float = 0.0,
    similarity_related_fraction: float = RELATED_FRACTION,
    student_outer_iterations: int = S.outer_iterations,
    student_inner_epochs: int = S.inner_epochs,
    omega_size: int = S.omega_size,
    student_batch_size: int = S.batch_size,
    gamma: float = S.gamma,
    soft_constraint: bool = S.soft_constraint,
    student_optimizer: str = S.optimizer,
    student_lr: float = S.lr,
    student_lr_step: int = S.lr_step,
    student_weight_decay: float = S.weight_decay,
    student_init: str = S.init,
):
    """DUDCH: prepare once, then per bit length teacher -> similarity -> student -> evaluate.

    Args:
        dataset: the dataset SOURCE: openclipart, mirflickr25k:DIR, nuswide:DIR, mirflickr25k-zip:FILE or manifest:FILE.
        cache_dir: where decoded and encoded images are cached, by content.
        mlflow_parent_run_id: the MLflow run that the stages log their child runs under.
        data_version: the data's DVC md5 (unique per run for unpinned data): the prepared data is reused from an earlier run only when it and every prepare parameter are the same.
        data_repo: a git repository whose DVC pin the dataset is fetched from (empty: a local path).
        data_rev: the revision of data_repo (empty: its default branch).
        bits: the code lengths to train, one teacher and student each.
        seed: seeds the split and every stage.
        max_items: use only the first N items (0: all).
        min_word_count: a text word enters the bag of words when this many items use it.
        min_label_size: OpenClipart: a category folder becomes a label at this many drawings.
        text_features: bow (bag of words over tags) or minilm (sentence embeddings).
        on_bad_image: skip (leave images that cannot be decoded out, list them in the warnings and MLflow) or fail.
        max_bad_image_fraction: with skip, fail anyway when more than this share of the images cannot be decoded.
        teacher: the teacher the student distils: djsrh (DJSRH, the teacher_/DJSRH parameters) or ucch (UCCH, the ucch_ parameters).
        teacher_epochs: DJSRH training epochs (DJSRH: 80).
        teacher_batch_size: DJSRH batch size (DJSRH: 32).
        beta: DJSRH weight of the image affinity in the joint affinity (MIRFLICKR 0.9, NUS-WIDE 0.6).
        eta: DJSRH weight of the second-order affinity term (0.4).
        mu: DJSRH scale of the joint affinity (1.5).
        lambda1: DJSRH weight of the image-image reconstruction (0.1).
        lambda2: DJSRH weight of the text-text reconstruction (0.1).
        lr_image: DJSRH learning rate of the image network (0.001).
        lr_text: DJSRH learning rate of the text network (0.01).
        teacher_image_input: features (hash layer on frozen EfficientNet-Lite0 features) or pixels (fine-tune end to end, GPU).
        momentum: DJSRH SGD momentum (0.9).
        weight_decay: DJSRH weight decay (5e-4).
        ucch_epochs: UCCH training epochs (UCCH: 20).
        ucch_batch_size: UCCH batch size (UCCH: 256).
        ucch_hidden: width of UCCH's hidden layers (UCCH: 8192; two on the image side, one on the text side).
        ucch_lr: UCCH's Adam learning rate (UCCH: 1e-4).
        ucch_temperature: UCCH's contrastive temperature T (UCCH: 0.9).
        ucch_alpha: UCCH's weight of the contrastive loss against the ranking loss (UCCH: 0.7).
        ucch_negatives: negatives K drawn from UCCH's memory bank per item (UCCH: 4096).
        ucch_bank_momentum: momentum of UCCH's memory bank update (UCCH: 0.4).
        similarity_source: the teacher's view the similarity is built from: hash (hash-layer outputs), deep, both, or raw (no teacher: ablation).
        similarity_rule: graded (1 for union-kNN neighbours, 1/2 for pairs above the related quantile, 0 else), union_knn, mutual_knn or quantile.
        similarity_parameter: neighbours per item for the kNN rules and graded, or the similar fraction for quantile (0: 1% of the database as neighbours, 0.2 for quantile).
        similarity_related_fraction: graded: the fraction of all pairs at level 1/2 or above.
        student_outer_iterations: alternations of network training and a DCC sweep (ADSH: 50).
        student_inner_epochs: network epochs over Omega per outer iteration (ADSH: 3).
        omega_size: items sampled per outer iteration (ADSH: 2,000).
        student_batch_size: network batch size.
        gamma: weight tying the networks' outputs to the binary codes (ADSH: 200; 800 won on the validation split).
        soft_constraint: ADSH's class balance: similar pairs weigh +1, dissimilar -r with r = similar / dissimilar mass.
        student_optimizer: sgd (ADSH) or adam.
        student_lr: the student networks' learning rate (ADSH: 1e-3).
        student_lr_step: divide the learning rate by 10 every this many outer iterations (0: never).
        student_weight_decay: the student networks' weight decay (ADSH: 5e-4).
        student_init: database codes start from the teacher's codes (teacher), zeros (ADSH) or random.
    """
    # On success, failure or cancellation alike, the MLflow parent run is ended (FINISHED with
    # its summary, FAILED or KILLED) and tagged with the KFP run id.
    finish = finish_run(mlflow_parent_run_id=mlflow_parent_run_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    with dsl.ExitHandler(on_cluster(finish.set_display_name("finish MLflow run")), name="dudch"):
        prepared = prepare_data(dataset=dataset, data_version=data_version, data_repo=data_repo, data_rev=data_rev,
                                cache_dir=cache_dir, seed=seed, max_items=max_items,
                                min_word_count=min_word_count, min_label_size=min_label_size,
                                text_features=text_features, image_input=teacher_image_input,
                                on_bad_image=on_bad_image, max_bad_image_fraction=max_bad_image_fraction).set_display_name("prepare data")
        # Not retried: after `dudch submit`'s checks, a bad dataset (missing, corrupt, too many
        # undecodable images) is the one failure left to the user, and it is found here. A
        # retry would repeat it after minutes of backoff; a preempted prepare is resubmitted.
        with_data(on_cluster(prepared, cache=True, retry=False))
        # The cached stages take no run id; these tasks log their records to this run.
        on_cluster(log_stage(record=prepared.outputs["record"], mlflow_parent_run_id=mlflow_parent_run_id)
                   .set_display_name("log prepare to MLflow"))
        features = prepared.outputs["features"]
        with dsl.ParallelFor(bits) as k:
            teacher_task = train_teacher(features=features, method=teacher, bits=k, epochs=teacher_epochs,
                                    batch_size=teacher_batch_size, beta=beta, eta=eta, mu=mu,
                                    lambda1=lambda1, lambda2=lambda2, lr_image=lr_image,
                                    lr_text=lr_text, momentum=momentum, weight_decay=weight_decay,
                                    image_input=teacher_image_input, ucch_epochs=ucch_epochs,
                                    ucch_batch_size=ucch_batch_size, ucch_hidden=ucch_hidden, ucch_lr=ucch_lr,
                                    ucch_temperature=ucch_temperature, ucch_alpha=ucch_alpha,
                                    ucch_negatives=ucch_negatives, ucch_bank_momentum=ucch_bank_momentum,
                                    seed=seed).set_display_name("teacher")
            on_cluster(teacher_task, gpu=True, cache=True)
            on_cluster(log_stage(record=teacher_task.outputs["record"], mlflow_parent_run_id=mlflow_parent_run_id)
                       .set_display_name("log teacher to MLflow"))
            similarity = reconstruct_similarity(features=features, teacher=teacher_task.outputs["teacher"], bits=k,
                                                source=similarity_source, rule=similarity_rule,
                                                parameter=similarity_parameter,
                                                related_fraction=similarity_related_fraction,
                                                mlflow_parent_run_id=mlflow_parent_run_id).set_display_name("reconstruct similarity")
            on_cluster(similarity)
            student = train_student(features=features, similarity=similarity.outputs["similarity"], bits=k,
                                    outer_iterations=student_outer_iterations,
                                    inner_epochs=student_inner_epochs, omega_size=omega_size,
                                    batch_size=student_batch_size, gamma=gamma,
                                    soft_constraint=soft_constraint, optimizer=student_optimizer,
                                    lr=student_lr, lr_step=student_lr_step,
                                    weight_decay=student_weight_decay, init=student_init, seed=seed,
                                    mlflow_parent_run_id=mlflow_parent_run_id).set_display_name("student (DCC)")
            on_cluster(student, gpu=True)
            on_cluster(evaluate(features=features, labels=prepared.outputs["labels"], teacher=teacher_task.outputs["teacher"],
                                student=student.outputs["student"], bits=k,
                                mlflow_parent_run_id=mlflow_parent_run_id).set_display_name("evaluate"))
