"""The README's speed-at-a-memory-budget figures are the committed H200 results (benchmarks/results/), recomputed
here the way `benchmarks/capped_speed.py summary` computes them: a re-run that changes them must change the README."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAPPED = ROOT / "benchmarks" / "results" / "capped_speed_h200_2026-12-01_75d76e6.jsonl"


def results() -> list[dict]:
    return [json.loads(line) for line in CAPPED.read_text().splitlines() if line.strip()]


def test_the_readme_capped_table_is_the_committed_same_call_run():
    runs = results()
    readme = (ROOT / "README.md").read_text()
    for method in ("lora", "qlora"):
        peer = max((r for r in runs if r["recipe"] == "unsloth" and r["method"] == method),
                   key=lambda r: r["useful_tokens_per_s"])  # its best: every one of its runs fits every cap
        for ours in (r for r in runs if r["recipe"] == "ours" and r["method"] == method):
            ratio = ours["useful_tokens_per_s"] / peer["useful_tokens_per_s"]
            figure = f"{ours['useful_tokens_per_s']:,}"
            cell = f"{figure} vs {peer['useful_tokens_per_s']:,} ({ratio:.2f}x)" if ours["cap_gib"] == 24 \
                else f"{figure} ({ratio:.2f}x"
            assert cell in readme, f"{method} at {ours['cap_gib']:g} GiB: README lacks {cell!r}"


def test_the_readme_full_fine_tuning_figures_are_the_committed_run():
    by_recipe = {r["recipe"]: r for r in results() if r["method"] == "full"}
    seed, bf16, fp32 = (by_recipe[k] for k in ("seed", "ours-at-seed-peak", "ours-at-seed-peak-fp32"))
    assert (bf16["full_precision"], bf16["checkpointed_layers"]) == ("bf16", 0)
    assert (fp32["full_precision"], fp32["checkpointed_layers"]) == ("fp32", 8)
    readme = (ROOT / "README.md").read_text()
    ratio = bf16["useful_tokens_per_s"] / seed["useful_tokens_per_s"]
    assert (f"{bf16['useful_tokens_per_s']:,} vs {seed['useful_tokens_per_s']:,} tokens/s ({ratio:.2f}x) "
            f"in {bf16['peak_gib']:.1f} GiB") in readme.replace("\n", " ")
    assert f"{fp32['useful_tokens_per_s']:,} ({fp32['useful_tokens_per_s'] / seed['useful_tokens_per_s']:.2f}x)" in readme
