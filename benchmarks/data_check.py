"""Records/s of `data check` on a generated data set: default mode and --decode, side by side.

The data set is the synthetic shapes set (one 64 px PNG per record, 20,000 records; 2,000 with
--quick), checked with the `tiny` profile's byte tokenizer and 32 px tower spec, so every record
is parsed, its image probed (or decoded) and its text tokenized and masked. The two modes take
turns (default, decode, default, decode, ...) and each reports its best round, so neither is
favoured by running first or last on a machine whose load or page cache changes.

    python benchmarks/data_check.py [--quick] [--records N] [--workers N] [--rounds R]

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from llavactl.data.check import check_dataset
from llavactl.data.synth import write_shapes
from llavactl.data.tokens import TokenContext
from llavactl.model.sources import IMAGE_TOKEN, load_tokenizer, tower_image_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 records (well under a minute)")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="turns of each mode (best one reported)")
    args = parser.parse_args()
    n = args.records or (2_000 if args.quick else 20_000)
    tokenizer = load_tokenizer("builtin:tiny-llama")
    tokens = TokenContext(
        tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tower_image_spec("builtin:tiny-clip", None)
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        records = write_shapes(Path(tmp), n=n, seed=0)
        generate_s = time.perf_counter() - start
        figures: dict[str, object] = {"records": n, "workers": args.workers, "generate_s": round(generate_s, 2)}
        best: dict[str, float] = {}
        for round_ in range(1, args.rounds + 1):
            for mode, decode in (("default", False), ("decode", True)):
                start = time.perf_counter()
                report, _ = check_dataset(
                    records, Path(tmp), "vicuna_v1", 2048, tokens, workers=args.workers, decode=decode
                )
                elapsed = time.perf_counter() - start
                assert report.records == n and not report.errors, "the generated data set must check clean"
                best[mode] = min(best.get(mode, elapsed), elapsed)
                print(f"round {round_} {mode:>8}: {n} records in {elapsed:.2f} s = {n / elapsed:,.0f} records/s")
        for mode, elapsed in best.items():
            figures[f"{mode}_records_per_s"] = round(n / elapsed, 1)
        figures["goal_default_records_per_s"] = 2000
        figures["goal_met"] = n / best["default"] >= 2000
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
