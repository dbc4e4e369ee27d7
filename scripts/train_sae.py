"""Train chapter 08's shipped SAE: TopK (k = 32), 576 -> 4,608 latents, on SmolLM2-135M-Instruct's residual
stream after block 15 ("blocks.15.hook_resid_post"), and save it in SAELens's layout under
data/sae_smollm2_l15_topk/ (cfg.json, sae_weights.safetensors in float16, sparsity.safetensors, training_log.json).

Text: the shared corpus (data/corpus.jsonl.gz, SmolLM2's own writing) and human-written prose
(data/sae_human_text.jsonl.gz, the Python 3.11 documentation; see scripts/make_human_text.py), cut into
sequences of 128 tokens (BOS + 127). 5 % of each source's sequences are held out for evaluation. The BOS position is
never used: its residual norm is about 150 times a normal token's (an attention sink).

Stages (each prints its time):
  1. collect the residuals (the forward pass stops after block 15), kept as float16 in --cache;
  2. scale them so the mean norm is sqrt(d_in) (folded back into the weights when saving: the shipped SAE reads
     raw residuals), then train with utils.sae.train_sae (Adam, unit-norm decoder rows, AuxK for dead latents,
     linear learning-rate decay over the last 20 %);
  3. evaluate on the held-out sequences: fraction of variance explained, L0, dead and dense latents, and the
     cross-entropy loss recovered when the reconstruction is spliced in (against zero and mean ablation);
  4. save.

    .venv/bin/python scripts/train_sae.py                                             # the shipped SAE
    .venv/bin/python scripts/train_sae.py --quick --out /tmp/sae_quick                # a 2-minute smoke test

The defaults are the shipped run's settings (seed 0): 1,800 steps x 2,048 = 3.7M activations seen, about 7 epochs
of the 523k training tokens. It took 2,139 s on 1 thread of the shared 2-core machine (collecting the Python docs' residuals
674 s, training 1,025 s, evaluation 430 s; "seconds" in training_log.json), plus about 9 min to collect the
corpus's residuals in an earlier, interrupted start of the same command, whose cache the run reused. Memory: 2.1 GB resident seen while
collecting, about 2.5 GB estimated while training (1.2 GB of float32 activations plus the model).
`--evaluate-only` recomputes the held-out FVE of the saved SAE from the cache, with and without sink tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import sae as sae_lib  # noqa: E402
from utils.corpus import corpus_texts  # noqa: E402
from utils.models import SMOLLM2_HUB_NAME, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
def sink_free_fve(x: torch.Tensor, recon: torch.Tensor, ratio: float = 10.0) -> dict:
    """FVE without "sink" tokens: a few tokens right after BOS (e.g. an EOS there) have residual norms of 4,000-17,000,
    100x a normal token's, and one of them can carry most of a sample's variance, inflating the plain FVE. This
    drops tokens whose norm exceeds `ratio` x the median and reports how many it dropped."""
    norms = x.norm(dim=-1)
    keep = norms <= ratio * norms.median()
    return {"fraction_variance_explained_without_sinks": round(float(
                sae_lib.fraction_variance_explained(x[keep], recon[keep])), 4),
            "sink_tokens_dropped": int((~keep).sum())}


def evaluate_only(args) -> None:
    """Recompute the held-out FVE and L0 of the saved SAE from the cached residuals (no CE loss: that needs the
    model); written into training_log.json under "metrics_recomputed"."""
    out = Path(args.out)
    params, _ = sae_lib.load_sae(out)
    record = json.loads((out / "training_log.json").read_text())
    recomputed = {}
    for name in ("smollm2_corpus", "python_docs"):
        path = Path(args.cache) / f"{name}_l{args.layer}_s{args.seq_len}_full.pt"
        x = torch.load(path)["held"].reshape(-1, params["W_enc"].shape[0]).float()
        recon, acts = sae_lib.sae_forward(x, params, "topk", args.k)
        recomputed[name] = {"held_out_tokens": int(x.shape[0]),
                            "fraction_variance_explained": round(float(sae_lib.fraction_variance_explained(x, recon)), 4),
                            **sink_free_fve(x, recon), "l0": round(sae_lib.latent_statistics(acts)["l0"], 2)}
        print(name, json.dumps(recomputed[name]), flush=True)
    record["metrics_recomputed"] = {"weights": "the saved float16 weights", **recomputed}
    (out / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Train chapter 08's TopK SAE on SmolLM2's residual stream.")
    parser.add_argument("--out", default=str(sae_lib.SHIPPED_SAE))
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "sae"), help="where collected residuals are kept")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--aux-k", type=int, default=512)
    parser.add_argument("--dead-after", type=int, default=1_000_000, help="tokens without firing = dead (AuxK)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held-out", type=float, default=0.05)
    parser.add_argument("--eval-sequences", type=int, default=48, help="held-out sequences per source for CE loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-human-text", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a small smoke test: 200 sequences, 150 steps")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="recompute the saved SAE's held-out FVE (with and without sink tokens) from --cache")
    args = parser.parse_args()
    if args.evaluate_only:
        evaluate_only(args)
        return
    torch.manual_seed(args.seed)
    timings, started = {}, time.time()

    model = load_model()
    tokenizer = model.tokenizer
    hook_name = f"blocks.{args.layer}.hook_resid_post"
    sources = {"smollm2_corpus": corpus_texts()}
    if not args.no_human_text:
        sources["python_docs"] = sae_lib.human_texts()

    # 1. collect -------------------------------------------------------------------------------------------
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    train_acts, held_out_tokens, held_out_acts, counts = [], {}, {}, {}
    for index, (name, texts) in enumerate(sources.items()):
        # the same cut as utils.sae.sae_text_split (which the notebook uses to find the held-out rows)
        rows = sae_lib.text_sequences(tokenizer, texts, args.seq_len, args.seed + index)
        if args.quick:
            rows = rows[:200]
        train_rows, held_rows = sae_lib.train_held_out_split(rows, args.held_out, args.seed + index)
        counts[name] = {"train_sequences": int(train_rows.shape[0]), "held_out_sequences": int(held_rows.shape[0]),
                        "train_tokens": int(train_rows.shape[0] * (args.seq_len - 1))}
        path = cache / f"{name}_l{args.layer}_s{args.seq_len}_{'quick' if args.quick else 'full'}.pt"
        if path.is_file():
            stored = torch.load(path)
        else:
            t0 = time.time()
            stored = {"train": sae_lib.collect_residuals(model, train_rows, args.layer, 32, dtype=torch.float16,
                                                         progress=True).reshape(-1, model.cfg.d_model),
                      "held": sae_lib.collect_residuals(model, held_rows, args.layer, 32, dtype=torch.float16)}
            torch.save(stored, path)
            timings[f"collect_{name}_s"] = round(time.time() - t0, 1)
            print(f"collected {name}: {stored['train'].shape[0]:,} tokens in {time.time() - t0:.0f} s", flush=True)
        train_acts.append(stored["train"])
        held_out_tokens[name], held_out_acts[name] = held_rows, stored["held"]
    activations = torch.cat(train_acts)
    n_train = activations.shape[0]

    # 2. train ---------------------------------------------------------------------------------------------
    mean_norm = float(activations[:200_000].float().norm(dim=-1).mean())
    scale = math.sqrt(model.cfg.d_model) / mean_norm
    print(f"{n_train:,} training tokens; mean residual norm {mean_norm:.1f}, scale {scale:.4f}", flush=True)
    scaled = activations.float().mul_(scale)
    del activations
    steps = 150 if args.quick else args.steps
    log: list[dict] = []
    t0 = time.time()

    def report(step, entry):
        print(f"step {step:5d}  mse {entry['mse']:.2f}  aux {entry.get('aux', 0):.3f}  dead {entry['dead']}  "
              f"{time.time() - t0:.0f} s", flush=True)

    params = sae_lib.train_sae(scaled, args.d_sae, "topk", args.k, n_steps=steps, batch_size=args.batch_size,
                               lr=args.lr, seed=args.seed, aux_k=args.aux_k, dead_after=args.dead_after, log=log,
                               log_every=25 if args.quick else 200, progress=report)
    timings["train_s"] = round(time.time() - t0, 1)
    del scaled
    # fold the input scale back in: the SAE reads raw residuals, its latents keep their trained values
    params = {"W_enc": params["W_enc"] * scale, "b_enc": params["b_enc"],
              "W_dec": params["W_dec"] / scale, "b_dec": params["b_dec"] / scale}

    # 3. evaluate on held-out text --------------------------------------------------------------------------
    t0 = time.time()
    metrics = {}
    mean_activation = torch.cat([acts.reshape(-1, model.cfg.d_model) for acts in held_out_acts.values()]).float()
    all_acts = []
    for name in sources:
        x = held_out_acts[name].reshape(-1, model.cfg.d_model).float()
        recon, acts = sae_lib.sae_forward(x, params, "topk", args.k)
        all_acts.append(acts > 0)
        eval_tokens = held_out_tokens[name][:args.eval_sequences]
        losses = {mode: float(sae_lib.spliced_loss(model, eval_tokens, hook_name, params, "topk", args.k, mode,
                                                   mean_activation.mean(0)))
                  for mode in sae_lib.SPLICE_MODES}
        metrics[name] = {
            "held_out_tokens": int(x.shape[0]),
            "fraction_variance_explained": round(float(sae_lib.fraction_variance_explained(x, recon)), 4),
            **sink_free_fve(x, recon),
            "l0": round(sae_lib.latent_statistics(acts)["l0"], 2),
            "ce_loss": {mode: round(value, 4) for mode, value in losses.items()},
            "ce_loss_recovered_vs_zero": round(sae_lib.ce_loss_recovered(losses["clean"], losses["sae"],
                                                                         losses["zero"]), 4),
            "ce_loss_recovered_vs_mean": round(sae_lib.ce_loss_recovered(losses["clean"], losses["sae"],
                                                                         losses["mean"]), 4),
            "ce_eval_sequences": int(eval_tokens.shape[0]),
        }
        print(name, json.dumps(metrics[name]), flush=True)
    stats = sae_lib.latent_statistics(torch.cat(all_acts).float())
    metrics["all_held_out"] = {"tokens": int(torch.cat(all_acts).shape[0]), "n_dead": stats["n_dead"],
                               "n_dense_over_10pct": stats["n_dense"]}
    timings["evaluate_s"] = round(time.time() - t0, 1)

    # 4. save ---------------------------------------------------------------------------------------------
    cfg = sae_lib.sae_lens_cfg(model.cfg.d_model, args.d_sae, "topk", args.k, hook_name, SMOLLM2_HUB_NAME,
                               args.seq_len, dataset_path="data/corpus.jsonl.gz + data/sae_human_text.jsonl.gz",
                               exclude_special_tokens=["bos"], weights_stored_as="float16")
    out = Path(args.out)
    sae_lib.save_sae(out, params, cfg, weights_dtype=torch.float16, firing_rate=stats["firing_rate"])
    timings["total_s"] = round(time.time() - started, 1)
    record = {"script": "scripts/train_sae.py", "argv": sys.argv[1:], "seed": args.seed,
              "threads": torch.get_num_threads(), "sources": counts, "train_tokens": n_train,
              "activations_seen": steps * args.batch_size, "epochs": round(steps * args.batch_size / n_train, 2),
              "input_scale_folded": scale, "settings": {key: value for key, value in vars(args).items()},
              "metrics": metrics, "seconds": timings, "log": log}
    (out / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {out} in {timings['total_s']:.0f} s total", flush=True)


if __name__ == "__main__":
    main()
