"""Character-level language model trained with truncated BPTT (many-to-many).

Embedding -> LSTM -> Linear over the characters of the opening pages of
*Alice's Adventures in Wonderland* (examples/data/alice_ch1.txt, public
domain). The text is cut into B parallel streams; each training step takes
the next chunk of every stream, carries the LSTM state over from the
previous chunk and backpropagates within the chunk only (truncated BPTT).
The last 10% of the text is held out: the final loss is the mean
cross-entropy (nats per character) on it, next to that of a unigram model
(character frequencies of the training part).

    python examples/char_lm.py [--backend numba] [--steps 250] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import time

# Small GEMMs: one BLAS thread is faster, and two BLAS pools spinning on a busy
# machine can be a hundred times slower. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from pathlib import Path

import numpy as np
from tqdm import tqdm

import fastrnn
from fastrnn.losses import cross_entropy, log_softmax

TEXT = Path(__file__).parent / "data" / "alice_ch1.txt"


class CharLM:
    """Embedding -> LSTM -> Linear, with a forward/backward pair over one chunk."""

    def __init__(self, vocab, emb, hidden, backend, seed):
        self.embed = fastrnn.Embedding(vocab, emb, backend=backend, seed=seed)
        self.lstm = fastrnn.LSTM(emb, hidden, backend=backend, seed=seed + 1)
        self.head = fastrnn.Linear(hidden, vocab, backend=backend, seed=seed + 2)
        self.modules = [self.embed, self.lstm, self.head]

    def forward(self, ids, state):
        """ids (T, B) -> logits (T, B, V), state after the chunk."""
        out, state = self.lstm(self.embed(ids), state)
        return self.head(out), state

    def backward(self, d_logits):
        # The chunk's d_hx is dropped: this is where truncated BPTT cuts the gradient.
        d_x, _ = self.lstm.backward(self.head.backward(d_logits))
        self.embed.backward(d_x)

    def eval(self):
        for m in self.modules:
            m.eval()

    def train(self):
        for m in self.modules:
            m.train()


def streams(ids, B):
    """Cut a 1-D id sequence into B contiguous streams, time-major (T, B)."""
    T = len(ids) // B
    return ids[:T * B].reshape(B, T).T.copy()


def evaluate(model, ids):
    """Mean cross-entropy (nats/char) of predicting ids[1:] from ids[:-1], one stream."""
    model.eval()
    logits, _ = model.forward(ids[:-1, None], None)
    loss, _ = cross_entropy(logits, ids[1:, None])
    model.train()
    return loss


def sample(model, chars, index, prompt, n, temperature, rng):
    """Complete ``prompt`` with ``n`` sampled characters."""
    model.eval()
    ids = np.array([index[c] for c in prompt])[:, None]
    logits, state = model.forward(ids, None)
    text = prompt
    for _ in range(n):
        log_p = log_softmax(logits[-1, 0].astype(np.float64) / temperature)
        c = rng.choice(len(chars), p=np.exp(log_p) / np.exp(log_p).sum())
        text += chars[c]
        logits, state = model.forward(np.array([[c]]), state)
    model.train()
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=250, help="training chunks (default 250)")
    p.add_argument("--chunk", type=int, default=32, help="truncation length (default 32)")
    p.add_argument("--batch", type=int, default=16, help="parallel streams (default 16)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps, to check that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.hidden = 5, 16
    started = time.perf_counter()

    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text])
    split = int(0.9 * len(ids))
    train_ids, valid_ids = ids[:split], ids[split:]
    data = streams(train_ids, args.batch)                       # (T, B)
    counts = np.bincount(train_ids, minlength=len(chars)) + 1   # add-one: every char possible
    unigram = -np.log(counts / counts.sum())[valid_ids[1:]].mean()

    model = CharLM(len(chars), 32, args.hidden, args.backend, args.seed)
    opt = fastrnn.optim.Adam(model.modules, lr=args.lr)
    print(f"{len(text)} characters ({len(chars)} distinct), {data.shape[1]} streams of "
          f"{data.shape[0]} steps, chunks of {args.chunk}; LSTM({model.lstm.hidden_size}) on "
          f"backend {model.lstm.backend!r}")

    state, step, avg = None, 0, math.log(len(chars))
    bar = tqdm(total=args.steps, desc="char LM", unit="chunk")
    while step < args.steps:
        state = None                                            # each pass starts afresh
        for xs, ys in fastrnn.tbptt.chunks(data[:-1], data[1:], size=args.chunk):
            logits, state = model.forward(xs, state)            # carry the state forward
            loss, d_logits = cross_entropy(logits, ys)
            model.backward(d_logits)                            # the gradient stops here
            fastrnn.clip_grad_norm_(model.modules, 1.0)
            opt.step()
            opt.zero_grad()
            avg = 0.95 * avg + 0.05 * loss
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{avg:.3f}")
            if step == args.steps:
                break
    bar.close()

    rng = np.random.default_rng(args.seed)
    for prompt in ("Alice was ", "Down, down, ", "\"Oh dear! ", "The White Rabbit "):
        print(repr(sample(model, chars, index, prompt, 60, 0.6, rng)))
    final = evaluate(model, valid_ids)
    print(f"training loss (smoothed): {avg:.3f}; held-out loss below is on the last "
          f"{len(valid_ids)} characters, in nats per character; "
          f"{time.perf_counter() - started:.1f} s")
    print(f"final loss: {final:.3f} (unigram baseline: {unigram:.3f})")


if __name__ == "__main__":
    main()
