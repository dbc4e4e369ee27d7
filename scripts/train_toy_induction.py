"""Train the 2-layer attention-only toy of chapter 02 and save it to data/toy_induction.pt.

    .venv/bin/python scripts/train_toy_induction.py            # about 1 to 2 minutes on 2 CPU cores

The data: every sequence starts with BOS (token 0), then one segment of random tokens from [1, D_VOCAB), of
random length, repeated until the context is full (`induction_batch`). Because the segment's length varies, the
only way to predict a repeated token is to look the current token up earlier in the sequence and copy what
followed it: induction. The batches come from `utils.heads.toy_induction_batch`, which the chapter
uses too; the chapter checks that its settings match the metadata stored with the weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.toy import build_toy, save_toy, train  # noqa: E402

D_VOCAB, N_CTX, D_MODEL, N_HEADS = 500, 64, 128, 8
BATCH, LR, STEPS, SEED, LOG_EVERY = 32, 3e-3, 1000, 0, 50
EVAL_HALF = 20
MIN_LEN = 8
WEIGHTS = ROOT / "data" / "toy_induction.pt"


def induction_batch(step: int, fixed: bool = False) -> torch.Tensor:
    """The training batch for `step` (see utils.heads.toy_induction_batch)."""
    from utils.heads import toy_induction_batch

    return toy_induction_batch(step, batch=BATCH, n_ctx=N_CTX, d_vocab=D_VOCAB, seed=SEED, fixed=fixed,
                               min_len=MIN_LEN)


def eval_tokens(half_len: int = EVAL_HALF, n_batch: int = 64, seed: int = 1234) -> torch.Tensor:
    """Repeated random tokens for evaluation: BOS, half_len random tokens, the same again."""
    from utils.heads import repeated_random_tokens

    return repeated_random_tokens(n_batch, half_len, 1, D_VOCAB, bos=0, seed=seed)


def icl_callback(tokens: torch.Tensor, half_len: int = EVAL_HALF):
    """A train() callback: losses on the first and second copy, and the in-context-learning score."""
    from utils.heads import induction_scores, repeat_losses

    def callback(step, model):
        logits, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
        first, second = repeat_losses(logits, tokens, half_len)
        return {"loss_first": first, "loss_second": second, "icl_score": second - first,
                "max_induction": induction_scores(cache["blocks.1.attn.hook_pattern"], half_len).max().item()}

    return callback


def main(steps: int = STEPS) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)  # build_toy draws its initial weights from the global generator
    model = build_toy(n_layers=2, d_model=D_MODEL, n_heads=N_HEADS, d_vocab=D_VOCAB, n_ctx=N_CTX, attn_only=True,
                      seed=SEED)
    log = train(model, induction_batch, steps=steps, lr=LR, log_every=LOG_EVERY, callback=icl_callback(eval_tokens()),
                seed=SEED, desc="toy induction")
    save_toy(model, WEIGHTS, log=log, steps=steps, batch=BATCH, lr=LR,
             made_by="scripts/train_toy_induction.py")
    print(f"saved {WEIGHTS} ({WEIGHTS.stat().st_size / 1e6:.2f} MB); final loss {log[-1]['loss']:.3f}, "
          f"icl score {log[-1]['icl_score']:.2f}, max induction score {log[-1]['max_induction']:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else STEPS)
