"""Checks of a run's parameters and dataset before any task starts: a mistake costs seconds and
one line, not a failed task minutes later. (The stages check their inputs again: on a cluster
they may be given other values.)"""

import math

from dudch import DudchError, has_credentials, shown
from dudch.prepare import BAD_IMAGE_POLICIES
from dudch.similarity import RULES, SOURCES
from dudch.student import INITS, OPTIMIZERS
from dudch.teacher import TEACHER_NAMES

BITS_RANGE = (8, 1024)
MIN_ITEMS = 10  # the fewest that the split (dudch.prepare.make_split) accepts

CHOICES = {"teacher": tuple(TEACHER_NAMES), "similarity_rule": RULES, "similarity_source": SOURCES, "student_optimizer": OPTIMIZERS,
           "student_init": INITS, "text_features": ("bow", "minilm"),
           "teacher_image_input": ("features", "pixels"), "on_bad_image": BAD_IMAGE_POLICIES}
POSITIVE = ("teacher_epochs", "teacher_batch_size", "student_outer_iterations", "student_inner_epochs",
            "omega_size", "student_batch_size", "lr_image", "lr_text", "student_lr", "min_word_count",
            "min_label_size", "mu", "ucch_epochs", "ucch_batch_size", "ucch_hidden", "ucch_lr",
            "ucch_temperature", "ucch_negatives")
NON_NEGATIVE = ("seed", "max_items", "student_lr_step", "similarity_parameter", "gamma", "eta",
                "lambda1", "lambda2", "momentum", "weight_decay", "student_weight_decay")
UNIT_INTERVAL = ("beta", "max_bad_image_fraction", "ucch_alpha", "ucch_bank_momentum")  # [0, 1]
OPEN_FRACTIONS = ("similarity_related_fraction",)  # (0, 1)


def check_parameters(params):
    """Refuse the first out-of-range pipeline parameter in `params` (defaults included) with a
    DudchError naming it and the allowed values."""
    for name, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DudchError(f"{name} must be a finite number, got {value}")
    bits = params["bits"]
    if not isinstance(bits, list) or not bits or not all(isinstance(b, int) and not isinstance(b, bool) for b in bits):
        raise DudchError(f"bits must be a list of code lengths, e.g. --bits 16 32 64 128; got {bits!r}")
    low, high = BITS_RANGE
    for b in bits:
        if not low <= b <= high:
            raise DudchError(f"--bits {b} is out of range: code lengths are {low} to {high} bits")
    if 0 < params["max_items"] < MIN_ITEMS:
        raise DudchError(f"--max-items {params['max_items']} is too few: a run needs at least {MIN_ITEMS} "
                         f"items (0: all)")
    repeated = sorted({b for b in bits if bits.count(b) > 1})
    if repeated:
        raise DudchError(f"--bits lists {repeated[0]} more than once; give each code length once")
    if has_credentials(params.get("data_repo", "")):
        raise DudchError("data_repo must not hold credentials (they would be stored with the run's "
                         "parameters); let git supply them (a credential helper or ~/.netrc), or use "
                         "an ssh URL")
    for name, allowed in CHOICES.items():
        if params[name] not in allowed:
            raise DudchError(f"{name}={shown(params[name])} is not one of: {', '.join(allowed)}")
    for name in POSITIVE:
        if not params[name] > 0:
            raise DudchError(f"{name} must be positive, got {params[name]}")
    for name in NON_NEGATIVE:
        if not params[name] >= 0:
            raise DudchError(f"{name} must be 0 or more, got {params[name]}")
    for name in UNIT_INTERVAL:
        if not 0 <= params[name] <= 1:
            raise DudchError(f"{name} must be between 0 and 1, got {params[name]}")
    for name in OPEN_FRACTIONS:
        if not 0 < params[name] < 1:
            raise DudchError(f"{name} must be between 0 and 1 (exclusive), got {params[name]}")
    if params["teacher"] == "ucch" and params["teacher_image_input"] != "features":
        raise DudchError("teacher=ucch trains on image features only; use teacher_image_input=features "
                         "(or teacher=djsrh to fine-tune on pixels)")


def check_dataset(source, params):
    """Run the dataset's own checks (those of `dudch data inspect`: no image is decoded) and
    refuse a dataset, or a --max-items, that leaves too few items to split. Returns the summary."""
    from dudch.prepare import PrepareConfig, describe, make_split

    config = PrepareConfig(seed=params["seed"], min_word_count=params["min_word_count"],
                           min_label_size=params["min_label_size"], text_features=params["text_features"],
                           on_bad_image=params["on_bad_image"])
    summary = describe(source, config)
    n = min(summary["n"], params["max_items"]) if params["max_items"] else summary["n"]
    if n < MIN_ITEMS:
        raise DudchError(f"{source} has {n} usable items: a run needs at least {MIN_ITEMS}; use more data")
    split = make_split(n, config)
    empty = [name for name, rows in split.items() if len(rows) == 0]
    if empty:
        raise DudchError(f"{n} items leave the {empty[0]} split empty; use more data")
    return summary
