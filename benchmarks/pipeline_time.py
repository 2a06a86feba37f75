"""Wall time of a fresh-clone `make run`, task by task, for two commits on this machine.

Each commit is cloned fresh from this repository into a scratch folder, and there, one after
the other (never side by side):
  install   `make data`: the virtualenv, the pinned packages, the OpenClipart download and check;
  pipeline  `make run`: the default pipeline on an empty feature cache, as a new user runs it.
Each task's own time comes from the run's events (.dudch/logs/RUN/events.jsonl: a start and an
end per task, as the console draws them); a stage's time is the sum over its tasks (four code
lengths, two at a time on two cores). The gaps are the time within each code length's chain
(prepare -> teacher -> similarity -> student -> evaluate) between one task's end and the next
one's start: process start, imports, KFP's hand-over, and waiting for one of the two slots
(the later code lengths' teachers queue behind the first two chains). Both results tables are kept, and
whether they are equal. Ratios are after / before, so they hold for this machine only.

    .venv/bin/python benchmarks/pipeline_time.py --before COMMIT [--after COMMIT]
    # writes benchmarks/results/pipeline-time.{json,md}; about 25 minutes on 2 cores
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import cpu, machine  # noqa: E402

STAGES = ("prepare", "teacher", "similarity", "student", "evaluate")
REPORTED = STAGES + ("finish",)  # the exit task: ends the MLflow runs
# The files whose changes can move the results table (the rest only change how it is reached).
ALGORITHM_FILES = ("dudch/teacher.py", "dudch/ucch.py", "dudch/similarity.py", "dudch/student.py", "dudch/nets.py")


def commit_of(reference):
    return subprocess.run(["git", "rev-parse", reference], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def timed_make(target, clone, log):
    """Seconds that `make target` took in `clone`; its output appended to `log`."""
    started = time.perf_counter()
    with open(log, "a") as out:
        done = subprocess.run(["make", target], cwd=clone, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"`make {target}` failed in {clone}; see {log}")
    return time.perf_counter() - started


def task_times(events_path):
    """{(stage, bits): (start, end)} in seconds since the epoch, from a run's events file."""
    spans = {}
    for line in Path(events_path).read_text().splitlines():
        event = json.loads(line)
        key = (event["stage"], event["bits"])
        if event["event"] == "start":
            spans[key] = [event["time"], None]
        elif event["event"] == "end" and key in spans:
            spans[key][1] = event["time"]
    return {key: tuple(span) for key, span in spans.items() if span[1] is not None}


def summarise(spans):
    """Stage times (sum over tasks), the gaps inside each code length's chain, the tasks."""
    stages = defaultdict(float)
    for (stage, _), (start, end) in spans.items():
        stages[stage] += end - start
    gaps = []
    prepare_end = spans[("prepare", None)][1]
    for bits in sorted({bits for _, bits in spans if bits is not None}):
        previous = prepare_end
        for stage in STAGES[1:]:
            if (stage, bits) in spans:
                start, end = spans[(stage, bits)]
                gaps.append(start - previous)
                previous = end
    return dict(stages_s={stage: round(stages[stage], 1) for stage in REPORTED if stage in stages},
                gaps_s=dict(count=len(gaps), total=round(sum(gaps), 1), largest=round(max(gaps, default=0), 1)),
                tasks_s={f"{stage} {bits}b" if bits else stage: round(end - start, 1)
                         for (stage, bits), (start, end) in sorted(spans.items(), key=lambda kv: kv[1][0])})


def measure(commit, scratch):
    """One fresh clone of `commit`: install and pipeline seconds, per-task times, results table."""
    clone, log = scratch / commit[:12], scratch / f"{commit[:12]}.log"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    print(f"{commit[:12]}: make data ...", file=sys.stderr, flush=True)
    install = timed_make("data", clone, log)
    print(f"{commit[:12]}: make run ...", file=sys.stderr, flush=True)
    pipeline = timed_make("run", clone, log)
    events, = (clone / ".dudch" / "logs").glob("*/events.jsonl")
    output = log.read_text()
    table = output[output.index("Results ("):output.index("Compare runs in the MLflow UI")].strip()
    return dict(commit=commit, install_s=round(install, 1), make_run_s=round(pipeline, 1),
                **summarise(task_times(events)), results_table=table)


def algorithm_commits(before, after):
    """'hash subject' of each commit after `before` up to `after` that changed an algorithm
    file: where a difference between the two results tables can come from."""
    log = subprocess.run(["git", "log", "--format=%h %s", f"{before}..{after}", "--", *ALGORITHM_FILES],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return log.stdout.splitlines()


def feature_difference(before_clone, after_clone):
    """The largest absolute difference between the image features the two runs computed (their
    feature caches), or None when the caches hold different items or keys."""
    import numpy as np

    caches = [sorted((clone / ".dudch" / "cache").glob("image-features-*.npz")) for clone in (before_clone, after_clone)]
    if len(caches[0]) != 1 or [c.name for c in caches[0]] != [c.name for c in caches[1]]:
        return None
    with np.load(caches[0][0]) as before, np.load(caches[1][0]) as after:
        return float(np.abs(before["features"] - after["features"]).max())


def ratio(after, before):
    return round(after / before, 3) if before else None


def report(before, after, feature_difference):
    """The JSON result: both sides, each figure's after / before, the largest difference
    between their image features, and the commits between them that changed an algorithm."""
    return dict(
        machine=machine(), cpu=cpu(), command="python " + " ".join(sys.argv),
        before=before, after=after, image_features_max_abs_difference=feature_difference,
        algorithm_commits=algorithm_commits(before["commit"], after["commit"]),
        ratio=dict(install=ratio(after["install_s"], before["install_s"]),
                   make_run=ratio(after["make_run_s"], before["make_run_s"]),
                   install_and_make_run=ratio(after["install_s"] + after["make_run_s"],
                                              before["install_s"] + before["make_run_s"]),
                   gaps=ratio(after["gaps_s"]["total"], before["gaps_s"]["total"]),
                   stages={stage: ratio(after["stages_s"].get(stage, 0), seconds)
                           for stage, seconds in before["stages_s"].items()}),
        same_results_table=before["results_table"] == after["results_table"])


def markdown(result):
    before, after, ratios = result["before"], result["after"], result["ratio"]
    lines = ["# Wall time of a fresh-clone `make run`, before and after", "",
             f"Machine: {result['machine']}; CPU: {result['cpu']}. Command: `{result['command']}`. Both sides "
             f"measured one after the other on this machine: before at {before['commit'][:7]}, after at "
             f"{after['commit'][:7]}. Stage times are sums over the stage's tasks (four code lengths, two at "
             f"a time); gaps are the idle time between consecutive tasks of a code length's chain.", "",
             "| | before (s) | after (s) | after / before |", "|---|---|---|---|",
             f"| install (`make data`) | {before['install_s']} | {after['install_s']} | "
             f"{ratios['install']} |",
             f"| pipeline (`make run`) | {before['make_run_s']} | {after['make_run_s']} | {ratios['make_run']} |",
             f"| install + pipeline | {round(before['install_s'] + before['make_run_s'], 1)} | "
             f"{round(after['install_s'] + after['make_run_s'], 1)} | {ratios['install_and_make_run']} |"]
    for stage, seconds in before["stages_s"].items():
        lines.append(f"| {stage} (sum of tasks) | {seconds} | {after['stages_s'].get(stage, 0)} | "
                     f"{ratios['stages'][stage]} |")
    lines += [f"| gaps ({before['gaps_s']['count']} / {after['gaps_s']['count']}) | {before['gaps_s']['total']} | "
              f"{after['gaps_s']['total']} | {ratios['gaps']} |", "",
              f"Image features (the two runs' feature caches): largest absolute difference "
              f"{result['image_features_max_abs_difference']}. The results tables are "
              + ("identical." if result["same_results_table"] else "DIFFERENT:"), ""]
    if not result["same_results_table"]:
        lines += [f"Commits after {before['commit'][:7]} up to {after['commit'][:7]} that changed an algorithm "
                  f"file ({', '.join(ALGORITHM_FILES)}), where the difference can come from:", ""]
        lines += [f"- {commit if len(commit) <= 160 else commit[:157] + '...'}"
                  for commit in result["algorithm_commits"] or ["none"]]
        lines += ["", "Before:", "", "```", before["results_table"], "```", "", "After:", "", "```",
                  after["results_table"], "```", ""]
    else:
        lines += ["```", after["results_table"], "```", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit to measure first (e.g. the last release)")
    parser.add_argument("--after", default="HEAD", help="the commit to compare with it (default: HEAD)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline-time",
                        help="writes OUTPUT.json and OUTPUT.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pipeline-time-") as scratch:
        commits = [commit_of(reference) for reference in (args.before, args.after)]
        sides = [measure(commit, Path(scratch)) for commit in commits]
        result = report(*sides, feature_difference(*(Path(scratch) / c[:12] for c in commits)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
