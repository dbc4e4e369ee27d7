"""Train the modular-addition transformer of chapter 13 (Nanda et al. 2023) and save its checkpoints.

    .venv/bin/python scripts/train_grokking.py              # EPOCHS full-batch epochs, one thread (see NOTES)
    .venv/bin/python scripts/train_grokking.py 500          # a short smoke run (writes to /tmp)

The paper's settings: p = 113, inputs "a b =", one layer, d_model 128, 4 heads of 32, d_mlp 512 (ReLU), no
LayerNorm, 30 % of the p*p pairs for training, full batch, AdamW lr 1e-3, weight decay 1.0, betas (0.9, 0.98),
cross-entropy in float64. The paper trains 40k epochs; on one CPU thread an epoch takes ~0.1 s, so we train
EPOCHS (the model groks and finishes its cleanup well before; NOTES-ch13.md gives the epochs).

Writes /tmp/grokking_run/ (every SAVE_EVERY epochs, fp32, plus the optimiser state to resume) and
data/grokking_p113.pt: the checkpoints of SHIPPED_EPOCHS in float16, the training curves (every LOG_EVERY
epochs, computed at full precision), the split and the settings.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.grokking import (CHECKPOINTS, build_grokking_model, modular_addition_data,  # noqa: E402
                            parameters_only, train_grokking, train_test_split)

P, FRAC_TRAIN, SEED, SPLIT_SEED = 113, 0.3, 0, 0
LR, WEIGHT_DECAY, BETAS = 1e-3, 1.0, (0.9, 0.98)
EPOCHS, LOG_EVERY, SAVE_EVERY = 18000, 100, 500
SHIPPED_EPOCHS = (0, 500, 1000, 1500, 2500, 4000, 6000, 8000, 10000, 12000, 14000, 18000)
SHIPPED_LR3 = (0, 500, 1000, 2000, 3000, 4000, 6000, 12000)  # the run shipped (lr 3e-3, 12k epochs)
RUN_DIR = Path("/tmp/grokking_run_ch13")


def shipped_epochs(epochs: int) -> tuple[int, ...]:
    """The saved epochs to ship: dense early (memorisation), then every ~1/9 of the run."""
    if epochs == EPOCHS and LR == 1e-3:
        return SHIPPED_EPOCHS
    if epochs == 12000:
        return SHIPPED_LR3
    step = max(SAVE_EVERY, (epochs // 9) // SAVE_EVERY * SAVE_EVERY)
    return tuple(sorted({0, 500, 1000, *range(step, epochs, step), epochs}))


def main(epochs: int = EPOCHS, lr: float = LR, ship: bool = True) -> None:
    global RUN_DIR
    if lr != LR:
        RUN_DIR = RUN_DIR.with_name(f"{RUN_DIR.name}_lr{lr:g}")
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    model = build_grokking_model(P, seed=SEED)
    tokens, labels = modular_addition_data(P)
    train_idx, test_idx = train_test_split(P * P, FRAC_TRAIN, seed=SPLIT_SEED)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    saved: dict[int, dict] = {}
    start = time.time()

    def on_log(epoch, native):
        if epoch % SAVE_EVERY == 0 or epoch == epochs:
            state = {k: v.detach().clone() for k, v in native.state_dict().items()}
            saved[epoch] = state
            torch.save(state, RUN_DIR / f"epoch_{epoch:05d}.pt")
            print(f"epoch {epoch}: {time.time() - start:.0f} s", flush=True)

    log = train_grokking(model, tokens, labels, train_idx, test_idx, epochs=epochs, lr=lr,
                         weight_decay=WEIGHT_DECAY, betas=BETAS, log_every=LOG_EVERY, on_log=on_log)
    seconds = time.time() - start
    torch.save({"log": log, "seconds": seconds}, RUN_DIR / "log.pt")
    for row in log[:: max(1, len(log) // 40)] + [log[-1]]:
        print(row, flush=True)
    if not ship:
        print(f"smoke run of {epochs} epochs in {seconds:.0f} s; nothing shipped")
        return
    out = CHECKPOINTS if lr == LR else CHECKPOINTS.with_name(f"{CHECKPOINTS.stem}_lr{lr:g}.pt")
    shipped = {e: {k: v.half() for k, v in parameters_only(model.original_model, saved[e]).items()}
               for e in shipped_epochs(epochs)}
    torch.save({
        "checkpoints": shipped, "log": log, "train_idx": train_idx, "test_idx": test_idx,
        "settings": {"p": P, "frac_train": FRAC_TRAIN, "seed": SEED, "split_seed": SPLIT_SEED, "lr": lr,
                     "weight_decay": WEIGHT_DECAY, "betas": BETAS, "epochs": epochs, "d_model": 128, "n_heads": 4,
                     "d_mlp": 512, "made_by": "scripts/train_grokking.py", "seconds_one_thread": round(seconds)},
    }, out)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {seconds:.0f} s")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else EPOCHS
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else LR
    main(n, rate, ship=n >= 5000)
