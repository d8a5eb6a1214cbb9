"""The report's assets: the summary page as a reader sees it, what each rule cost, a DAG that stays readable."""

import json

from pipeline.io import write_json, write_table
from pipeline.report import collapse_dag, job_stats, summary_html


def _dag(shards: int) -> str:
    """A ``snakemake --dag`` graph of the per-shard stages of ``shards`` shards feeding one index and training."""
    lines = ["digraph snakemake_dag {", "    graph[bgcolor=white, margin=0];",
             '\t0[label = "features_index", color = "0.23 0.6 0.85", style="rounded"];',
             '\t1[label = "train_stage1", color = "0.53 0.6 0.85", style="rounded"];', "\t0 -> 1"]
    for i in range(shards):
        for j, (rule, color) in enumerate((("compress", "0.03"), ("features", "0.20"))):
            lines.append(f'\t{2 + 2 * i + j}[label = "{rule}\\nshard: shard-{i:05d}", color = "{color} 0.6 0.85", '
                         'style="rounded"];')
        lines += [f"\t{2 + 2 * i} -> {3 + 2 * i}", f"\t{3 + 2 * i} -> 0"]
    return "\n".join(lines + ["}"]) + "\n"


def test_a_dag_of_many_shards_has_one_node_per_rule_with_its_job_count():
    collapsed = collapse_dag(_dag(120))
    nodes = [line for line in collapsed.splitlines() if "[label" in line]
    assert len(nodes) == 4
    assert 'rule_compress[label = "compress\\n× 120 jobs", color = "0.03 0.6 0.85", style="rounded"];' in collapsed
    edges = [line.strip() for line in collapsed.splitlines() if "->" in line]
    assert sorted(edges) == ["0 -> 1", "rule_compress -> rule_features", "rule_features -> 0"]
    small = collapse_dag(_dag(2))  # a few shards: every job stays
    assert small.count("[label") == 6 and "shard: shard-00001" in small


def test_the_summary_shows_questions_as_asked_every_prediction_and_what_each_rule_cost(tmp_path):
    shards = [str(tmp_path / "compress" / f"shard-0000{s}.tsv") for s in range(2)]
    for shard in shards:
        write_table(shard, [{"video_id": f"v{i}", "status": "ok", "reason": "", "path": ""} for i in range(6)],
                    ["video_id", "status", "reason", "path"])
    write_table(tmp_path / "rejected.tsv", [], ["video_id", "source", "reason"])
    counts = {"annotations": 15, "kept": 15, "rejected": 0, "rejected_by_reason": {},
              "train": {"records": 0, "videos": 0}, "val": {"records": 15, "videos": 4}}
    write_json(tmp_path / "instructions" / "demo" / "counts.json", counts)
    write_json(tmp_path / "train" / "stage2" / "data_counts.json",
               {"demo": {"available": 40, "taken": 40, "ratio": 1.0, "max_records": None}})
    write_json(tmp_path / "train" / "stage2" / "train_metrics.json", {"train_samples_per_second": 1.5})
    write_json(tmp_path / "metrics.json", {"count": 15, "exact_match": 0.0, "token_f1": 0.066, "model": "m"})
    (tmp_path / "predictions.jsonl").write_text("".join(
        json.dumps({"video": "v", "question": f"What is shown in clip {i}?\n<video>", "reference": "A car.",
                    "prediction": "A car."}) + "\n" for i in range(15)))
    for rule, seconds in (("compress/shard-00000", 3.0), ("compress/shard-00001", 1.0), ("train_stage2", 99.3)):
        write_table(tmp_path / "benchmarks" / f"{rule}.tsv", [{"s": seconds, "h:m:s": "", "max_rss": 2422.4,
                                                               "cpu_time": seconds}], ["s", "h:m:s", "max_rss",
                                                                                      "cpu_time"])
    page = summary_html({"compress": shards}, tmp_path / "rejected.tsv",
                        [tmp_path / "instructions" / "demo" / "counts.json"],
                        [tmp_path / "train" / "stage2" / "data_counts.json"], tmp_path / "metrics.json",
                        tmp_path / "predictions.jsonl", tmp_path / "benchmarks",
                        [tmp_path / "train" / "stage2" / "train_metrics.json"])
    assert "<h3>All 15 predictions</h3>" in page and page.count("<td>A car.</td>") == 30
    assert "<td>What is shown in clip 14?</td>" in page and "&lt;video&gt;" not in page and "\\n" not in page
    assert "<td>all</td>" in page and "None" not in page
    assert "<td>train_stage2</td>" in page and "<td>1.50 samples/s</td>" in page
    costs = job_stats(tmp_path / "benchmarks", {"compress": shards})
    assert costs.set_index("rule").loc["compress", ["jobs", "wall s", "throughput"]].tolist() == [2, 4.0,
                                                                                                 "3.00 videos/s"]

