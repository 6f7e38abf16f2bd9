"""``make llmfoundry-check``: a tiny MPT trained by llm-foundry itself, with this package's algorithm.

It needs llm-foundry (``make llmfoundry-check`` installs llm-foundry==0.22.0 into ``.venv-llmfoundry``) and
nothing from the network (``HF_HUB_OFFLINE=1``):

1. a word-level tokenizer is built locally from a small synthetic corpus and saved with ``save_pretrained``;
2. the corpus is written as MDS shards (mosaicml-streaming) under ``<folder>/data/train``;
3. an llm-foundry training YAML is written: ``mpt_causal_lm`` with d_model 64 and 2 layers, fp32,
   ``global_train_batch_size`` 8 in microbatches of 4, ``num_workers: 0`` with ``prefetch_factor: null``,
   ``OptimizerMonitor`` and console logging every 2 batches, and ``algorithms: {gradclip_algo: {...}}``;
4. llm-foundry's train entry point (``llmfoundry.command_utils.train_from_yaml``, what its
   ``scripts/train/train.py`` calls) trains it;
5. the metrics are checked: the algorithm llm-foundry built is ``GradClipAlgo``; ``gradient_clipping/*``
   was logged at batches 2, 4, 6, 8, the steps of OptimizerMonitor's ``l2_norm/grad/global``, which bounds
   the post-clip norm (of the parameters clipped; OptimizerMonitor's covers the excluded ones too, so it
   is at least as large); the post-clip norm never exceeds the threshold and some steps were clipped;
   Composer logged ``enabled_algorithms/GradClipAlgo``; the ``exclude`` globs match MPT parameter names.

Usage: ``python scripts/llmfoundry_check.py [--folder DIR] [--steps N]``; exit status 0 when every check
holds, 1 otherwise, with the figures printed either way.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

THRESHOLD = 0.5
LOG_INTERVAL = 2
SEQ_LEN = 32
EXCLUDE = ["*transformer.wte.*", "*norm_f.*"]  # MPT: the embedding (tied with the output) and the final norm
WORDS = [f"w{i}" for i in range(40)]
SPECIALS = {"pad": "<pad>", "unk": "<unk>", "eos": "<|endoftext|>"}


def build_tokenizer(folder: Path) -> int:
    """A word-level fast tokenizer over ``WORDS``, saved to ``folder``; returns its size."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*SPECIALS.values(), *WORDS])}
    core = Tokenizer(WordLevel(vocab, unk_token=SPECIALS["unk"]))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIALS["pad"],
        unk_token=SPECIALS["unk"],
        eos_token=SPECIALS["eos"],
        bos_token=SPECIALS["eos"],
        model_max_length=SEQ_LEN,
    )
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def write_data(folder: Path, samples: int, seed: int = 0) -> None:
    """Counting sequences ``w3 w4 w5 ...`` (mod 40) with some noise, as MDS shards with a ``text`` column."""
    from streaming import MDSWriter

    rng = random.Random(seed)
    with MDSWriter(out=str(folder), columns={"text": "str"}, compression=None) as writer:
        for _ in range(samples):
            start = rng.randrange(len(WORDS))
            words = [
                WORDS[(start + i) % len(WORDS)] if rng.random() > 0.1 else rng.choice(WORDS)
                for i in range(SEQ_LEN + 8)
            ]
            writer.write({"text": " ".join(words)})


def training_yaml(folder: Path, tokenizer_dir: Path, vocab_size: int, steps: int) -> dict[str, Any]:
    return {
        "run_name": "gradclip-llmfoundry-check",
        "seed": 17,
        "max_seq_len": SEQ_LEN,
        "model": {
            "name": "mpt_causal_lm",
            "init_device": "cpu",
            "d_model": 64,
            "n_heads": 4,
            "n_layers": 2,
            "expansion_ratio": 2,
            "max_seq_len": SEQ_LEN,
            "vocab_size": (vocab_size + 7) // 8 * 8,
            "attn_config": {"attn_impl": "torch"},
            "loss_fn": "torch_crossentropy",
        },
        "tokenizer": {"name": str(tokenizer_dir), "kwargs": {"model_max_length": SEQ_LEN}},
        "train_loader": {
            "name": "text",
            "dataset": {
                "local": str(folder / "data"),
                "remote": None,
                "split": "train",
                "shuffle": False,
                "max_seq_len": SEQ_LEN,
            },
            "drop_last": True,
            "num_workers": 0,
            "prefetch_factor": None,
            "persistent_workers": False,
            "pin_memory": False,
        },
        "scheduler": {"name": "constant_with_warmup", "t_warmup": "0ba"},
        "optimizer": {
            "name": "decoupled_adamw",
            "lr": 3.0e-3,
            "betas": [0.9, 0.95],
            "eps": 1.0e-8,
            "weight_decay": 0.0,
        },
        "algorithms": {
            "gradclip_algo": {
                "clipping_type": "norm",
                "clipping_threshold": THRESHOLD,
                "log_interval": LOG_INTERVAL,
                "exclude": EXCLUDE,
            }
        },
        "max_duration": f"{steps}ba",
        "eval_interval": 1,
        "global_train_batch_size": 8,
        "device_train_microbatch_size": 4,
        "device_eval_batch_size": 4,
        "precision": "fp32",
        "progress_bar": False,
        "log_to_console": True,
        "console_log_interval": f"{LOG_INTERVAL}ba",
        "callbacks": {"optimizer_monitor": {"batch_log_interval": LOG_INTERVAL}},
        "loggers": {"inmemory": {}},
        "python_log_level": "warning",
    }


def check(trainer: Any, steps: int) -> list[str]:
    """The checks on the finished run; returns the failures (empty when all hold) and prints the figures."""
    from composer.loggers import InMemoryLogger

    from gradclip_algo import GradClipAlgo

    failures = []
    ours = [algorithm for algorithm in trainer.state.algorithms if isinstance(algorithm, GradClipAlgo)]
    print(f"algorithms built by llm-foundry: {[type(a).__qualname__ for a in trainer.state.algorithms]}")
    if len(ours) != 1:
        failures.append(f"expected one GradClipAlgo among the trainer's algorithms, got {ours}")
    (memory,) = [d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)]
    enabled = sorted(key for key in memory.hyperparameters if key.startswith("enabled_algorithms/"))
    print(f"hyperparameters logged by Composer: {enabled}")
    if "enabled_algorithms/GradClipAlgo" not in enabled:
        failures.append(f"Composer did not log enabled_algorithms/GradClipAlgo: {enabled}")

    def series(name: str) -> list[tuple[int, float]]:
        return [(int(ts.batch.value), float(value)) for ts, value in memory.data.get(name, [])]

    grad_norm = series("gradient_clipping/grad_norm")
    clipped = series("gradient_clipping/clipped_grad_norm")
    fraction = series("gradient_clipping/clipped_steps_fraction")
    monitor = series("l2_norm/grad/global")
    want_steps = list(range(LOG_INTERVAL, steps + 1, LOG_INTERVAL))
    print("step  grad_norm  clipped_grad_norm  l2_norm/grad/global  clipped_steps_fraction")
    for (step, before), (_, after), (_, share), (_, seen) in zip(
        grad_norm, clipped, fraction, monitor, strict=False
    ):
        print(f"{step:>4}  {before:>9.4f}  {after:>17.4f}  {seen:>19.4f}  {share:>22.2f}")
    if [s for s, _ in grad_norm] != want_steps:
        failures.append(
            f"gradient_clipping/grad_norm logged at {[s for s, _ in grad_norm]}, expected {want_steps}"
        )
    if [s for s, _ in monitor] != [s for s, _ in clipped]:
        failures.append(
            f"OptimizerMonitor logged at {[s for s, _ in monitor]}, ours at {[s for s, _ in clipped]}"
        )
    # ours: the parameters clipped (the exclude globs left out); OptimizerMonitor: every parameter's grad
    for (step, after), (_, seen) in zip(clipped, monitor, strict=False):
        if after > THRESHOLD * (1 + 1e-5):
            failures.append(f"step {step}: post-clip norm {after} above the threshold {THRESHOLD}")
        if seen < after * (1 - 1e-5):
            failures.append(
                f"step {step}: OptimizerMonitor's norm {seen} below the clipped parameters' {after}"
            )
    if any(not 0.0 <= share <= 1.0 for _, share in fraction):
        failures.append(f"clipped_steps_fraction out of [0, 1]: {fraction}")
    if not any(before > THRESHOLD for _, before in grad_norm):
        failures.append(f"no logged step had a grad norm above {THRESHOLD}: clipping was never exercised")
    names = [name for name, _ in trainer.state.model.named_parameters()]
    for glob in EXCLUDE:
        matched = [name for name in names if fnmatch.fnmatchcase(name, glob)]
        print(f"exclude {glob!r} matches {matched}")
        if not matched:
            failures.append(f"exclude glob {glob!r} matches no MPT parameter (names: {names[:6]} ...)")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (default 8)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import llmfoundry
        from llmfoundry.command_utils import train_from_yaml
        from omegaconf import OmegaConf
    except ModuleNotFoundError as err:
        print(f"llmfoundry-check: error: {err.name} is not installed (make llmfoundry-check installs it)")
        return 2
    with tempfile.TemporaryDirectory(prefix="llmfoundry-check-") as scratch:
        folder = args.folder or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        vocab_size = build_tokenizer(folder / "tokenizer")
        write_data(folder / "data" / "train", samples=8 * (args.steps + 2))
        config = training_yaml(folder, folder / "tokenizer", vocab_size, args.steps)
        path = folder / "train.yaml"
        OmegaConf.save(OmegaConf.create(config), path)
        print(f"llm-foundry {llmfoundry.__version__}: training {path}")
        trainer = train_from_yaml(str(path), [])
        failures = check(trainer, args.steps)
        trainer.close()
    for failure in failures:
        print(f"FAILED: {failure}")
    print("llmfoundry-check: " + ("all checks hold" if not failures else f"{len(failures)} check(s) failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
