"""Encoder-decoder with attention, in NumPy with fastrnn: learn to reverse digit strings.

A bidirectional GRU encoder (``fastrnn.GRU``, whole sequences, with lengths)
reads a string of 3 to 10 digits; an ``fastrnn.LSTMCell`` decoder writes it
reversed, one token at a time, attending over the encoder's outputs with
``fastrnn.attention.dot_attention``. Training uses teacher forcing and the
whole backward pass is written out by hand: the decoder's tape is undone
step by step, the encoder gets the gradient of its outputs (through the
attention) and of its final states (through the decoder's initial state).

    python examples/seq2seq_attention.py              # ~1 minute on 2 CPU cores
    python examples/seq2seq_attention.py --quick      # smoke test, a few seconds
    python examples/seq2seq_attention.py --backend numpy

Model, batch-major (B batch, S source steps, T target steps)::

    src (B, S) -> Embedding -> biGRU -> enc (B, S, 2 He), h_n (2, B, He)
    h_0 = [h_n fwd; h_n bwd], c_0 = 0                        (B, Hd = 2 He)
    x_t = [Embedding(y_{t-1}); ctx_{t-1}]                    (input feeding)
    h_t, c_t = LSTMCell(x_t, (h_{t-1}, c_{t-1}))
    ctx_t = dot_attention(h_t, enc, enc, mask)               (B, 2 He)
    logits_t = Linear([h_t; ctx_t])                          (B, 12)
"""

from __future__ import annotations

import argparse
import os
import time

# Every GEMM here is small (B = 64 rows): BLAS threads only add synchronisation, and on a
# busy machine their spinning made training many times slower. One thread unless the user says so.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings, which BLAS reads at load time)
from tqdm import tqdm  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.attention import dot_attention, dot_attention_backward  # noqa: E402
from fastrnn.losses import cross_entropy  # noqa: E402
from fastrnn.nn import Embedding, Linear  # noqa: E402
from fastrnn.optim import Adam  # noqa: E402

DIGITS = 10
EOS, BOS = 10, 11          # target vocabulary: digits, end of string, start (decoder input)
IGNORE = -100


# ------------------------------------------------------------------------ data

def make_strings(rng, n, min_len, max_len, exclude=frozenset()):
    """``n`` random digit strings (tuples) with lengths in [min_len, max_len], none in ``exclude``."""
    out = []
    while len(out) < n:
        s = tuple(rng.integers(0, DIGITS, size=int(rng.integers(min_len, max_len + 1))).tolist())
        if s not in exclude:
            out.append(s)
    return out


def encode_batch(strings):
    """Source (B, S) and its lengths; decoder inputs and targets (B, T = S + 1), reversed."""
    B, S = len(strings), max(len(s) for s in strings)
    src = np.zeros((B, S), np.int64)
    lengths = np.array([len(s) for s in strings], np.int64)
    dec_in = np.full((B, S + 1), BOS, np.int64)
    target = np.full((B, S + 1), IGNORE, np.int64)
    for b, s in enumerate(strings):
        n = len(s)
        src[b, :n] = s
        rev = s[::-1]
        dec_in[b, 1:n + 1] = rev
        target[b, :n] = rev
        target[b, n] = EOS
    return src, lengths, dec_in, target


# ----------------------------------------------------------------------- model

class Seq2Seq:
    def __init__(self, emb=32, enc_hidden=64, backend="auto", seed=0):
        rng = np.random.default_rng(seed)
        seeds = rng.integers(0, 2**31, size=5)
        self.He, self.Hd, self.E = enc_hidden, 2 * enc_hidden, emb
        self.src_emb = Embedding(DIGITS, emb, backend=backend, seed=seeds[0])
        self.encoder = fastrnn.GRU(emb, enc_hidden, batch_first=True, bidirectional=True,
                                   backend=backend, seed=seeds[1])
        self.tgt_emb = Embedding(BOS + 1, emb, backend=backend, seed=seeds[2])
        self.decoder = fastrnn.LSTMCell(emb + 2 * enc_hidden, self.Hd, backend=backend,
                                        seed=seeds[3])
        self.out = Linear(self.Hd + 2 * enc_hidden, EOS + 1, backend=backend, seed=seeds[4])
        self.modules = [self.src_emb, self.encoder, self.tgt_emb, self.decoder, self.out]

    def train(self, mode=True):
        for m in self.modules:
            m.train(mode)

    def encode(self, src, lengths):
        enc, h_n = self.encoder(self.src_emb(src), lengths=lengths)     # (B, S, 2He), (2, B, He)
        mask = np.arange(src.shape[1])[None, :] < lengths[:, None]
        h0 = np.concatenate([h_n[0], h_n[1]], axis=1)                    # (B, Hd)
        return enc, mask, h0

    def step(self, y_prev_emb, ctx_prev, state, enc, mask):
        """One decoder step: returns the features fed to the output layer, the new state."""
        h, c = self.decoder(np.concatenate([y_prev_emb, ctx_prev], axis=1), state)
        ctx, _, cache = dot_attention(h, enc, enc, mask)
        return np.concatenate([h, ctx], axis=1), (h, c), ctx, cache

    def loss_and_backward(self, src, lengths, dec_in, target):
        """Teacher-forced forward, cross-entropy, and the full backward; returns the loss."""
        B, T = dec_in.shape
        enc, mask, h0 = self.encode(src, lengths)
        y_emb = self.tgt_emb(dec_in)                                     # (B, T, E)
        state = (h0, np.zeros_like(h0))
        ctx = np.zeros((B, 2 * self.He), np.float32)
        feats, caches = [], []
        for t in range(T):
            f, state, ctx, cache = self.step(y_emb[:, t], ctx, state, enc, mask)
            feats.append(f)
            caches.append(cache)
        logits = self.out(np.stack(feats, axis=1))                       # (B, T, C)
        loss, d_logits = cross_entropy(logits, target, ignore_index=IGNORE)

        d_feats = self.out.backward(d_logits)                            # (B, T, Hd + 2He)
        Hd = self.Hd
        d_enc = np.zeros_like(enc)
        d_y_emb = np.empty_like(y_emb)
        d_h_next = np.zeros((B, Hd), np.float32)
        d_c_next = np.zeros((B, Hd), np.float32)
        d_ctx_next = np.zeros((B, 2 * self.He), np.float32)   # from input feeding at t + 1
        for t in reversed(range(T)):
            d_ctx = d_feats[:, t, Hd:] + d_ctx_next
            d_q, d_keys, d_values = dot_attention_backward(d_ctx, caches[t])
            d_enc += d_keys
            d_enc += d_values
            d_h = d_feats[:, t, :Hd] + d_q + d_h_next
            d_x, (d_h_next, d_c_next) = self.decoder.backward(d_h, d_c_next)
            d_y_emb[:, t] = d_x[:, :self.E]
            d_ctx_next = d_x[:, self.E:]
        self.tgt_emb.backward(d_y_emb)
        d_h_n = np.stack([d_h_next[:, :self.He], d_h_next[:, self.He:]])  # d_c_0 goes nowhere
        d_src_emb, _ = self.encoder.backward(d_enc, d_h_n)
        self.src_emb.backward(d_src_emb)
        return loss

    def greedy_decode(self, strings):
        """Decode ``strings`` greedily in eval mode; returns the predicted token tuples."""
        self.train(False)
        src, lengths, _, _ = encode_batch(strings)
        B, max_steps = len(strings), src.shape[1] + 2
        enc, mask, h0 = self.encode(src, lengths)
        state = (h0, np.zeros_like(h0))
        ctx = np.zeros((B, 2 * self.He), np.float32)
        y = np.full(B, BOS, np.int64)
        tokens = np.empty((B, max_steps), np.int64)
        for t in range(max_steps):
            f, state, ctx, _ = self.step(self.tgt_emb(y), ctx, state, enc, mask)
            y = self.out(f).argmax(axis=1)
            tokens[:, t] = y
        self.train(True)
        preds = []
        for row in tokens.tolist():
            preds.append(tuple(row[:row.index(EOS)]) if EOS in row else tuple(row))
        return preds


# ------------------------------------------------------------------------ main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="auto", help="auto, numpy, numba or cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="training batches")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (20 if args.quick else 800)
    n_test = 64 if args.quick else 1000
    min_len, max_len = 3, 10

    rng = np.random.default_rng(args.seed)
    test = make_strings(rng, n_test, min_len, max_len)
    held_out = frozenset(test)
    model = Seq2Seq(backend=args.backend, seed=args.seed)
    opt = Adam(model.modules, lr=3e-3)
    print(f"backend: {model.encoder.backend}; {steps} batches of {args.batch}; "
          f"strings of {min_len} to {max_len} digits; {n_test} held-out strings", flush=True)

    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", mininterval=0.5)
    for _ in bar:
        batch = encode_batch(make_strings(rng, args.batch, min_len, max_len, held_out))
        opt.zero_grad()
        loss = model.loss_and_backward(*batch)
        opt.step()
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    bar.close()
    train_s = time.perf_counter() - start

    preds = model.greedy_decode(test)
    correct = [p == s[::-1] for p, s in zip(preds, test)]
    for s, p in list(zip(test, preds))[:5]:
        show = "".join(map(str, s)), "".join("<eos>" if t == EOS else ("<bos>" if t == BOS
                                             else str(t)) for t in p)
        print(f"  {show[0]:>10} -> {show[1]:<12} {'ok' if p == s[::-1] else 'WRONG'}")
    print(f"trained in {train_s:.1f} s")
    print(f"final accuracy: {np.mean(correct):.3f}")


if __name__ == "__main__":
    main()
