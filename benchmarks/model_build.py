"""Build time of a LLaVA model from local folders: llavactl against two references, side by side.

- `llavactl`: `build_llava` (skeleton on the meta device, each part's weights read once).
- `init_then_load`: the naive way: `LlavaForConditionalGeneration(config)`, which initialises
  every weight, then `load_state_dict` of the tower's and the LLM's files over them.
- `from_pretrained`: transformers' own loader on the same model saved as one LLaVA folder
  (the best a loader of an already assembled model does).

Every variant also loads the tokenizer, resizes nothing (the vocabulary has room for `<image>`)
and adds the same LoRA adapters, so only the way weights get in differs. Each run is a fresh
interpreter; the time excludes imports. Random weights in local_lite's shapes (CLIP ViT-L/14-336,
SmolLM-135M); `--quick` uses fewer layers of the same widths.
Usage: python benchmarks/model_build.py [--quick]. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("llavactl", "init_then_load", "from_pretrained")
TOWER_ID, LLM_ID = "openai/clip-vit-large-patch14-336", "HuggingFaceTB/SmolLM-135M"


def _make_sources(root: Path, quick: bool) -> dict[str, int]:
    """Random-weight tower and LLM folders (with tokenizer), and the assembled LLaVA folder."""
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from llavactl.model import builtin, known_configs
    from llavactl.model.weight_files import quiet_loading

    tower_config = known_configs.tower_config(TOWER_ID)
    llm_config = known_configs.llm_config(LLM_ID)
    if quick:
        tower_config.num_hidden_layers, llm_config.num_hidden_layers = 6, 8
    torch.manual_seed(0)
    tower = CLIPVisionModel(tower_config)
    llm = LlamaForCausalLM(llm_config)
    with quiet_loading():
        tower.save_pretrained(root / "tower")
        llm.save_pretrained(root / "llm")
        builtin.tokenizer().save_pretrained(root / "llm")
        _build("llavactl", root, stage="projector").model.save_pretrained(root / "llava")
    return {
        "tower_parameters": sum(p.numel() for p in tower.parameters()),
        "llm_parameters": sum(p.numel() for p in llm.parameters()),
    }


def _model_config(root: Path):  # -> ModelConfig
    from llavactl.config.schema import ModelConfig

    return ModelConfig(model_name_or_path=str(root / "llm"), vision_tower=str(root / "tower"))


def _build(variant: str, root: Path, stage: str = "lora"):  # -> AssembledModel | nn.Module
    from llavactl.model.assembly import add_lora, build_llava

    if variant == "llavactl":
        return build_llava(_model_config(root), stage, image_size=None, seed=0)
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from llavactl.model.sources import IMAGE_TOKEN, load_tokenizer

    tokenizer = load_tokenizer(str(root / "llm"))
    if variant == "from_pretrained":
        model = LlavaForConditionalGeneration.from_pretrained(root / "llava")
    else:
        from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig

        config = LlavaConfig(
            vision_config=CLIPVisionConfig.from_pretrained(root / "tower"),
            text_config=AutoConfig.from_pretrained(root / "llm"),
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        )
        model = LlavaForConditionalGeneration(config)
        model.model.vision_tower.load_state_dict(load_file(root / "tower" / "model.safetensors"))
        llm_state = load_file(root / "llm" / "model.safetensors")
        decoder = {k.removeprefix("model."): v for k, v in llm_state.items() if k.startswith("model.")}
        model.model.language_model.load_state_dict(decoder)
    model.requires_grad_(False)
    return add_lora(model, _model_config(root))


def _peak_rss_mb() -> float:
    # VmHWM belongs to this process's memory map; ru_maxrss would carry the parent's peak over exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark reads Linux's peak RSS)")


def _worker(variant: str, root: Path) -> None:
    import time

    import torch  # noqa: F401 - imported before timing, as in every variant

    start = time.perf_counter()
    _build(variant, root)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}))


def _run(variant: str, root: Path) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, __file__, "--worker", variant, "--root", str(root)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the {variant} run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and one run per variant")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.root)
        return
    runs = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="llavactl-build-") as tmp:
        root = Path(tmp)
        sizes = _make_sources(root, args.quick)
        samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for _ in range(runs):
            for variant in VARIANTS:
                samples[variant].append(_run(variant, root))
    seconds = {v: statistics.median(s["seconds"] for s in samples[v]) for v in VARIANTS}
    peak = {v: max(s["peak_rss_mb"] for s in samples[v]) for v in VARIANTS}
    for variant in VARIANTS:
        print(f"{variant:16s} median {seconds[variant]:6.2f} s over {runs} runs, peak RSS {peak[variant]:7.0f} MB")
    speedup = seconds["init_then_load"] / seconds["llavactl"]
    print(f"init_then_load / llavactl = {speedup:.2f}x; llavactl / from_pretrained = "
          f"{seconds['llavactl'] / seconds['from_pretrained']:.2f}x")  # fmt: skip
    result = {f"{v}_s": round(seconds[v], 3) for v in VARIANTS}
    result.update({f"{v}_peak_rss_mb": round(peak[v]) for v in VARIANTS})
    result.update(sizes, quick=args.quick, runs=runs, speedup_vs_init_then_load=round(speedup, 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
