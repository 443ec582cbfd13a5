"""bench/fp8.py's record and protocol: the top level of bench/results/fp8.json names the runs its figures come
from, a run cut short before any comparable evaluation does not hide the newest run that had one, and the
natural mixture reads every source at the same pace from the prepared shards themselves."""

from __future__ import annotations

import json

import numpy as np

from bench.common import append_run
from bench.fp8 import compare_curves, natural_mixture, quality_figures, quality_variants, top_level
from genesis.manifest import (Manifest, SourceEntry, TokenizerEntry, read_manifest, sha256_file, write_manifest,
                              write_shard)


def run(part: str, rev: str, figures: dict, **extra) -> dict:
    return {"part": part, "git_rev": rev, "command": f"python bench/fp8.py {part}", "machine": "NVIDIA H200",
            "figures": figures, **extra}


def test_curves_compare_at_the_last_step_both_evaluated_and_over_the_whole_curve():
    reference = [[100, 5.0], [200, 4.0], [300, 3.0]]
    other = [[100, 5.5], [200, 4.0]]  # stopped before step 300

    comparison = compare_curves(reference, other)

    assert comparison["step"] == 200
    assert comparison["rel_diff"] == 0.0
    assert comparison["max_abs_rel_diff_over_curve"] == 0.1
    assert compare_curves(reference, []) == {}


def test_each_seed_trains_bf16_and_fp8_and_the_first_seed_keeps_the_names_earlier_runs_used():
    assert quality_variants([1234, 1235], "tensorwise", smoke=False) == {
        "bf16": ["parallel.float8=off", "seed=1234"],
        "fp8_tensorwise": ["parallel.float8=tensorwise", "seed=1234"],
        "bf16_seed1235": ["parallel.float8=off", "seed=1235"],
        "fp8_tensorwise_seed1235": ["parallel.float8=tensorwise", "seed=1235"],
    }
    assert quality_variants([7], "rowwise", smoke=True) == {"bf16": ["parallel.float8=off", "seed=7"]}  # no FP8 on CPU


def test_with_two_seeds_fp8_is_read_per_seed_and_against_the_spread_between_seeds():
    curves = {"bf16": [[100, 5.0], [200, 4.0]], "fp8_tensorwise": [[100, 5.0], [200, 4.04]],
              "bf16_seed1235": [[100, 5.1], [200, 4.08]], "fp8_tensorwise_seed1235": [[100, 5.1], [200, 4.08]]}

    figures = quality_figures(curves, [1234, 1235], "tensorwise")

    assert figures["val_loss_rel_diff"] == 0.01  # the first seed's pair: the issue's figure
    assert figures["val_loss_fp8"] == 4.04 and figures["val_loss_bf16"] == 4.0
    assert figures["val_loss_rel_diff_by_seed"] == {"1234": 0.01, "1235": 0.0}
    assert figures["val_loss_rel_diff_mean"] == 0.005
    assert figures["bf16_between_seeds_rel_diff"] == {"1235": 0.02}
    one_seed = quality_figures({k: v for k, v in curves.items() if "seed" not in k}, [1234], "tensorwise")
    assert "val_loss_rel_diff_by_seed" not in one_seed and one_seed["val_loss_rel_diff"] == 0.01
    assert quality_figures({"bf16": curves["bf16"]}, [1234], "tensorwise") == {}  # FP8 never evaluated


def test_a_one_seed_quality_run_clears_an_earlier_two_seed_runs_figures_from_the_top_level(tmp_path):
    out = tmp_path / "fp8.json"
    two_seeds = run("quality", "q1", {"val_loss_rel_diff": 0.01, "val_loss_rel_diff_mean": 0.005,
                                      "val_loss_rel_diff_by_seed": {"1234": 0.01, "1235": 0.0},
                                      "bf16_between_seeds_rel_diff": {"1235": 0.02}}, recipe="tensorwise")
    append_run(out, two_seeds, top_level(out, two_seeds), whole_top=True)
    one_seed = run("quality", "q2", {"val_loss_rel_diff": 0.003}, recipe="tensorwise")

    data = append_run(out, one_seed, top_level(out, one_seed), whole_top=True)  # as bench/fp8.py's main records

    assert data["val_loss_rel_diff"] == 0.003
    assert data.get("val_loss_rel_diff_mean") is None and data.get("val_loss_rel_diff_by_seed") is None
    assert data.get("bf16_between_seeds_rel_diff") is None
    assert [r["git_rev"] for r in data["runs"]] == ["q1", "q2"]  # both runs kept


def test_a_quality_run_without_figures_leaves_the_last_measured_one_and_its_recipe(tmp_path):
    out = tmp_path / "fp8.json"
    measured = run("quality", "aaa", {"val_loss_rel_diff": 0.005}, recipe="rowwise")
    out.write_text(json.dumps({"runs": [measured]}))

    latest = top_level(out, run("quality", "bbb", {}, recipe="tensorwise"))  # e.g. a CPU smoke run: bf16 only

    assert latest["val_loss_rel_diff"] == 0.005
    assert latest["val_loss_recipe"] == "rowwise"
    assert latest["git_rev"] == {"quality": "aaa"}


def test_each_part_reports_its_newest_measured_run(tmp_path):
    out = tmp_path / "fp8.json"
    out.write_text(json.dumps({"runs": [
        run("speed", "s1", {"fp8_tok_s": 90_000.0}),
        run("quality", "q1", {"val_loss_rel_diff": 0.005}, recipe="rowwise"),
        run("speed", "s2", {"fp8_tok_s": 96_000.0}),
    ]}))

    latest = top_level(out, run("noise", "n1", {"bf16_repeat_rel_diff": -0.019}))

    assert latest["fp8_tok_s"] == 96_000.0
    assert latest["val_loss_rel_diff"] == 0.005
    assert latest["bf16_repeat_rel_diff"] == -0.019
    assert latest["git_rev"] == {"speed": "s2", "quality": "q1", "noise": "n1"}
    assert latest["command"]["noise"] == "python bench/fp8.py noise"


def test_the_natural_mixture_weights_each_source_by_its_tokens_and_reads_the_same_shards(tmp_path):
    kit = tmp_path / "kit"
    tokenizer = kit / "tokenizer" / "tokenizer.model"
    tokenizer.parent.mkdir(parents=True)
    tokenizer.write_bytes(b"placeholder")
    sources = []
    for name, tokens in (("web", 999), ("books", 2_999)):  # + one EOS a document: 1,000 and 3,000
        document = np.append(np.arange(3, 3 + tokens) % 4_000, 2)
        shard = write_shard(kit / name / "shard_00000.arrow", [document], eos_id=2)
        shard.path = f"{name}/shard_00000.arrow"
        sources.append(SourceEntry(name=name, weight=0.5, shards=[shard]))
    entry = TokenizerEntry(path="tokenizer/tokenizer.model", sha256=sha256_file(tokenizer), vocab_size=4_096, eos_id=2)
    write_manifest(kit, Manifest(tokenizer=entry, sources=sources))

    natural = natural_mixture(kit, tmp_path / "natural")
    natural_mixture(kit, tmp_path / "natural")  # a second call (a resumed bench) finds it made

    manifest = read_manifest(natural)
    assert {s.name: s.weight for s in manifest.sources} == {"web": 0.25, "books": 0.75}
    for source in manifest.sources:
        for shard in source.shards:
            assert sha256_file(natural / shard.path) == shard.sha256
    assert sha256_file(natural / manifest.tokenizer.path) == manifest.tokenizer.sha256
    assert {s.name: s.weight for s in read_manifest(kit).sources} == {"web": 0.5, "books": 0.5}  # the kit untouched

    other_kit = tmp_path / "other-kit"
    kit.rename(other_kit)
    natural = natural_mixture(other_kit, tmp_path / "natural")  # the same --work, another kit: linked afresh
    assert all(sha256_file(natural / shard.path) == shard.sha256 for s in read_manifest(natural).sources
               for shard in s.shards)
